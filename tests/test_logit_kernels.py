"""The blocked logit kernels (KD and CE): equal to plain autograd references in value and
gradient for every mask shape, and they read rows as slices, never gathering them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from makd_registry import losses
from makd_registry.losses import (
    cross_entropy,
    kd_divergence,
    next_token_cross_entropy,
    shift_for_causal_lm,
)

MASKS = {
    "all": lambda b, t: torch.ones(b, t, dtype=torch.bool),
    "prefix": lambda b, t: torch.arange(t)[None, :] < torch.tensor([t, t - 2, 3])[:b, None],
    "scattered": lambda b, t: torch.rand(b, t, generator=torch.Generator().manual_seed(3)) > 0.4,
    "none-valid": lambda b, t: torch.zeros(b, t, dtype=torch.bool),
}


@pytest.fixture(params=[None, 64], ids=["default-blocks", "tiny-blocks"])
def blocks(request, monkeypatch):
    """Tiny blocks force many blocks per run and runs split across blocks."""
    if request.param:
        monkeypatch.setattr(losses, "_BLOCK_BYTES", request.param)
    return request.param


def _logits(b, t, v, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, v, generator=gen) * 3


def _poison(x, valid):
    """Excluded rows hold nan: they must not reach the value or the gradient."""
    return torch.where(valid[..., None], x, torch.full_like(x, float("nan")))


def _reference_kd(s, t, valid, tau, reverse):
    ls = F.log_softmax(s[valid] / tau, -1)
    lt = F.log_softmax(t[valid] / tau, -1)
    a, b = (ls, lt) if reverse else (lt, ls)
    rows = (a.exp() * (a - b)).sum(-1)
    return rows.sum() * tau**2 / max(int(valid.sum()), 1)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_kd_matches_autograd_for_every_mask(blocks, mask, tau, kind):
    valid = MASKS[mask](3, 7)
    s = _poison(_logits(3, 7, 11, 0), valid).requires_grad_(True)
    t = _poison(_logits(3, 7, 11, 1), valid)
    got = kd_divergence(s, t, temperature=tau, kind=kind, mask=valid)
    got.backward()
    ref_s = s.detach().clone().requires_grad_(True)
    want = _reference_kd(ref_s, t, valid, tau, kind == "reverse")
    if valid.any():
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            s.grad, torch.nan_to_num(ref_s.grad, nan=0.0), rtol=1e-5, atol=1e-7
        )
    else:
        assert float(got.detach()) == 0.0 and torch.equal(s.grad, torch.zeros_like(s))
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("mask", list(MASKS))
def test_cross_entropy_matches_autograd_for_every_mask(blocks, mask):
    valid = MASKS[mask](3, 7)
    labels = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(5))
    labels[0, 1] = -100  # an ignored label inside a valid run
    x = _poison(_logits(3, 7, 11, 2), valid).requires_grad_(True)
    got = cross_entropy(x, labels, valid)
    got.backward()
    keep = valid & (labels != -100)
    ref = x.detach().clone().requires_grad_(True)
    if keep.any():
        want = F.cross_entropy(ref[keep], labels[keep], reduction="mean")
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            x.grad, torch.nan_to_num(ref.grad, nan=0.0), atol=1e-7, rtol=1e-5
        )
    else:
        assert float(got.detach()) == 0.0
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[~keep], torch.zeros_like(x.grad[~keep]))


@pytest.mark.parametrize("mask", ["all", "prefix", "scattered"])
def test_next_token_cross_entropy_equals_ce_on_shifted_logits(blocks, mask):
    valid = MASKS[mask](3, 7)
    labels = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(6))
    x = _logits(3, 7, 11, 4).requires_grad_(True)
    got = next_token_cross_entropy(x, labels, valid)
    got.backward()
    ref = x.detach().clone().requires_grad_(True)
    shifted, targets, m = shift_for_causal_lm(ref, labels, valid)
    want = cross_entropy(shifted, targets, m)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-6, atol=1e-8)
    assert torch.equal(x.grad[:, -1], torch.zeros_like(x.grad[:, -1]))  # no next token


def test_per_example_ce_and_kd_match_references():
    s = torch.randn(5, 3, requires_grad=True)
    t = torch.randn(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(cross_entropy(s, y), F.cross_entropy(s, y))
    got = kd_divergence(s, t, temperature=2.0)
    want = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True,
                    reduction="batchmean") * 4  # fmt: skip
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got, s)
    (g2,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(g1, g2)


def _ops(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("mask", ["all", "prefix"])
def test_logit_rows_are_sliced_not_gathered(mask):
    valid = MASKS[mask](3, 64)
    s = _logits(3, 64, 301, 7).requires_grad_(True)
    t = _logits(3, 64, 301, 8)
    labels = torch.randint(0, 301, (3, 64))

    def step():
        loss = kd_divergence(s, t, mask=valid, chunk_size=16) + next_token_cross_entropy(
            s, labels, valid
        )
        loss = loss + cross_entropy(s, labels, valid)
        loss.backward()

    ops = _ops(step)
    gathers = {"aten::index_select", "aten::index", "aten::index_put_", "aten::_index_put_impl_"}
    assert not ops & gathers, ops & gathers
    assert "aten::index_copy_" not in ops


def test_a_second_backward_through_a_fused_kernel_is_refused():
    x = torch.randn(4, 6, requires_grad=True)
    out = cross_entropy(x, torch.tensor([1, 2, 3, 0]))
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used by a backward"):
        out.backward()
