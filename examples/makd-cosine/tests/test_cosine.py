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


def test_the_unit_testing_example_of_the_plugin_guide():
    """docs/plugins.md, "Unit-testing the loss", as written there."""
    from makd_registry import ModelInfo
    from makd_registry.testing import check_aspect_invariants, make_feature_set

    registry = registry_with(HiddenCosine)
    aspect = resolve("objective: {type: hidden_cosine, layers: [[0, 1]]}", registry).root
    teacher = ModelInfo(num_layers=2, hidden_size=8, num_heads=2)
    student = ModelInfo(num_layers=1, hidden_size=8, num_heads=2)
    aspect.build(teacher, student)

    h_t = torch.randn(2, 5, 8)
    features = FeatureSet(
        teacher_features={(Feature.HIDDEN, 1): h_t},
        student_features={(Feature.HIDDEN, 0): 3.0 * h_t},
        attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    )
    assert aspect.loss(features).item() < 1e-6

    random = make_feature_set(aspect, teacher, student, batch=3, seq=6)
    assert random.student(Feature.HIDDEN, 0).shape == (3, 6, 8)
    check_aspect_invariants(aspect, teacher, student)


def test_attention_probabilities_hold_exact_zeros_at_masked_keys():
    """docs/plugins.md, "Attention at masked keys"."""
    from makd_registry.losses import MASK_VALUE, attention_log_probs

    q, k = torch.randn(2, 2, 4, 3), torch.randn(2, 2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    logp = attention_log_probs(q, k, attention_mask=mask)
    assert (logp[0, :, :, 3] == MASK_VALUE).all() and torch.isfinite(logp).all()
    assert (logp.exp()[0, :, :, 3] == 0).all()
    causal = attention_log_probs(q, k, attention_mask=mask, causal=True).exp()
    assert (causal.triu(1) == 0).all()
