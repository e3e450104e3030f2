"""Every hook is documented, in its docstring and in the plugin guide."""

from __future__ import annotations

import inspect
from pathlib import Path

from makd_registry import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def _hooks():
    return [
        (name, fn)
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("makd_")
    ]


def test_there_are_hooks_and_all_are_marked_as_specs():
    hooks = _hooks()
    assert hooks
    for name, fn in hooks:
        assert hasattr(fn, "makd_spec"), f"{name} lacks @hookspec"


def test_every_hook_has_a_substantial_docstring():
    for name, fn in _hooks():
        doc = inspect.getdoc(fn) or ""
        assert len(doc.split()) >= 20, f"hook {name} is not documented"


def test_every_hook_is_in_the_plugin_guide():
    text = DOCS.read_text(encoding="utf-8")
    for name, _ in _hooks():
        assert f"`{name}" in text, f"docs/plugins.md does not document {name}"
