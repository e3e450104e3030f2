"""makd: knowledge distillation for Transformer language models, as a registry of aspects.

Public API for plugin authors::

    from makd_registry import Aspect, AspectConfig, LayerwiseConfig, Feature, hookimpl

Importing this package is cheap: it imports neither torch nor any plugin.
"""

from __future__ import annotations

import pluggy

from .aspect import Aspect, AspectConfig, AspectNode, ChildNode, LayerwiseConfig
from .errors import Diagnostic, ExitCode, MakdError, ObjectiveError, PluginError
from .features import Feature, FeatureRequest, FeatureSet, ModelInfo, TopKLogits
from .mapping import LayerMapping, LayerPair
from .plugins import make_plugin_manager, make_registry

__version__ = "0.1.0"

#: Marker for hook implementations in plugins: ``@hookimpl def makd_register_aspects(...)``.
hookimpl = pluggy.HookimplMarker("makd")

__all__ = [
    "Aspect",
    "AspectConfig",
    "AspectNode",
    "ChildNode",
    "Diagnostic",
    "ExitCode",
    "Feature",
    "FeatureRequest",
    "FeatureSet",
    "TopKLogits",
    "LayerMapping",
    "LayerPair",
    "LayerwiseConfig",
    "MakdError",
    "ModelInfo",
    "ObjectiveError",
    "PluginError",
    "hookimpl",
    "make_plugin_manager",
    "make_registry",
]
