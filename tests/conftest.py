from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_env_plugin_switches(monkeypatch):
    """Tests decide themselves which plugins load."""
    monkeypatch.delenv("MAKD_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("MAKD_DISABLED_PLUGINS", raising=False)
