"""The aspect registry: every aspect class by name, with the plugin that registered it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .aspect import Aspect, check_aspect_class
from .errors import PluginConflictError, PluginError


@dataclass(frozen=True)
class PluginInfo:
    """A plugin known to the manager: its name, where it comes from, what it registered."""

    name: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    module: str | None = None


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be imported or whose registration hook raised."""

    plugin: str
    distribution: str | None
    stage: str  # "import" | "register" | "conflict"
    error: str

    def format(self) -> str:
        dist = f" (from {self.distribution})" if self.distribution else ""
        what = {
            "import": "failed to import",
            "register": "failed to register its aspects",
            "conflict": "conflicts with another plugin",
        }.get(self.stage, self.stage)
        return f"plugin '{self.plugin}'{dist} {what}: {self.error}"


@dataclass(frozen=True)
class AspectEntry:
    cls: type[Aspect]
    plugin: PluginInfo

    @property
    def name(self) -> str:
        return self.cls.name


@dataclass(frozen=True)
class ProviderEntry:
    provider: Any  # a makd_registry.providers.Provider
    plugin: PluginInfo


@dataclass(frozen=True)
class CallbackEntry:
    cls: Any  # a makd_registry.callbacks.Callback subclass
    plugin: PluginInfo


@dataclass
class AspectRegistry:
    """What one command's plugins registered: aspect classes by name, the providers of
    their requirements by kind, and callback classes by name; built by
    :func:`makd_registry.make_registry`."""

    entries: dict[str, AspectEntry] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)
    providers: dict[str, ProviderEntry] = field(default_factory=dict)
    callbacks: dict[str, CallbackEntry] = field(default_factory=dict)

    def add_callback(self, cls: Any, plugin: PluginInfo) -> list[str]:
        """Register a callback class (:class:`~makd_registry.callbacks.Callback`) by name."""
        from .callbacks import check_callback_class

        _check(check_callback_class, cls, plugin, "callback")
        return _claim(self.callbacks, cls.name, CallbackEntry(cls, plugin), "callback")

    def callback(self, name: str) -> Any | None:
        entry = self.callbacks.get(name)
        return entry.cls if entry else None

    def add_provider(self, provider: Any, plugin: PluginInfo) -> list[str]:
        """Register ``provider`` (a :class:`~makd_registry.providers.Provider` instance) for
        its ``kind``; two plugins providing one kind is a conflict."""
        from .providers import check_provider

        _check(check_provider, provider, plugin, "provider")
        return _claim(
            self.providers,
            provider.kind,
            ProviderEntry(provider, plugin),
            "requirement kind",
            "provided",
        )

    def provider(self, kind: str) -> Any | None:
        entry = self.providers.get(kind)
        return entry.provider if entry else None

    def add(self, cls: type[Aspect], plugin: PluginInfo) -> bool:
        """Register ``cls`` for ``plugin`` (False: it already was, by the same plugin);
        raises :class:`PluginError` on a bad class, :class:`PluginConflictError` on a clash."""
        try:
            check_aspect_class(cls)
        except TypeError as exc:
            raise PluginError(
                f"plugin '{plugin.name}' registered an invalid aspect: {exc}"
            ) from None
        existing = self.entries.get(cls.name)
        if existing is not None:
            if existing.cls is cls and existing.plugin.name == plugin.name:
                return False  # registered again by the same plugin: nothing new
            raise PluginConflictError(
                f"aspect '{cls.name}' is registered twice: by plugin '{existing.plugin.name}'"
                f"{_origin(existing.plugin)} ({_qual(existing.cls)}) and by plugin "
                f"'{plugin.name}'{_origin(plugin)} ({_qual(cls)})"
            )
        self.entries[cls.name] = AspectEntry(cls, plugin)
        return True

    def get(self, name: str) -> type[Aspect] | None:
        entry = self.entries.get(name)
        return entry.cls if entry else None

    def names(self) -> list[str]:
        return sorted(self.entries)

    def task_loss(self) -> type[Aspect]:
        """The aspect class registered as the task loss (``task_loss = True``)."""
        found = [e for e in self if e.cls.task_loss]
        if len(found) != 1:
            names = ", ".join(f"'{e.name}' (plugin '{e.plugin.name}')" for e in found)
            raise PluginError(
                "a teacher trained by makd needs exactly one aspect registered as the task "
                f"loss (task_loss = True); found {len(found)}{': ' + names if names else ''}"
            )
        return found[0].cls

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[AspectEntry]:
        return iter(self.entries[name] for name in self.names())

    def __len__(self) -> int:
        return len(self.entries)

    def failed_plugins(self) -> list[str]:
        return [f.plugin for f in self.failures]


def _check(check: Any, obj: Any, plugin: PluginInfo, what: str) -> None:
    try:
        check(obj)
    except TypeError as exc:
        raise PluginError(f"plugin '{plugin.name}' registered an invalid {what}: {exc}") from None


def _claim(
    table: dict[str, Any], key: str, entry: Any, what: str, verb: str = "registered"
) -> list[str]:
    """Put ``entry`` (with ``.plugin``) under ``key``; the keys to roll back if its plugin
    fails: none when the same plugin registered the same thing already, a
    :class:`PluginConflictError` naming both plugins when another one holds the key."""
    existing = table.get(key)
    if existing == entry:
        return []
    if existing is not None:
        raise PluginConflictError(
            f"{what} '{key}' is {verb} twice: by plugin '{existing.plugin.name}'"
            f"{_origin(existing.plugin)} and by plugin '{entry.plugin.name}'"
            f"{_origin(entry.plugin)}"
        )
    table[key] = entry
    return [key]


def _origin(plugin: PluginInfo) -> str:
    if plugin.builtin:
        return " (built-in)"
    if plugin.distribution:
        return f" (from {plugin.distribution} {plugin.version or ''})".replace(" )", ")")
    return ""


def _qual(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
