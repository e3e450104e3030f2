"""Helpers for testing makd plugins (and makd itself) without installing anything.

* aspects (:mod:`.aspects`, re-exported here): ``plugin_for``, ``registry_with``,
  ``resolve``, ``diagnostics``, ``make_feature_set``, ``check_aspect_invariants``;
* architecture adapters (:mod:`makd_registry.testing.adapters`, needs transformers):
  ``tiny_config``, ``sample_batch``, ``check_adapter_capture``.

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

from .aspects import (
    check_aspect_invariants,
    diagnostics,
    feature_shape,
    make_feature_set,
    plugin_for,
    plugin_manager,
    registry_with,
    resolve,
)

__all__ = [
    "check_aspect_invariants",
    "diagnostics",
    "feature_shape",
    "make_feature_set",
    "plugin_for",
    "plugin_manager",
    "registry_with",
    "resolve",
]
