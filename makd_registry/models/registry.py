"""The architecture registry: adapters by ``model_type``, collected from every plugin."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import PluginConflictError, PluginError
from ..registry import PluginFailure, PluginInfo
from .adapter import HEAD_CLASSES, ArchitectureAdapter, ArchitectureError, LayerLayout

ADAPTER_DOCS = "docs/adapters.md"


def check_adapter_class(cls: Any) -> None:
    """Raise ``TypeError`` describing what is wrong with an adapter class."""
    if not (isinstance(cls, type) and issubclass(cls, ArchitectureAdapter)):
        raise TypeError(f"{cls!r} is not a subclass of ArchitectureAdapter")
    if not isinstance(cls.name, str) or not cls.name:
        raise TypeError(f"{cls.__qualname__} has no 'name'")
    types = cls.model_types
    if not isinstance(types, tuple) or not types or not all(isinstance(t, str) for t in types):
        raise TypeError(f"{cls.__qualname__}.model_types must be a non-empty tuple of str")
    if not isinstance(getattr(cls, "layout", None), LayerLayout):
        raise TypeError(f"{cls.__qualname__}.layout must be a LayerLayout")
    if not isinstance(cls.layers_path, str) or not cls.layers_path:
        raise TypeError(f"{cls.__qualname__}.layers_path must name the list of layers")
    unknown = set(cls.heads) - set(HEAD_CLASSES)
    if unknown:
        raise TypeError(
            f"{cls.__qualname__}.heads has unknown head(s) {sorted(unknown)}; known: "
            f"{sorted(HEAD_CLASSES)}"
        )


@dataclass
class ArchitectureRegistry:
    """Adapter classes by ``model_type``, with the plugin that registered each."""

    by_type: dict[str, tuple[type[ArchitectureAdapter], PluginInfo]] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    def add(self, cls: type[ArchitectureAdapter], plugin: PluginInfo) -> list[str]:
        try:
            check_adapter_class(cls)
        except TypeError as exc:
            raise PluginError(
                f"plugin '{plugin.name}' registered an invalid architecture adapter: {exc}"
            ) from None
        if all(self.by_type.get(t) == (cls, plugin) for t in cls.model_types):
            return []  # registered again by the same plugin: nothing new to roll back
        for model_type in cls.model_types:
            existing = self.by_type.get(model_type)
            if existing is not None:
                raise PluginConflictError(
                    f"model_type '{model_type}' is claimed twice: by plugin "
                    f"'{existing[1].name}' ({existing[0].__qualname__}) and by plugin "
                    f"'{plugin.name}' ({cls.__qualname__})"
                )
        for model_type in cls.model_types:
            self.by_type[model_type] = (cls, plugin)
        return list(cls.model_types)

    def model_types(self) -> list[str]:
        return sorted(self.by_type)

    def get(self, model_type: str) -> ArchitectureAdapter | None:
        entry = self.by_type.get(model_type)
        return entry[0]() if entry else None

    def for_config(self, config: Any) -> ArchitectureAdapter:
        """The adapter for a transformers config (or a plain dict with ``model_type``)."""
        model_type = (
            config.get("model_type")
            if isinstance(config, dict)
            else getattr(config, "model_type", None)
        )
        adapter = self.get(model_type) if isinstance(model_type, str) else None
        if adapter is None:
            raise ArchitectureError(self.unknown_message(model_type))
        if not isinstance(config, dict):
            adapter.check_config(config)
        return adapter

    def for_model(self, model: Any) -> ArchitectureAdapter:
        """The adapter for an instantiated transformers model."""
        config = getattr(model, "config", None)
        if config is None:
            raise ArchitectureError(
                f"{type(model).__name__} has no transformers config: makd works with "
                "transformers PreTrainedModel instances"
            )
        return self.for_config(config)

    def unknown_message(self, model_type: Any) -> str:
        supported = ", ".join(self.model_types()) or "none"
        return (
            f"no architecture adapter for model_type {model_type!r}; supported: {supported}. "
            f"To add one, write a plugin that implements makd_register_architectures "
            f"(see {ADAPTER_DOCS})"
        )


def make_architecture_registry(pm: Any = None) -> ArchitectureRegistry:
    """Collect every plugin's adapters; a plugin that fails is recorded, built-ins raise."""
    from ..plugins import make_plugin_manager, register_all

    pm = pm if pm is not None else make_plugin_manager()
    registry = ArchitectureRegistry()
    register_all(
        pm,
        "makd_register_architectures",
        registry.add,
        lambda model_type: registry.by_type.pop(model_type, None),
        registry.failures,
    )
    return registry
