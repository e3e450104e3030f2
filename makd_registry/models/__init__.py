"""Models: architecture adapters, loading, students (layer selection, low-rank
factorization), saving and loading them, and tokenizer checks.

Importing this package imports no torch; the submodules that need it import it themselves.
"""

from __future__ import annotations

from .adapter import (
    HEAD_CLASSES,
    ArchitectureAdapter,
    ArchitectureError,
    LayerLayout,
    get_submodule,
    set_submodule,
)
from .registry import ArchitectureRegistry, make_architecture_registry

__all__ = [
    "HEAD_CLASSES",
    "ArchitectureAdapter",
    "ArchitectureError",
    "ArchitectureRegistry",
    "LayerLayout",
    "get_submodule",
    "make_architecture_registry",
    "set_submodule",
]
