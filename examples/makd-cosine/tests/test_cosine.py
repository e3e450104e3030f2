"""Tests of the example plugin, written the way docs/plugins.md tells plugin authors to."""

from __future__ import annotations

import torch
from makd_cosine import HiddenCosine

from makd_registry import Feature, FeatureSet
from makd_registry.testing import diagnostics, registry_with, resolve


def test_hidden_cosine_resolves_uniform_pairs():
    registry = registry_with(HiddenCosine)  # built-ins + the aspect, no entry points
    resolved = resolve(
        """
        teacher: {config: {num_hidden_layers: 6}}
        student: {config: {num_hidden_layers: 2}}
        objective: {type: hidden_cosine, layers: uniform}
        """,
        registry,
    )
    assert resolved.root.pairs == ((0, 2), (1, 5))


def test_bad_eps_is_located():
    (diag,) = diagnostics(
        "objective: {type: hidden_cosine, layers: last, eps: 0}", registry_with(HiddenCosine)
    )
    assert (diag.line, diag.column, diag.path) == (1, 53, "objective.eps")


def _features(h_s, h_t, mask):
    return FeatureSet(
        teacher_features={(Feature.HIDDEN, 1): h_t},
        student_features={(Feature.HIDDEN, 0): h_s},
        attention_mask=mask,
    )


def test_cosine_is_zero_for_parallel_states_and_ignores_padding():
    aspect = resolve(
        "objective: {type: hidden_cosine, layers: [[0, 1]]}", registry_with(HiddenCosine)
    ).root
    h_t = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    parallel = 3.0 * h_t
    assert aspect.loss(_features(parallel, h_t, mask)).item() < 1e-6

    opposite = -h_t
    assert abs(aspect.loss(_features(opposite, h_t, mask)).item() - 2.0) < 1e-5

    noisy = parallel.clone()
    noisy[0, 3:] = torch.randn(2, 8) * 1e3  # padded positions
    assert aspect.loss(_features(noisy, h_t, mask)).item() < 1e-6
