"""Helpers for testing makd plugins (and makd itself) without installing anything.

Third-party aspect authors can use these in their own test suites::

    from makd_registry.testing import registry_with, resolve

    def test_my_aspect_validates():
        registry = registry_with(MyAspect)
        resolved = resolve('''
        teacher: {config: {num_hidden_layers: 4}}
        student: {config: {num_hidden_layers: 2}}
        objective: {type: my_aspect, layers: uniform}
        ''', registry)
        assert resolved.root.pairs == ((0, 1), (1, 3))
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from . import hookimpl
from .aspect import Aspect
from .errors import Diagnostic, ObjectiveError
from .objective import ResolvedObjective, resolve_text
from .plugins import MakdPluginManager, make_plugin_manager, make_registry
from .registry import AspectRegistry


def plugin_for(*aspects: type[Aspect], name: str = "test-plugin") -> Any:
    """A plugin object whose ``makd_register_aspects`` registers ``aspects``."""

    @hookimpl
    def makd_register_aspects(register: Any) -> None:
        for cls in aspects:
            register(cls)

    return SimpleNamespace(__name__=name, makd_register_aspects=makd_register_aspects)


def plugin_manager(*plugins: Any, entrypoints: bool = False) -> MakdPluginManager:
    """A fresh manager with the built-ins and ``plugins``; no entry points by default."""
    return make_plugin_manager(plugins, entrypoints=entrypoints)


def registry_with(
    *aspects: type[Aspect], plugins: Iterable[Any] = (), entrypoints: bool = False
) -> AspectRegistry:
    """A registry with the built-in aspects plus ``aspects`` (as one test plugin)."""
    extra = list(plugins)
    if aspects:
        extra.append(plugin_for(*aspects))
    return make_registry(plugin_manager(*extra, entrypoints=entrypoints))


def resolve(
    text: str, registry: AspectRegistry, *, file: str = "test.yaml", base_dir: Path | None = None
) -> ResolvedObjective:
    """Validate and resolve objective YAML text (dedented) against ``registry``."""
    return resolve_text(textwrap.dedent(text), file, registry, base_dir=base_dir)


def diagnostics(text: str, registry: AspectRegistry, **kwargs: Any) -> list[Diagnostic]:
    """The diagnostics objective YAML text produces; ``AssertionError`` if it is valid."""
    try:
        resolve(text, registry, **kwargs)
    except ObjectiveError as exc:
        return exc.diagnostics
    raise AssertionError("the objective was expected to be invalid, but it validated")
