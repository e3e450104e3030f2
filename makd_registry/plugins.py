"""Building the plugin manager and the aspect registry.

Nothing here runs at import time: :func:`make_plugin_manager` is called by each command
that needs plugins (and by tests, with ``extra`` plugins and ``entrypoints=False``).

Environment variables:

``MAKD_DISABLE_PLUGIN_AUTOLOAD``
    When set to a non-empty value other than ``0``, no entry-point (third-party) plugin
    is loaded; built-ins and ``extra`` plugins still are.
``MAKD_DISABLED_PLUGINS``
    Comma-separated entry-point or distribution names to skip.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginConflictError, PluginError
from .registry import AspectRegistry, PluginFailure, PluginInfo

ENTRYPOINT_GROUP = "makd"
DISTRIBUTION = "makd"
DISABLE_AUTOLOAD_ENV = "MAKD_DISABLE_PLUGIN_AUTOLOAD"
DISABLED_PLUGINS_ENV = "MAKD_DISABLED_PLUGINS"

#: Modules registered before any third-party plugin, through the same hooks.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "makd_plugins.combinators",
    "makd_plugins.attention_kl",
    "makd_plugins.hidden_mse",
    "makd_plugins.matrix",
    "makd_plugins.logits_kd",
    "makd_plugins.seqkd",
    "makd_plugins.gkd",
    "makd_plugins.architectures",
)


class MakdPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from and what failed."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.failures: list[PluginFailure] = []

    def add_plugin(self, plugin: Any, info: PluginInfo) -> bool:
        """Register ``plugin`` under ``info.name``; record a failure instead of raising."""
        try:
            self.register(plugin, name=info.name)
        except Exception as exc:  # pluggy validation errors, duplicate plugin objects
            self.failures.append(
                PluginFailure(info.name, info.distribution, "register", _describe(exc))
            )
            return False
        unknown = self._unknown_hooks(plugin)
        if unknown:
            self.unregister(plugin)
            known = ", ".join(sorted(_spec_names()))
            self.failures.append(
                PluginFailure(
                    info.name,
                    info.distribution,
                    "register",
                    f"implements unknown hook(s) {', '.join(unknown)} (known hooks: {known})",
                )
            )
            return False
        self.infos[info.name] = info
        return True

    def _unknown_hooks(self, plugin: Any) -> list[str]:
        out = []
        for caller in self.get_hookcallers(plugin) or []:
            if caller.spec is None:
                impls = [i for i in caller.get_hookimpls() if i.plugin is plugin]
                if any(not i.optionalhook for i in impls):
                    out.append(caller.name)
        return sorted(out)


def _spec_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("makd_")]


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    tb = traceback.extract_tb(exc.__traceback__)
    if tb:
        last = tb[-1]
        text += f" (at {last.filename}:{last.lineno})"
    return text


def _env_disabled() -> tuple[bool, set[str]]:
    flag = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip()
    disabled_all = flag not in ("", "0", "false", "False", "no")
    names = {n.strip() for n in os.environ.get(DISABLED_PLUGINS_ENV, "").split(",") if n.strip()}
    return disabled_all, names


def _builtin_version() -> str | None:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def make_plugin_manager(
    extra: Iterable[Any] = (), *, entrypoints: bool | None = None
) -> MakdPluginManager:
    """Build a fresh plugin manager: built-ins, then ``extra``, then entry points.

    ``entrypoints=None`` loads entry-point plugins unless ``MAKD_DISABLE_PLUGIN_AUTOLOAD``
    is set; ``False`` never loads them (hermetic tests). A plugin that fails to import or
    register is recorded in ``pm.failures`` and skipped; built-in failures raise.
    """
    pm = MakdPluginManager()
    version = _builtin_version()
    for modname in BUILTIN_PLUGINS:
        module = importlib.import_module(modname)
        info = PluginInfo(modname, DISTRIBUTION, version, builtin=True, module=modname)
        if not pm.add_plugin(module, info):
            raise PluginError(pm.failures[-1].format())
    for index, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or f"extra-{index}"
        module = getattr(plugin, "__module__", None) if not isinstance(plugin, type) else None
        pm.add_plugin(plugin, PluginInfo(name, None, None, module=module or name))

    disabled_all, disabled = _env_disabled()
    if entrypoints is None:
        entrypoints = not disabled_all
    if entrypoints:
        _load_entrypoints(pm, disabled)
    pm.check_pending()
    return pm


def _load_entrypoints(pm: MakdPluginManager, disabled: set[str]) -> None:
    seen: set[str] = set()
    for ep in metadata.entry_points(group=ENTRYPOINT_GROUP):
        if ep.name in seen:
            continue  # the same distribution found twice on sys.path
        seen.add(ep.name)
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        if ep.name in disabled or (dist is not None and dist in disabled):
            continue
        if pm.get_plugin(ep.name) is not None or ep.name in pm.infos:
            pm.failures.append(
                PluginFailure(ep.name, dist, "register", "a plugin of that name is already loaded")
            )
            continue
        try:
            plugin = ep.load()
        except BaseException as exc:  # noqa: BLE001 - a plugin may raise anything on import
            if isinstance(exc, KeyboardInterrupt):
                raise
            pm.failures.append(PluginFailure(ep.name, dist, "import", _describe(exc)))
            continue
        pm.add_plugin(plugin, PluginInfo(ep.name, dist, version, module=ep.value))


def register_all(
    pm: MakdPluginManager,
    hook: str,
    add: Callable[[Any, PluginInfo], list[Any]],
    remove: Callable[[Any], Any],
    failures: list[PluginFailure],
) -> None:
    """Run every plugin's registration ``hook`` on its own, with ``register(obj)`` calling
    ``add(obj, plugin) -> keys``. The one isolation routine of every registry: a plugin
    whose hook raises has its partial registrations rolled back (``remove(key)``) and is
    recorded in ``failures`` (stage ``conflict`` for a :class:`PluginConflictError`, else
    ``register``); a built-in's failure raises, except a conflict (the third party's fault)."""
    for impl in getattr(pm.hook, hook).get_hookimpls():
        info = pm.infos.get(impl.plugin_name) or PluginInfo(impl.plugin_name)
        added: list[Any] = []

        def register(obj: Any, _info: PluginInfo = info, _added: list[Any] = added) -> None:
            _added.extend(add(obj, _info))

        kwargs = {"register": register}
        try:
            impl.function(*[kwargs[name] for name in impl.argnames])
        except BaseException as exc:  # noqa: BLE001 - a plugin may raise anything
            if isinstance(exc, KeyboardInterrupt):
                raise
            for key in added:
                remove(key)
            conflict = isinstance(exc, PluginConflictError)
            if info.builtin and not conflict:
                raise
            message = str(exc) if isinstance(exc, PluginError) else _describe(exc)
            stage = "conflict" if conflict else "register"
            failures.append(PluginFailure(info.name, info.distribution, stage, message))


def make_registry(pm: MakdPluginManager | None = None, *, strict: bool = True) -> AspectRegistry:
    """Collect every plugin's aspects, requirement providers and callbacks into an
    :class:`AspectRegistry` (through :func:`register_all`). Two plugins registering one
    name is a conflict: with ``strict`` it raises :class:`PluginConflictError` naming both;
    otherwise it is recorded in ``registry.failures``.
    """
    pm = pm if pm is not None else make_plugin_manager()
    registry = AspectRegistry(plugins=list(pm.infos.values()), failures=list(pm.failures))

    def add_aspect(cls: Any, info: PluginInfo) -> list[str]:
        return [cls.name] if registry.add(cls, info) else []

    register_all(
        pm,
        "makd_register_aspects",
        add_aspect,
        lambda name: registry.entries.pop(name, None),
        registry.failures,
    )
    register_all(
        pm,
        "makd_register_providers",
        registry.add_provider,
        lambda kind: registry.providers.pop(kind, None),
        registry.failures,
    )
    register_all(
        pm,
        "makd_register_callbacks",
        registry.add_callback,
        lambda name: registry.callbacks.pop(name, None),
        registry.failures,
    )
    conflicts = [f for f in registry.failures if f.stage == "conflict"]
    if strict and conflicts:
        raise PluginConflictError("\n".join(f.error for f in conflicts))
    return registry


@dataclass
class PluginSet:
    """Everything one command's plugins registered, loaded once: aspects, requirement
    providers and callbacks (``registry``) and architecture adapters (``architectures``),
    all through :func:`register_all`."""

    manager: MakdPluginManager
    registry: AspectRegistry
    architectures: Any  # makd_registry.models.registry.ArchitectureRegistry

    @property
    def failures(self) -> list[PluginFailure]:
        """Every plugin failure of the command (import, registration, conflict), once."""
        out: list[PluginFailure] = []
        for failure in [*self.registry.failures, *self.architectures.failures]:
            if failure not in out:
                out.append(failure)
        return out


def load_plugins(
    *, strict: bool = True, extra: Iterable[Any] = (), entrypoints: bool | None = None
) -> PluginSet:
    """The plugin set of one command: one plugin manager, every registry built from it."""
    from .models.registry import make_architecture_registry

    pm = make_plugin_manager(extra, entrypoints=entrypoints)
    return PluginSet(pm, make_registry(pm, strict=strict), make_architecture_registry(pm))
