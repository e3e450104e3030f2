"""Tests of makd_registry.losses: golden values against explicit loops, and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from makd_registry import losses as L
from makd_registry.losses import (
    MASK_VALUE,
    attention_kl,
    attention_log_probs,
    cross_entropy,
    hidden_mse,
    kd_divergence,
    masked_mean,
    probs_to_log_probs,
    relation_log_probs,
    shift_for_causal_lm,
)

F64 = torch.float64
PROPS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
KINDS = ("forward", "reverse", "jsd")


# ============================================================================================
# Independent reference computations (explicit Python loops over batch / head / token)
# ============================================================================================


def _valid(mask, b, t) -> bool:
    return mask is None or bool(mask[b][t])


def ref_attention_probs(q, k, mask=None, causal=False, scale=None, temperature=1.0):
    """(B, H, T, T) float64 probabilities; key head of query head h is h // (H / Hkv)."""
    n_b, n_h, n_t, d = q.shape
    rep = n_h // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(n_b, n_h, n_t, n_t, dtype=F64)
    for b in range(n_b):
        for h in range(n_h):
            g = h // rep
            for i in range(n_t):
                allowed = [j for j in range(n_t) if _valid(mask, b, j) and (not causal or j <= i)]
                if not allowed:
                    continue
                scores = {}
                for j in allowed:
                    dot = sum(float(q[b, h, i, c]) * float(k[b, g, j, c]) for c in range(d))
                    scores[j] = dot * scale / temperature
                top = max(scores.values())
                z = sum(math.exp(s - top) for s in scores.values())
                for j in allowed:
                    out[b, h, i, j] = math.exp(scores[j] - top) / z
    return out


def ref_attention_kl(p_t, p_s, mask=None, direction="forward"):
    """Average over heads and valid queries of the per-row KL over keys."""
    n_b, n_h, n_t, _ = p_t.shape
    total, n_queries = 0.0, 0
    for b in range(n_b):
        for i in range(n_t):
            if not _valid(mask, b, i):
                continue
            n_queries += 1
            for h in range(n_h):
                for j in range(n_t):
                    if not _valid(mask, b, j):
                        continue
                    a, c = float(p_t[b, h, i, j]), float(p_s[b, h, i, j])
                    if direction == "reverse":
                        a, c = c, a
                    if a > 0:
                        total += a * math.log(a / c)
    return total / (n_h * n_queries) if n_queries else 0.0


def ref_softmax(row, temperature=1.0):
    vals = [float(v) / temperature for v in row]
    top = max(vals)
    exps = [math.exp(v - top) for v in vals]
    z = sum(exps)
    return [e / z for e in exps]


def ref_log_softmax(row):
    vals = [float(v) for v in row]
    top = max(vals)
    log_z = top + math.log(sum(math.exp(v - top) for v in vals))
    return [v - log_z for v in vals]


def ref_kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def ref_kd(student, teacher, temperature=1.0, kind="forward", beta=0.5, mask=None):
    """Loops over examples (B, C) or tokens (B, T, V)."""
    rows = []
    if student.dim() == 2:
        for b in range(student.shape[0]):
            if mask is None or bool(mask[b]):
                rows.append((student[b], teacher[b]))
    else:
        for b in range(student.shape[0]):
            for t in range(student.shape[1]):
                if _valid(mask, b, t):
                    rows.append((student[b, t], teacher[b, t]))
    total = 0.0
    for s_row, t_row in rows:
        p_s = ref_softmax(s_row, temperature)
        p_t = ref_softmax(t_row, temperature)
        if kind == "forward":
            val = ref_kl(p_t, p_s)
        elif kind == "reverse":
            val = ref_kl(p_s, p_t)
        else:
            m = [beta * a + (1 - beta) * c for a, c in zip(p_t, p_s, strict=True)]
            val = beta * ref_kl(p_t, m) + (1 - beta) * ref_kl(p_s, m)
        total += val
    return temperature**2 * total / len(rows) if rows else 0.0


def make_mask(lengths, n_t, left=False):
    mask = torch.zeros(len(lengths), n_t, dtype=torch.long)
    for b, n in enumerate(lengths):
        if n:
            if left:
                mask[b, n_t - n :] = 1
            else:
                mask[b, :n] = 1
    return mask


def junk_like(x, gen):
    """Huge / non-finite garbage: what padded positions may contain."""
    junk = torch.randn(x.shape, generator=gen, dtype=torch.float32) * 1e30
    pick = torch.randint(0, 4, x.shape, generator=gen)
    junk = torch.where(pick == 0, torch.full_like(junk, float("inf")), junk)
    junk = torch.where(pick == 1, torch.full_like(junk, float("nan")), junk)
    return junk.to(x.dtype)


def replace_padded(x, pad, gen):
    """Replace x at padded (B, T) positions (x is (B, T, ...)) by junk."""
    pad = pad.reshape(pad.shape + (1,) * (x.dim() - 2))
    return torch.where(pad, junk_like(x, gen), x)


def heads_view(pad):
    """(B, T) -> broadcastable over (B, H, T, d)."""
    return pad[:, None, :, None]


# Small hand-made inputs shared by the golden tests: B=2, H=2, T=4, d=3; row 0 padded at t=3.
GEN0 = torch.Generator().manual_seed(1234)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
Q_T = torch.randn(2, 2, 4, 3, generator=GEN0)
K_T = torch.randn(2, 2, 4, 3, generator=GEN0)
Q_S = torch.randn(2, 2, 4, 3, generator=GEN0)
K_S = torch.randn(2, 2, 4, 3, generator=GEN0)


# ============================================================================================
# masked_mean
# ============================================================================================


def test_masked_mean_golden_with_trailing_dims():
    values = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            if MASK[b, t]:
                for c in range(3):
                    total += float(values[b, t, c])
                    count += 1
    out = masked_mean(values, MASK)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() == pytest.approx(total / count, rel=1e-6)


def test_masked_mean_none_is_plain_mean_and_casts():
    values = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)).half()
    out = masked_mean(values, None)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(values.float().mean().item(), rel=1e-6, abs=1e-7)


def test_masked_mean_no_valid_token_is_zero_and_connected():
    values = torch.randn(2, 3, 4, requires_grad=True)
    out = masked_mean(values, torch.zeros(2, 3, dtype=torch.bool))
    assert out.item() == 0.0 and not torch.isnan(out)
    assert out.requires_grad
    out.backward()
    assert torch.equal(values.grad, torch.zeros_like(values))


def test_masked_mean_rejects_bad_mask_shape():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        masked_mean(torch.zeros(2, 3, 4), torch.ones(3, 2))


@PROPS
@given(
    n_b=st.integers(1, 3),
    n_t=st.integers(1, 5),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_masked_mean_ignores_padding_content_and_gradient(n_b, n_t, data, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = data.draw(st.lists(st.integers(0, n_t), min_size=n_b, max_size=n_b))
    mask = make_mask(lengths, n_t)
    pad = mask == 0
    values = torch.randn(n_b, n_t, 2, generator=gen)
    base = masked_mean(values, mask)
    dirty = replace_padded(values, pad, gen).requires_grad_(True)
    out = masked_mean(dirty, mask)
    assert torch.equal(out, base)
    out.backward()
    assert torch.isfinite(dirty.grad).all()
    assert (dirty.grad[pad] == 0).all()
    n_valid = int(mask.sum())
    if n_valid:
        assert torch.allclose(
            dirty.grad[~pad], torch.full_like(dirty.grad[~pad], 1 / (2 * n_valid))
        )


# ============================================================================================
# attention_log_probs / probs_to_log_probs
# ============================================================================================


def test_attention_log_probs_closed_form():
    # One query, two keys: scores (scale 1) are [2, 0] -> p = [e^2, 1] / (1 + e^2).
    q = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    k = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    logp = attention_log_probs(q, k, scale=1.0)
    e2 = math.exp(2.0)
    expected = torch.tensor([e2 / (1 + e2), 1 / (1 + e2)])
    assert torch.allclose(logp[0, 0, 0].exp(), expected, atol=1e-7)
    # temperature 2 halves the scores: softmax([1, 0]).
    logp_t = attention_log_probs(q, k, scale=1.0, temperature=2.0)
    e1 = math.exp(1.0)
    assert torch.allclose(logp_t[0, 0, 0].exp(), torch.tensor([e1 / (1 + e1), 1 / (1 + e1)]))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_log_probs_golden(causal):
    logp = attention_log_probs(Q_T, K_T, attention_mask=MASK, causal=causal)
    assert logp.shape == (2, 2, 4, 4) and logp.dtype == torch.float32
    assert torch.isfinite(logp).all()
    ref = ref_attention_probs(Q_T, K_T, MASK, causal)
    for b in range(2):
        for i in range(4):
            if MASK[b, i]:
                assert torch.allclose(logp[b, :, i].exp().double(), ref[b, :, i], atol=1e-6)
    # Excluded keys: padded key of row 0, and the future when causal.
    assert (logp[0, :, :, 3] < -1e20).all()
    if causal:
        for i in range(4):
            assert (logp[:, :, i, i + 1 :] < -1e20).all()
            assert (logp[1, :, i, : i + 1] > -1e20).all()


def test_attention_log_probs_padded_query_rows_are_uniform_over_allowed_keys():
    logp = attention_log_probs(Q_T, K_T, attention_mask=MASK)
    # Row 0, query 3 is padding: uniform over the 3 real keys.
    expected = torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0])
    assert torch.allclose(logp[0, :, 3].exp(), expected.expand(2, 4), atol=1e-7)


def test_attention_log_probs_fully_masked_row_is_finite():
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])
    logp = attention_log_probs(Q_T * 1e30, K_T, attention_mask=mask, causal=True)
    assert torch.isfinite(logp).all()
    assert torch.allclose(logp[0].exp().sum(-1), torch.ones(2, 4))
    # Left padding + causal: query 0 of row 0 has no allowed key at all.
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    logp = attention_log_probs(Q_T, K_T, attention_mask=mask, causal=True)
    assert torch.isfinite(logp).all()
    ref = ref_attention_probs(Q_T, K_T, mask, causal=True)
    assert torch.allclose(logp[0, :, 2:].exp().double(), ref[0, :, 2:], atol=1e-6)


def test_attention_log_probs_gqa_matches_explicit_repeat():
    gen = torch.Generator().manual_seed(7)
    n_h, n_kv = 4, 2
    q = torch.randn(2, n_h, 4, 3, generator=gen)
    k = torch.randn(2, n_kv, 4, 3, generator=gen)
    rep = n_h // n_kv
    k_rep = torch.stack([k[:, h // rep] for h in range(n_h)], dim=1)  # heads 0,0,1,1
    got = attention_log_probs(q, k, attention_mask=MASK, causal=True)
    want = attention_log_probs(q, k_rep, attention_mask=MASK, causal=True)
    assert torch.allclose(got, want, atol=1e-6)
    ref = ref_attention_probs(q, k, MASK, causal=True)
    assert torch.allclose(got[1].exp().double(), ref[1], atol=1e-6)
    # The tiled order (heads 0,1,0,1) is a different model: the implementation must not use it.
    tiled = attention_log_probs(q, k.repeat(1, rep, 1, 1), attention_mask=MASK, causal=True)
    assert not torch.allclose(got[1], tiled[1], atol=1e-3)


def test_attention_log_probs_custom_scale_and_temperature():
    logp = attention_log_probs(Q_T, K_T, scale=0.7, temperature=1.5, attention_mask=MASK)
    ref = ref_attention_probs(Q_T, K_T, MASK, scale=0.7, temperature=1.5)
    assert torch.allclose(logp[1].exp().double(), ref[1], atol=1e-6)


def test_attention_log_probs_errors():
    with pytest.raises(ValueError, match="multiple"):
        attention_log_probs(torch.zeros(1, 3, 4, 2), torch.zeros(1, 2, 4, 2))
    with pytest.raises(ValueError, match="agree"):
        attention_log_probs(torch.zeros(1, 2, 4, 2), torch.zeros(1, 2, 4, 3))
    with pytest.raises(ValueError, match="temperature"):
        attention_log_probs(Q_T, K_T, temperature=0.0)
    with pytest.raises(ValueError, match="attention_mask"):
        attention_log_probs(Q_T, K_T, attention_mask=torch.ones(2, 5))


def test_probs_to_log_probs_golden():
    probs = ref_attention_probs(Q_T, K_T, MASK, causal=True).float()
    logp = probs_to_log_probs(probs, MASK, causal=True)
    assert logp.dtype == torch.float32 and torch.isfinite(logp).all()
    for b in range(2):
        for i in range(4):
            for j in range(4):
                allowed = bool(MASK[b, j]) and j <= i
                if not MASK[b, i]:
                    continue
                if allowed:
                    assert logp[b, 0, i, j].item() == pytest.approx(
                        math.log(max(float(probs[b, 0, i, j]), 1e-38)), rel=1e-5
                    )
                else:
                    assert logp[b, 0, i, j] == torch.tensor(MASK_VALUE)
    # Padded query row (b=0, i=3) is uniform over its allowed keys even when the model gave nan.
    probs[0, :, 3] = float("nan")
    logp = probs_to_log_probs(probs, MASK, causal=True)
    assert torch.allclose(logp[0, :, 3, :3].exp(), torch.full((2, 3), 1 / 3))
    # Zero probabilities are clamped, not -inf.
    assert torch.isfinite(probs_to_log_probs(torch.zeros(1, 1, 2, 2))).all()


def test_probs_and_scores_paths_agree():
    mask = MASK
    lp_t = attention_log_probs(Q_T, K_T, attention_mask=mask, causal=True)
    lp_s = attention_log_probs(Q_S, K_S, attention_mask=mask, causal=True)
    from_probs_t = probs_to_log_probs(lp_t.exp(), mask, causal=True)
    from_probs_s = probs_to_log_probs(lp_s.exp(), mask, causal=True)
    a = attention_kl(lp_t, lp_s, mask)
    b = attention_kl(from_probs_t, from_probs_s, mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-4, abs=1e-6)


# ============================================================================================
# attention_kl / relation_log_probs
# ============================================================================================


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_attention_kl_golden(causal, direction):
    lp_t = attention_log_probs(Q_T, K_T, attention_mask=MASK, causal=causal)
    lp_s = attention_log_probs(Q_S, K_S, attention_mask=MASK, causal=causal)
    got = attention_kl(lp_t, lp_s, MASK, direction=direction)
    p_t = ref_attention_probs(Q_T, K_T, MASK, causal)
    p_s = ref_attention_probs(Q_S, K_S, MASK, causal)
    want = ref_attention_kl(p_t, p_s, MASK, direction)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_attention_kl_without_mask_and_gqa_student():
    gen = torch.Generator().manual_seed(3)
    k_s = torch.randn(2, 1, 4, 3, generator=gen)  # student with a single KV head (MQA)
    lp_t = attention_log_probs(Q_T, K_T)
    lp_s = attention_log_probs(Q_S, k_s)
    got = attention_kl(lp_t, lp_s)
    want = ref_attention_kl(ref_attention_probs(Q_T, K_T), ref_attention_probs(Q_S, k_s))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_attention_kl_self_is_zero_and_direction_matters():
    lp_t = attention_log_probs(Q_T, K_T, attention_mask=MASK)
    lp_s = attention_log_probs(Q_S, K_S, attention_mask=MASK)
    assert attention_kl(lp_t, lp_t, MASK).item() == pytest.approx(0.0, abs=1e-6)
    fwd = attention_kl(lp_t, lp_s, MASK, direction="forward")
    rev = attention_kl(lp_t, lp_s, MASK, direction="reverse")
    assert abs(fwd.item() - rev.item()) > 1e-3
    # reverse(T, S) == forward(S, T)
    assert rev.item() == pytest.approx(attention_kl(lp_s, lp_t, MASK).item(), rel=1e-6)


def test_attention_kl_handles_minus_inf_masking_convention():
    probs_t = ref_attention_probs(Q_T, K_T, MASK, causal=True)
    probs_s = ref_attention_probs(Q_S, K_S, MASK, causal=True)
    got = attention_kl(probs_t.float().log(), probs_s.float().log(), MASK)  # -inf at excluded
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ref_attention_kl(probs_t, probs_s, MASK), rel=1e-5)


def test_attention_kl_ignores_junk_in_excluded_entries_of_given_log_probs():
    gen = torch.Generator().manual_seed(21)
    lp_t = attention_log_probs(Q_T, K_T, attention_mask=MASK)
    lp_s = attention_log_probs(Q_S, K_S, attention_mask=MASK)
    base = attention_kl(lp_t, lp_s, MASK)
    pad = MASK == 0
    excluded = pad[:, None, :, None] | pad[:, None, None, :]  # padded query row or key column
    dirty_t = torch.where(excluded, junk_like(lp_t, gen), lp_t).requires_grad_(True)
    dirty_s = torch.where(excluded, junk_like(lp_s, gen), lp_s).requires_grad_(True)
    for direction in ("forward", "reverse"):
        out = attention_kl(dirty_t, dirty_s, MASK, direction=direction)
        if direction == "forward":
            assert torch.equal(out, base)
        assert torch.isfinite(out)
        grads = torch.autograd.grad(out, (dirty_t, dirty_s))
        for g in grads:
            assert torch.isfinite(g).all()
            assert (g.masked_select(excluded.expand_as(g)) == 0).all()
            assert (g.masked_select(~excluded.expand_as(g)) != 0).any()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("scale", [3.0, 1.0])
def test_attention_kl_from_scores_equals_attention_kl_in_value_and_gradient(
    causal, direction, scale
):
    lp_t = attention_log_probs(Q_T, K_T, attention_mask=MASK, causal=causal)
    q = Q_S.clone().requires_grad_(True)
    k = K_S.clone().requires_grad_(True)
    want = attention_kl(
        lp_t,
        attention_log_probs(q, k, attention_mask=MASK, causal=causal),
        MASK,
        direction=direction,
    )
    want_g = torch.autograd.grad(want * scale, (q, k))
    got = L.attention_kl_from_scores(
        lp_t,
        L.attention_scores(q, k, attention_mask=MASK, causal=causal),
        MASK,
        direction=direction,
    )
    got_g = torch.autograd.grad(got * scale, (q, k))
    ref = ref_attention_kl(
        ref_attention_probs(Q_T, K_T, MASK, causal),
        ref_attention_probs(Q_S, K_S, MASK, causal),
        MASK,
        direction,
    )
    assert got.item() == pytest.approx(ref, rel=1e-5, abs=1e-7)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert b.abs().max() > 1e-4  # the comparison is not between zeros


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("masked", [True, False])
def test_attention_kl_from_scores_in_many_small_blocks_equals_one_block(
    monkeypatch, direction, masked
):
    """Blocks that split the (B·H·T, T) rows mid-head give the same value and gradient."""
    mask = MASK if masked else None
    lp_t = attention_log_probs(Q_T, K_T, attention_mask=mask)
    results = []
    for block_bytes in (L._BLOCK_BYTES, 4 * Q_T.shape[2] * 3):  # 3 rows per block
        monkeypatch.setattr(L, "_BLOCK_BYTES", block_bytes)
        scores = L.attention_scores(Q_S, K_S, attention_mask=mask).requires_grad_(True)
        out = L.attention_kl_from_scores(lp_t, scores, mask, direction=direction)
        results.append((out.detach(), torch.autograd.grad(out, scores)[0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-9)
    assert results[1][1].abs().max() > 0


def test_attention_kl_from_scores_keeps_only_the_gradient_and_takes_minus_inf_masks():
    lp_t = attention_log_probs(Q_T, K_T, attention_mask=MASK)
    key_pad = (MASK == 0)[:, None, None, :].expand_as(lp_t)
    query_pad = (MASK == 0)[:, None, :, None].expand_as(lp_t)
    minus_inf_t = lp_t.masked_fill(key_pad, float("-inf"))  # the -inf masking convention
    scores = L.attention_scores(Q_S, K_S, attention_mask=MASK).requires_grad_(True)
    assert (scores[key_pad] == MASK_VALUE).all()  # excluded keys hold exactly MASK_VALUE
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda x: saved.append(tuple(x.shape)) or x, lambda x: x
    ):
        out = L.attention_kl_from_scores(minus_inf_t, scores, MASK)
    assert saved == [tuple(scores.shape)]  # one (B, H, T, T) buffer, nothing else
    want = attention_kl(lp_t, scores.log_softmax(-1), MASK).item()
    assert out.item() == pytest.approx(want, rel=1e-6)
    (g,) = torch.autograd.grad(out, scores)
    assert torch.isfinite(g).all() and (g[query_pad] == 0).all() and (g[key_pad] == 0).all()
    assert g.abs().max() > 0
    with torch.no_grad():  # no gradient needed: the plain path, same value
        plain = L.attention_kl_from_scores(minus_inf_t, scores, MASK).item()
    assert plain == pytest.approx(out.item(), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        L.attention_kl_from_scores(lp_t, scores[:, :1])


def test_attention_kl_errors():
    a = torch.zeros(2, 2, 4, 4)
    with pytest.raises(ValueError, match=r"\(2, 2, 4, 4\).*\(2, 3, 4, 4\)"):
        attention_kl(a, torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="direction"):
        attention_kl(a, a, direction="sideways")


def test_relation_log_probs_golden():
    gen = torch.Generator().manual_seed(11)
    x_t = torch.randn(2, 4, 6, generator=gen)  # teacher D=6
    x_s = torch.randn(2, 4, 4, generator=gen)  # student D=4, same number of relation heads
    n_rel = 2
    lr_t = relation_log_probs(x_t, n_rel, attention_mask=MASK, causal=True)
    lr_s = relation_log_probs(x_s, n_rel, attention_mask=MASK, causal=True)
    assert lr_t.shape == lr_s.shape == (2, n_rel, 4, 4)

    def ref_relation(x):
        n_b, n_t, dim = x.shape
        d_r = dim // n_rel
        heads = torch.zeros(n_b, n_rel, n_t, d_r)
        for b in range(n_b):
            for h in range(n_rel):
                for t in range(n_t):
                    for c in range(d_r):
                        heads[b, h, t, c] = x[b, t, h * d_r + c]
        return ref_attention_probs(heads, heads, MASK, causal=True, scale=1 / math.sqrt(d_r))

    r_t, r_s = ref_relation(x_t), ref_relation(x_s)
    assert torch.allclose(lr_t[1].exp().double(), r_t[1], atol=1e-6)
    assert torch.allclose(lr_t[0, :, :3].exp().double(), r_t[0, :, :3], atol=1e-6)
    got = attention_kl(lr_t, lr_s, MASK)
    assert got.item() == pytest.approx(ref_attention_kl(r_t, r_s, MASK), rel=1e-5)


def test_relation_log_probs_errors():
    with pytest.raises(ValueError, match=r"D=6.*num_heads=4"):
        relation_log_probs(torch.zeros(1, 2, 6), 4)
    with pytest.raises(ValueError, match="num_heads"):
        relation_log_probs(torch.zeros(1, 2, 6), 0)


@st.composite
def attention_cases(draw):
    n_b = draw(st.integers(1, 3))
    n_t = draw(st.integers(1, 5))
    n_kv = draw(st.integers(1, 2))
    n_h = n_kv * draw(st.integers(1, 2))
    d = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, n_t), min_size=n_b, max_size=n_b))
    left = draw(st.booleans())
    causal = draw(st.booleans())
    direction = draw(st.sampled_from(["forward", "reverse"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(n_b, n_h, n_t, d, generator=gen) * 2,
        torch.randn(n_b, n_kv, n_t, d, generator=gen) * 2,
        torch.randn(n_b, n_h, n_t, d, generator=gen) * 2,
        torch.randn(n_b, n_kv, n_t, d, generator=gen) * 2,
    ]
    return tensors, make_mask(lengths, n_t, left), causal, direction, gen


def _attn_loss(q_t, k_t, q_s, k_s, mask, causal, direction):
    lp_t = attention_log_probs(q_t, k_t, attention_mask=mask, causal=causal)
    lp_s = attention_log_probs(q_s, k_s, attention_mask=mask, causal=causal)
    return attention_kl(lp_t, lp_s, mask, direction=direction)


@PROPS
@given(attention_cases())
def test_attention_kl_properties(case):
    (q_t, k_t, q_s, k_s), mask, causal, direction, gen = case
    loss = _attn_loss(q_t, k_t, q_s, k_s, mask, causal, direction)
    assert torch.isfinite(loss) and loss.item() >= -1e-6
    assert _attn_loss(q_t, k_t, q_t, k_t, mask, causal, direction).item() == pytest.approx(
        0.0, abs=1e-6
    )
    # Padded queries / keys may contain anything (huge, inf, nan): same value, zero gradient.
    pad = heads_view(mask == 0)
    dirty = [
        torch.where(pad, junk_like(x, gen), x).requires_grad_(True) for x in (q_t, k_t, q_s, k_s)
    ]
    dirty_loss = _attn_loss(*dirty, mask, causal, direction)
    assert torch.equal(dirty_loss, loss)
    dirty_loss.backward()
    for x in dirty:
        assert torch.isfinite(x.grad).all()
        assert (x.grad.masked_select(pad.expand_as(x.grad)) == 0).all()
    # Batch order does not matter.
    perm = torch.randperm(mask.shape[0], generator=gen)
    permuted = _attn_loss(q_t[perm], k_t[perm], q_s[perm], k_s[perm], mask[perm], causal, direction)
    assert permuted.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)


@PROPS
@given(attention_cases(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_attention_kl_low_precision_inputs_are_computed_in_fp32(case, dtype):
    tensors, mask, causal, direction, _ = case
    low = [x.to(dtype).requires_grad_(True) for x in tensors]
    loss = _attn_loss(*low, mask, causal, direction)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    upcast = _attn_loss(*[x.detach().float() for x in low], mask, causal, direction)
    assert torch.equal(loss, upcast)
    loss.backward()
    for x in low:
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


@PROPS
@given(
    n_b=st.integers(1, 3),
    n_t=st.integers(1, 5),
    n_rel=st.integers(1, 3),
    widths=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    causal=st.booleans(),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_relation_kl_properties(n_b, n_t, n_rel, widths, causal, data, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = data.draw(st.lists(st.integers(0, n_t), min_size=n_b, max_size=n_b))
    mask = make_mask(lengths, n_t, left=data.draw(st.booleans()))
    x_t = torch.randn(n_b, n_t, n_rel * widths[0], generator=gen)
    x_s = torch.randn(n_b, n_t, n_rel * widths[1], generator=gen)

    def loss_fn(a, b, m=mask):
        lr_a = relation_log_probs(a, n_rel, attention_mask=m, causal=causal)
        lr_b = relation_log_probs(b, n_rel, attention_mask=m, causal=causal)
        return attention_kl(lr_a, lr_b, m)

    loss = loss_fn(x_t, x_s)
    assert torch.isfinite(loss) and loss.item() >= -1e-6
    assert loss_fn(x_t, x_t).item() == pytest.approx(0.0, abs=1e-6)
    pad = mask == 0
    d_t = replace_padded(x_t, pad, gen).requires_grad_(True)
    d_s = replace_padded(x_s, pad, gen).requires_grad_(True)
    dirty = loss_fn(d_t, d_s)
    assert torch.equal(dirty, loss)
    dirty.backward()
    for x in (d_t, d_s):
        assert torch.isfinite(x.grad).all() and (x.grad[pad] == 0).all()
    perm = torch.randperm(n_b, generator=gen)
    assert loss_fn(x_t[perm], x_s[perm], mask[perm]).item() == pytest.approx(
        loss.item(), rel=1e-5, abs=1e-6
    )


# ============================================================================================
# hidden_mse
# ============================================================================================


def test_hidden_mse_golden():
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(2, 4, 3, generator=gen)
    t = torch.randn(2, 4, 3, generator=gen)
    total, n = 0.0, 0
    for b in range(2):
        for i in range(4):
            if MASK[b, i]:
                for c in range(3):
                    total += (float(s[b, i, c]) - float(t[b, i, c])) ** 2
                    n += 1
    assert hidden_mse(s, t, MASK).item() == pytest.approx(total / n, rel=1e-6)
    assert hidden_mse(s, t).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)


def test_hidden_mse_shape_error_names_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 3\).*\(2, 4, 5\)"):
        hidden_mse(torch.zeros(2, 4, 3), torch.zeros(2, 4, 5))


@PROPS
@given(
    n_b=st.integers(1, 3),
    n_t=st.integers(1, 5),
    dim=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_hidden_mse_properties(n_b, n_t, dim, dtype, data, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = data.draw(st.lists(st.integers(0, n_t), min_size=n_b, max_size=n_b))
    mask = make_mask(lengths, n_t, left=data.draw(st.booleans()))
    s = torch.randn(n_b, n_t, dim, generator=gen).to(dtype)
    t = torch.randn(n_b, n_t, dim, generator=gen).to(dtype)
    loss = hidden_mse(s, t, mask)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() >= 0
    assert torch.equal(loss, hidden_mse(s.float(), t.float(), mask))
    assert hidden_mse(s, s, mask).item() == 0.0
    pad = mask == 0
    d_s = replace_padded(s, pad, gen).requires_grad_(True)
    d_t = replace_padded(t, pad, gen).requires_grad_(True)
    dirty = hidden_mse(d_s, d_t, mask)
    assert torch.equal(dirty, loss)
    dirty.backward()
    for x in (d_s, d_t):
        assert x.grad.dtype == dtype
        assert torch.isfinite(x.grad).all() and (x.grad[pad] == 0).all()
    perm = torch.randperm(n_b, generator=gen)
    assert hidden_mse(s[perm], t[perm], mask[perm]).item() == pytest.approx(
        loss.item(), rel=1e-5, abs=1e-7
    )


# ============================================================================================
# kd_divergence
# ============================================================================================

GEN1 = torch.Generator().manual_seed(99)
Z_S = torch.randn(2, 4, 5, generator=GEN1) * 2
Z_T = torch.randn(2, 4, 5, generator=GEN1) * 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_divergence_golden_per_token(kind, temperature):
    got = kd_divergence(Z_S, Z_T, temperature=temperature, kind=kind, beta=0.3, mask=MASK)
    want = ref_kd(Z_S, Z_T, temperature, kind, beta=0.3, mask=MASK)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_kd_divergence_golden_per_example(kind):
    s, t = Z_S[:, 0], Z_T[:, 0]  # (B, C)
    got = kd_divergence(s, t, temperature=3.0, kind=kind, beta=0.7)
    assert got.item() == pytest.approx(ref_kd(s, t, 3.0, kind, beta=0.7), rel=1e-5)
    # A (B,) mask selects examples.
    got = kd_divergence(s, t, kind=kind, mask=torch.tensor([0, 1]))
    assert got.item() == pytest.approx(ref_kd(s[1:], t[1:], 1.0, kind), rel=1e-5)


def test_kd_divergence_temperature_squared_scaling():
    tau = 2.0
    s, t = Z_S[1, 0], Z_T[1, 0]
    p_t = ref_softmax(t, tau)  # tempered distributions, by hand
    p_s = ref_softmax(s, tau)
    kl_tempered = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s, strict=True))
    got = kd_divergence(s[None], t[None], temperature=tau)
    assert got.item() == pytest.approx(tau**2 * kl_tempered, rel=1e-5)
    # The same as the untempered KL of the scaled logits, times tau^2.
    scaled = kd_divergence(s[None] / tau, t[None] / tau)
    assert got.item() == pytest.approx(tau**2 * scaled.item(), rel=1e-5)


def test_kd_divergence_self_zero_and_asymmetry():
    for kind in KINDS:
        assert kd_divergence(Z_T, Z_T, kind=kind, mask=MASK).item() == pytest.approx(0, abs=1e-6)
    # Asymmetric case: a peaked teacher vs a flat student.
    t = torch.tensor([[8.0, 0.0, 0.0, 0.0]])
    s = torch.zeros(1, 4)
    fwd = kd_divergence(s, t, kind="forward").item()
    rev = kd_divergence(s, t, kind="reverse").item()
    assert fwd > 0 and rev > 0 and abs(fwd - rev) > 0.1
    p = ref_softmax(t[0])
    assert fwd == pytest.approx(ref_kl(p, [0.25] * 4), rel=1e-5)
    assert rev == pytest.approx(ref_kl([0.25] * 4, p), rel=1e-5)
    # JSD is bounded by log 2 (for beta = 1/2) and below both KLs.
    jsd = kd_divergence(s, t, kind="jsd").item()
    assert 0 < jsd <= math.log(2) and jsd < min(fwd, rev)


def test_kd_divergence_jsd_beta_weights():
    s, t = Z_S[0, :1], Z_T[0, :1]
    for beta in (0.1, 0.5, 0.9):
        got = kd_divergence(s, t, kind="jsd", beta=beta).item()
        assert got == pytest.approx(ref_kd(s, t, 1.0, "jsd", beta), rel=1e-5)
    lo = kd_divergence(s, t, kind="jsd", beta=0.1).item()
    hi = kd_divergence(s, t, kind="jsd", beta=0.9).item()
    assert lo != pytest.approx(hi, rel=1e-3)


def test_kd_divergence_errors():
    with pytest.raises(ValueError, match="beta"):
        kd_divergence(Z_S, Z_T, kind="jsd", beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        kd_divergence(Z_S, Z_T, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="kind"):
        kd_divergence(Z_S, Z_T, kind="tvd")
    with pytest.raises(ValueError, match="temperature"):
        kd_divergence(Z_S, Z_T, temperature=-1.0)
    with pytest.raises(ValueError, match=r"\(2, 4, 5\).*\(2, 4, 6\)"):
        kd_divergence(Z_S, torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match="chunk_size"):
        kd_divergence(Z_S, Z_T, chunk_size=0)
    with pytest.raises(ValueError, match="mask"):
        kd_divergence(Z_S, Z_T, mask=torch.ones(2, 5))


def test_kd_divergence_no_valid_token():
    s = Z_S.clone().requires_grad_(True)
    out = kd_divergence(s, Z_T, mask=torch.zeros(2, 4), chunk_size=2)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_kd_divergence_accepts_minus_inf_logits():
    t = torch.tensor([[2.0, float("-inf"), 0.0], [1.0, 0.0, float("-inf")]])
    s = torch.tensor([[1.0, float("-inf"), 0.5], [0.0, 1.0, 2.0]], requires_grad=True)
    for kind in KINDS:
        out = kd_divergence(s, t, kind=kind)
        assert torch.isfinite(out) and out.item() > 0
        (grad,) = torch.autograd.grad(out, s)
        assert torch.isfinite(grad).all()
    fwd = kd_divergence(s, t)
    want = ref_kl(ref_softmax([2.0, 0.0]), ref_softmax([1.0, 0.5])) / 2
    p2 = ref_softmax([1.0, 0.0])
    q2 = ref_softmax([0.0, 1.0, 2.0])
    want += (p2[0] * math.log(p2[0] / q2[0]) + p2[1] * math.log(p2[1] / q2[1])) / 2
    assert fwd.item() == pytest.approx(want, rel=1e-5)


@st.composite
def logits_cases(draw, extreme=False):
    n_b = draw(st.integers(1, 3))
    n_t = draw(st.integers(1, 5))
    vocab = draw(st.integers(2, 6))
    lengths = draw(st.lists(st.integers(0, n_t), min_size=n_b, max_size=n_b))
    mask = make_mask(lengths, n_t, left=draw(st.booleans()))
    kind = draw(st.sampled_from(KINDS))
    temperature = draw(st.sampled_from([0.5, 1.0, 2.0]))
    beta = draw(st.sampled_from([0.1, 0.5, 0.9]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    s = torch.randn(n_b, n_t, vocab, generator=gen) * 3
    t = torch.randn(n_b, n_t, vocab, generator=gen) * 3
    if extreme:
        signs_s = torch.randint(-1, 2, s.shape, generator=gen).float()
        signs_t = torch.randint(-1, 2, t.shape, generator=gen).float()
        s = torch.where(signs_s != 0, signs_s * 1e4, s)
        t = torch.where(signs_t != 0, signs_t * 1e4, t)
    return s, t, mask, kind, temperature, beta, gen


@PROPS
@given(logits_cases())
def test_kd_divergence_properties(case):
    s, t, mask, kind, tau, beta, gen = case
    kw = {"temperature": tau, "kind": kind, "beta": beta}
    loss = kd_divergence(s, t, mask=mask, **kw)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() >= -1e-6
    assert kd_divergence(t, t, mask=mask, **kw).item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(ref_kd(s, t, tau, kind, beta, mask), rel=1e-4, abs=1e-6)
    pad = mask == 0
    d_s = replace_padded(s, pad, gen).requires_grad_(True)
    d_t = replace_padded(t, pad, gen).requires_grad_(True)
    dirty = kd_divergence(d_s, d_t, mask=mask, **kw)
    assert torch.equal(dirty, loss)
    dirty.backward()
    for x in (d_s, d_t):
        assert torch.isfinite(x.grad).all() and (x.grad[pad] == 0).all()
    perm = torch.randperm(s.shape[0], generator=gen)
    permuted = kd_divergence(s[perm], t[perm], mask=mask[perm], **kw)
    assert permuted.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)


@PROPS
@given(
    logits_cases(extreme=True),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    st.sampled_from([None, 1, 3]),
)
def test_kd_divergence_extreme_logits_low_precision(case, dtype, chunk_size):
    s, t, mask, kind, tau, beta, _ = case
    s = s.to(dtype).requires_grad_(True)
    t = t.to(dtype).requires_grad_(True)
    kw = {"temperature": tau, "kind": kind, "beta": beta, "mask": mask, "chunk_size": chunk_size}
    loss = kd_divergence(s, t, **kw)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() >= -1e-6
    assert torch.allclose(
        loss, kd_divergence(s.detach().float(), t.detach().float(), **kw), rtol=1e-6
    )
    loss.backward()
    for x in (s, t):
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
        assert (x.grad[mask == 0] == 0).all()


@PROPS
@given(logits_cases(), st.integers(1, 4))
def test_kd_divergence_chunked_equals_unchunked(case, chunk_size):
    s, t, mask, kind, tau, beta, _ = case
    kw = {"temperature": tau, "kind": kind, "beta": beta, "mask": mask}
    results = []
    for chunk in (None, chunk_size):
        s_ = s.clone().requires_grad_(True)
        t_ = t.clone().requires_grad_(True)
        out = kd_divergence(s_, t_, chunk_size=chunk, **kw)
        out.backward()
        results.append((out.detach(), s_.grad, t_.grad))
    (v0, gs0, gt0), (v1, gs1, gt1) = results
    assert torch.allclose(v0, v1, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gs0, gs1, rtol=1e-5, atol=1e-7)
    assert torch.allclose(gt0, gt1, rtol=1e-5, atol=1e-7)


def test_kd_divergence_chunking_keeps_at_most_one_chunk_of_fp32_activations():
    n_rows, vocab, chunk = 40, 64, 4
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(n_rows, vocab, generator=gen).half().requires_grad_(True)
    t = torch.randn(n_rows, vocab, generator=gen).half()
    saved_fp32 = []

    def pack(x):
        if x.dtype == torch.float32:
            saved_fp32.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        unchunked = kd_divergence(s, t, kind="jsd")
    full = sum(saved_fp32)
    assert full >= n_rows * vocab  # the unchunked graph holds full-size fp32 tensors
    saved_fp32.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        chunked = kd_divergence(s, t, kind="jsd", chunk_size=chunk)
    assert sum(saved_fp32) <= chunk * vocab  # checkpointed: nothing per chunk is kept
    (g_full,) = torch.autograd.grad(unchunked, s)
    (g_chunk,) = torch.autograd.grad(chunked, s)
    assert torch.allclose(g_full.float(), g_chunk.float(), atol=1e-6)


# ============================================================================================
# cross_entropy / shift_for_causal_lm
# ============================================================================================


def ref_cross_entropy(logits, labels, mask=None, ignore_index=-100):
    total, n = 0.0, 0
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    flat_mask = None if mask is None else mask.reshape(-1)
    for r in range(flat_labels.shape[0]):
        y = int(flat_labels[r])
        if y == ignore_index or (flat_mask is not None and not flat_mask[r]):
            continue
        total -= ref_log_softmax(flat_logits[r])[y]
        n += 1
    return total / n if n else 0.0


def test_cross_entropy_golden():
    labels = torch.tensor([[0, 4, -100, 2], [1, 1, 3, -100]])
    got = cross_entropy(Z_S, labels, MASK)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_cross_entropy(Z_S, labels, MASK), rel=1e-6)
    labels_c = torch.tensor([3, 0])
    got = cross_entropy(Z_S[:, 0], labels_c)
    assert got.item() == pytest.approx(ref_cross_entropy(Z_S[:, 0], labels_c), rel=1e-6)
    labels_i = torch.tensor([[7, 4, 7, 2], [1, 7, 3, 7]])
    got = cross_entropy(Z_S, labels_i, ignore_index=7)
    assert got.item() == pytest.approx(ref_cross_entropy(Z_S, labels_i, None, 7), rel=1e-6)


def test_cross_entropy_errors_and_empty():
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(Z_S, torch.zeros(2, 3, dtype=torch.long))
    logits = Z_S.clone().requires_grad_(True)
    out = cross_entropy(logits, torch.full((2, 4), -100))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@PROPS
@given(logits_cases(extreme=True), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_cross_entropy_properties(case, dtype):
    s, _, mask, _, _, _, gen = case
    vocab = s.shape[-1]
    labels = torch.randint(0, vocab, mask.shape, generator=gen)
    ignored = torch.rand(mask.shape, generator=gen) < 0.2
    labels = labels.masked_fill(ignored, -100)
    s = s.to(dtype)
    loss = cross_entropy(s, labels, mask)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() >= 0
    ref = ref_cross_entropy(s.float(), labels, mask)
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-5)
    dead = (mask == 0) | ignored
    dirty = replace_padded(s, dead, gen).requires_grad_(True)
    other_labels = torch.where(
        mask == 0, torch.randint(0, vocab, mask.shape, generator=gen), labels
    )
    out = cross_entropy(dirty, other_labels, mask)
    assert torch.equal(out, loss)
    out.backward()
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[dead] == 0).all()
    perm = torch.randperm(s.shape[0], generator=gen)
    assert cross_entropy(s[perm], labels[perm], mask[perm]).item() == pytest.approx(
        loss.item(), rel=1e-5, abs=1e-6
    )


def test_shift_for_causal_lm():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    labels = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])  # left padding, right padding
    sl, sy, sm = shift_for_causal_lm(logits, labels, mask)
    assert torch.equal(sl, logits[:, :3])
    assert torch.equal(sy, torch.tensor([[6, 7, 8], [2, 3, 4]]))
    # Position t predicts token t + 1; it counts only if both t and t + 1 are real tokens.
    assert sm.tolist() == [[False, True, True], [True, True, False]]
    assert shift_for_causal_lm(logits, labels)[2] is None
    # Next-token CE through the helper equals the loop reference.
    got = cross_entropy(*shift_for_causal_lm(Z_S, torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]]), MASK))
    ref = 0.0
    pairs = [(b, t) for b in range(2) for t in range(3) if MASK[b, t] and MASK[b, t + 1]]
    targets = [[0, 1, 2, 3], [4, 3, 2, 1]]
    for b, t in pairs:
        ref -= math.log(ref_softmax(Z_S[b, t])[targets[b][t + 1]])
    assert got.item() == pytest.approx(ref / len(pairs), rel=1e-6)


def test_module_is_standalone():
    # Plain torch code: the module must not import the rest of makd_registry.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(L))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add((node.module or "") if node.level == 0 else "." * node.level)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not any(name.startswith(".") or name.startswith("makd") for name in imported)


@PROPS
@given(logits_cases(), st.integers(1, 4))
def test_kd_divergence_fused_student_gradient_equals_autograd(case, chunk_size):
    """With a frozen teacher, forward/reverse KL take the fused path (gradient computed in the
    forward pass); value and student gradient equal plain autograd's."""
    s, t, mask, kind, tau, beta, _ = case
    assume(kind in ("forward", "reverse"))
    assume(torch.isfinite(s).all() and torch.isfinite(t).all())
    kw = {"temperature": tau, "kind": kind, "mask": mask}
    results = []
    for chunk in (None, chunk_size):
        s_ = s.clone().requires_grad_(True)
        out = kd_divergence(s_, t, chunk_size=chunk, **kw)
        (grad,) = torch.autograd.grad(out * 3.0, s_)  # a non-unit upstream gradient
        results.append((out.detach(), grad))
    (v0, g0), (v1, g1) = results
    assert torch.allclose(v0, v1, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-6)


def test_kd_divergence_fused_path_keeps_one_gradient_buffer_and_no_fp32_chunks():
    n_rows, vocab, chunk = 40, 64, 4
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(n_rows, vocab, generator=gen).requires_grad_(True)
    t = torch.randn(n_rows, vocab, generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda x: saved.append(x.numel()) or x, lambda x: x
    ):
        out = kd_divergence(s, t, chunk_size=chunk)
    assert saved == [n_rows * vocab]  # exactly the student's gradient, nothing per chunk
    out.backward()
    assert s.grad.shape == s.shape


def test_kd_divergence_fused_path_refuses_a_second_backward():
    s = torch.randn(6, 5).requires_grad_(True)
    out = kd_divergence(s, torch.randn(6, 5), chunk_size=2)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()  # loud, never a silently doubled gradient


@pytest.mark.parametrize("masked", ["none", "some", "all-padding"])
def test_hidden_mse_fused_gradient_equals_autograds(masked):
    """The fused path (student needs a gradient) against plain autograd on the same
    formula; masked tokens may hold nan and still get exactly zero gradient."""
    gen = torch.Generator().manual_seed(0)
    s0 = torch.randn(3, 5, 4, generator=gen)
    t = torch.randn(3, 5, 4, generator=gen)
    mask = {"none": None, "some": torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1] * 5])}.get(
        masked, torch.zeros(3, 5)
    )
    if mask is not None:
        s0[mask == 0] = float("nan")
    s = s0.clone().requires_grad_(True)
    got = hidden_mse(s, t, mask)
    (g,) = torch.autograd.grad(got * 3.0, s)
    ref_s = s0.clone().requires_grad_(True)
    m = torch.ones(3, 5, dtype=torch.bool) if mask is None else mask.bool()
    diff = torch.where(m[..., None], ref_s, 0.0) - torch.where(m[..., None], t, 0.0)
    want = diff.square().sum() / max(int(m.sum()) * 4, 1)
    (g_ref,) = torch.autograd.grad(want * 3.0, ref_s)
    torch.testing.assert_close(got.detach(), want.detach())
    torch.testing.assert_close(g, torch.nan_to_num(g_ref, nan=0.0))
    assert torch.isfinite(g).all()
