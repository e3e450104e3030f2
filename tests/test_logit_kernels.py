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


# -- a top-k teacher (the teacher cache's top_k) --------------------------------------------


def _reference_top_k_kd(s, values, ids, valid, tau):
    """Forward KL from the teacher's top-k renormalised, by plain autograd."""
    ls = F.log_softmax(s[valid] / tau, -1)
    lt = F.log_softmax(values[valid] / tau, -1)
    rows = (lt.exp() * (lt - ls.gather(-1, ids[valid]))).sum(-1)
    return rows.sum() * tau**2 / max(int(valid.sum()), 1)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_top_k_kd_matches_autograd_for_every_mask(blocks, mask, tau):
    valid = MASKS[mask](3, 7)
    s = _poison(_logits(3, 7, 23, 0), valid).requires_grad_(True)
    values, ids = _logits(3, 7, 23, 1).topk(5, dim=-1)
    got = kd_divergence(s, values, teacher_indices=ids, temperature=tau, mask=valid)
    got.backward()
    ref_s = s.detach().clone().requires_grad_(True)
    want = _reference_top_k_kd(ref_s, values, ids, valid, tau)
    if valid.any():
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            s.grad, torch.nan_to_num(ref_s.grad, nan=0.0), rtol=1e-5, atol=1e-7
        )
    else:
        assert float(got.detach()) == 0.0 and torch.equal(s.grad, torch.zeros_like(s))
    with torch.no_grad():  # the no-grad path gives the same value
        again = kd_divergence(s, values, teacher_indices=ids, temperature=tau, mask=valid)
    torch.testing.assert_close(again, got.detach())


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_top_k_kd_with_k_equal_to_the_vocabulary_is_full_kd(tau):
    valid = MASKS["scattered"](3, 7)
    t = _logits(3, 7, 19, 1)
    values, ids = t.topk(19, dim=-1)
    grads = []
    for kwargs in ({"teacher_indices": ids}, {}):
        s = _logits(3, 7, 19, 0).requires_grad_(True)
        teacher = values if kwargs else t
        loss = kd_divergence(s, teacher, temperature=tau, mask=valid, **kwargs)
        loss.backward()
        grads.append((loss.detach(), s.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["reverse", "jsd"])
def test_top_k_reverse_and_jsd_use_the_dense_form(kind):
    t = _logits(2, 5, 17, 1)
    values, ids = t.topk(4, dim=-1)
    dense = torch.full_like(t, -1e4).scatter_(-1, ids, values)
    s = _logits(2, 5, 17, 0)
    got = kd_divergence(s, values, teacher_indices=ids, kind=kind)
    torch.testing.assert_close(got, kd_divergence(s, dense, kind=kind))


def test_top_k_kd_reads_only_k_teacher_entries_per_row():
    """No teacher row of V: the only full-width passes are the student's."""
    s = _logits(2, 32, 4001, 0).requires_grad_(True)
    values, ids = _logits(2, 32, 4001, 1).topk(16, dim=-1)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        kd_divergence(s, values, teacher_indices=ids).backward()
    wide = [
        e.key
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key == "aten::_log_softmax" and any(4001 in shape for shape in e.input_shapes if shape)
    ]
    assert len(wide) == 1  # the student's log-softmax, one entry per input shape
    assert not {e.key for e in prof.key_averages()} & {"aten::full", "aten::index_select"}


@pytest.mark.parametrize(
    ("values", "ids", "match"),
    [
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 5, dtype=torch.long), "same shape"),
        (torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), "all but the last"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), "integer token ids"),
        (torch.zeros(2, 3, 4), torch.full((2, 3, 4), 9), r"lie in \[0, 9\)"),
        (torch.zeros(2, 3, 10), torch.zeros(2, 3, 10, dtype=torch.long), "k must be in"),
    ],
)
def test_top_k_kd_refuses_inconsistent_inputs(values, ids, match):
    with pytest.raises(ValueError, match=match):
        kd_divergence(torch.zeros(2, 3, 9), values, teacher_indices=ids)


# -- KD and CE in one pass -----------------------------------------------------------------


def _separate(s, t, labels, valid, tau, kind, next_token, ids=None):
    kd = kd_divergence(s, t, temperature=tau, kind=kind, mask=valid, teacher_indices=ids)
    ce_fn = next_token_cross_entropy if next_token else cross_entropy
    return kd, ce_fn(s, labels, valid)


@pytest.mark.parametrize("mask", ["all", "prefix", "scattered", "none-valid"])
@pytest.mark.parametrize(("tau", "kind"), [(1.0, "forward"), (2.0, "forward"), (1.0, "reverse")])
@pytest.mark.parametrize("next_token", [True, False])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 2.0), (1.0, None), (None, 1.0)])
def test_kd_and_ce_in_one_pass_equal_the_two_separately(
    blocks, mask, tau, kind, next_token, weights
):
    """Values and gradients, for any weighting of the two outputs (None: output unused)."""
    valid = MASKS[mask](3, 7)
    t = _logits(3, 7, 13, 1)
    labels = torch.randint(0, 13, (3, 7), generator=torch.Generator().manual_seed(2))
    results = []
    for joint in (True, False):
        s = _logits(3, 7, 13, 0).requires_grad_(True)
        if joint:
            kd, ce = losses.kd_and_cross_entropy(
                s, t, labels, next_token=next_token, temperature=tau, kind=kind, mask=valid
            )
        else:
            kd, ce = _separate(s, t, labels, valid, tau, kind, next_token)
        loss = sum(w * x for w, x in zip(weights, (kd, ce), strict=True) if w is not None)
        loss.backward()
        results.append((kd.detach(), ce.detach(), s.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    if valid.any():
        assert results[0][2].abs().max() > 0


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kd_and_ce_in_one_pass_with_a_top_k_teacher(blocks, tau):
    valid = MASKS["prefix"](3, 7)
    values, ids = _logits(3, 7, 29, 1).topk(6, dim=-1)
    labels = torch.randint(0, 29, (3, 7), generator=torch.Generator().manual_seed(2))
    results = []
    for joint in (True, False):
        s = _logits(3, 7, 29, 0).requires_grad_(True)
        if joint:
            kd, ce = losses.kd_and_cross_entropy(
                s,
                values,
                labels,
                next_token=True,
                temperature=tau,
                mask=valid,
                teacher_indices=ids,
            )
        else:
            kd, ce = _separate(s, values, labels, valid, tau, "forward", True, ids)
        (kd + 0.5 * ce).backward()
        results.append((kd.detach(), ce.detach(), s.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_kd_and_ce_keep_one_full_size_buffer_and_no_second_log_softmax():
    s = _logits(2, 16, 3001, 0).requires_grad_(True)
    t = _logits(2, 16, 3001, 1)
    labels = torch.randint(0, 3001, (2, 16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda x: saved.append(tuple(x.shape)) or x, lambda x: x
    ):
        kd, ce = losses.kd_and_cross_entropy(s, t, labels, next_token=True)
    full = [shape for shape in saved if shape == (32, 3001)]
    assert len(full) == 2  # the gradient buffer and the student's logits (no copy of either)
    assert len(saved) == 3  # and the targets
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        kd, ce = losses.kd_and_cross_entropy(s, t, labels, next_token=True)
        (kd + ce).backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    wide_adds = [
        e.key
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key == "aten::add" and any(shape and shape[-1] == 3001 for shape in e.input_shapes)
    ]
    # one log-softmax each for the student and the teacher (one block each); the CE's
    # softmax in backward, once per run of its rows (each sequence but its last position)
    assert counts.get("aten::_log_softmax", 0) == 2 and counts.get("aten::_softmax", 0) == 2
    assert not wide_adds  # autograd never sums two full-size gradients


def test_kd_and_ce_refuse_a_second_backward_and_bad_labels():
    s = _logits(2, 5, 11, 0).requires_grad_(True)
    t = _logits(2, 5, 11, 1)
    kd, ce = losses.kd_and_cross_entropy(s, t, torch.zeros(2, 5, dtype=torch.long), next_token=True)
    (kd + ce).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used by a backward|modified by an inplace"):
        (kd + ce).backward()
    with pytest.raises(ValueError, match="labels"):
        losses.kd_and_cross_entropy(s, t, torch.zeros(2, 4, dtype=torch.long), next_token=True)


# -- a top-k teacher with its residual mass as one bucket -------------------------------------


def _bucket_reference(s, t_full, ids, valid):
    """KL between the bucketed distributions (the top-k support plus one bucket holding the
    rest), the teacher's from its full logits, by plain autograd."""
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t_full, -1)
    off = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
    ls_rest = torch.logsumexp(ls.masked_fill(~off, float("-inf")), -1)
    lt_rest = torch.logsumexp(lt.masked_fill(~off, float("-inf")), -1)
    lt_s, ls_s = lt.gather(-1, ids), ls.gather(-1, ids)
    rows = (lt_s.exp() * (lt_s - ls_s)).sum(-1)
    rows = rows + torch.where(lt_rest > float("-inf"), lt_rest.exp() * (lt_rest - ls_rest), 0.0)
    return rows[valid].sum() / max(int(valid.sum()), 1)


def _residual(t_full, ids):
    rest = t_full.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return rest - t_full.logsumexp(-1)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("k", [1, 5, 23])
def test_top_k_kd_with_a_residual_bucket_matches_autograd(blocks, mask, k):
    valid = MASKS[mask](3, 7)
    t_full = _logits(3, 7, 23, 1)
    values, ids = t_full.topk(k, dim=-1)
    residual = _residual(t_full, ids)
    s = _poison(_logits(3, 7, 23, 0), valid).requires_grad_(True)
    got = kd_divergence(s, values, teacher_indices=ids, teacher_log_residual=residual, mask=valid)
    got.backward()
    ref_s = s.detach().clone().requires_grad_(True)
    if valid.any():
        want = _bucket_reference(ref_s, t_full, ids, valid)
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            s.grad, torch.nan_to_num(ref_s.grad, nan=0.0), rtol=1e-5, atol=1e-7
        )
    else:
        assert float(got.detach()) == 0.0 and torch.equal(s.grad, torch.zeros_like(s))
    with torch.no_grad():
        again = kd_divergence(
            s, values, teacher_indices=ids, teacher_log_residual=residual, mask=valid
        )
    torch.testing.assert_close(again, got.detach())
    if k == 23:  # k = V: no residual left, the full KD
        torch.testing.assert_close(got.detach(), kd_divergence(s, t_full, mask=valid).detach())


def test_the_residual_bucket_grows_to_full_kd_as_k_grows():
    """Merging outcomes never increases a KL (data processing): with nested supports the
    bucketed KD rises with k and reaches the full KD at k = V."""
    t_full = _logits(2, 6, 50, 1)
    s = _logits(2, 6, 50, 0)
    values = []
    for k in (1, 5, 20, 49, 50):
        top, ids = t_full.topk(k, dim=-1)
        residual = _residual(t_full, ids)
        values.append(
            float(kd_divergence(s, top, teacher_indices=ids, teacher_log_residual=residual))
        )
    assert all(a <= b + 1e-5 for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(float(kd_divergence(s, t_full)), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher_indices": None}, "needs a top-k teacher"),
        ({"teacher_log_residual": torch.zeros(2, 4)}, "must have shape"),
        ({"temperature": 2.0}, "temperature 1"),
        ({"kind": "reverse"}, "forward KL"),
    ],
)
def test_a_residual_bucket_refuses_what_it_cannot_mean(kwargs, match):
    values, ids = _logits(2, 3, 9, 1).topk(4, dim=-1)
    args = {"teacher_indices": ids, "teacher_log_residual": torch.full((2, 3), -1.0), **kwargs}
    with pytest.raises(ValueError, match=match):
        kd_divergence(_logits(2, 3, 9, 0), values, **args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["forward", "reverse", "top-k", "bucket", "kd+ce"])
def test_half_precision_student_logits_get_fp32_math(blocks, dtype, form):
    """Under bf16 autocast the logits are bf16: the kernels compute in fp32 (same value as
    fp32 on the same rounded logits) and return a gradient of the logits' dtype."""
    t_full = _logits(2, 5, 40, 1)
    values, ids = t_full.topk(6, dim=-1)
    labels = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    valid = MASKS["scattered"](2, 5)
    results = []
    for d in (torch.float32, dtype):
        s = _logits(2, 5, 40, 0).to(dtype).to(d).requires_grad_(True)  # the same values
        if form in ("forward", "reverse"):
            loss = kd_divergence(s, t_full, kind=form, mask=valid)
        elif form == "top-k":
            loss = kd_divergence(s, values, teacher_indices=ids, mask=valid)
        elif form == "bucket":
            residual = _residual(t_full, ids)
            loss = kd_divergence(
                s, values, teacher_indices=ids, teacher_log_residual=residual, mask=valid
            )
        else:
            kd, ce = losses.kd_and_cross_entropy(
                s, values, labels, next_token=True, mask=valid, teacher_indices=ids
            )
            loss = kd + ce
        loss.backward()
        results.append((loss.detach(), s.grad))
    (v32, g32), (vh, gh) = results
    assert gh.dtype == dtype
    torch.testing.assert_close(vh, v32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.float(), g32, rtol=1e-2, atol=1e-3)
