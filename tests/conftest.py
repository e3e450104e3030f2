from __future__ import annotations

import pytest

from makd_registry.testing import registry_with


@pytest.fixture(autouse=True)
def _no_env_plugin_switches(monkeypatch):
    """Tests decide themselves which plugins load."""
    monkeypatch.delenv("MAKD_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("MAKD_DISABLED_PLUGINS", raising=False)


@pytest.fixture
def registry():
    """A fresh registry: built-ins plus installed entry-point plugins (the example plugin)."""
    return registry_with(entrypoints=True)
