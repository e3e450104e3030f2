"""The objective-file language: YAML with positions, section models, resolution."""

from .resolve import ResolvedObjective, load_objective, resolve_text
from .sections import ObjectiveFile
from .source import SourceMap, format_path, load_yaml

__all__ = [
    "ObjectiveFile",
    "ResolvedObjective",
    "SourceMap",
    "format_path",
    "load_objective",
    "load_yaml",
    "resolve_text",
]
