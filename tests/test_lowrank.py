"""Tests of makd_registry.lowrank: SVD factors, LowRankLinear and rank budgeting."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from makd_registry.lowrank import LowRankLinear, rank_for_budget, svd_factors

F64 = torch.float64
PROPS = settings(max_examples=40, deadline=None, derandomize=True)


def _weight(d_out, d_in, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, d_in, generator=gen, dtype=F64).to(dtype)


# ============================================================================================
# svd_factors
# ============================================================================================


@PROPS
@given(
    d_out=st.integers(1, 7),
    d_in=st.integers(1, 7),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_svd_factors_are_the_best_rank_r_approximation(d_out, d_in, data, seed):
    rank = data.draw(st.integers(1, min(d_out, d_in)))
    w = _weight(d_out, d_in, seed)
    up, down = svd_factors(w, rank)
    assert up.shape == (d_out, rank) and down.shape == (rank, d_in)
    assert up.dtype == down.dtype == F64
    sigma = torch.linalg.svdvals(w)
    err = w - up @ down
    discarded = sigma[rank:]
    fro = math.sqrt(float((discarded**2).sum()))
    assert float(torch.linalg.matrix_norm(err)) == pytest.approx(fro, rel=1e-9, abs=1e-12)
    spectral = float(discarded[0]) if discarded.numel() else 0.0
    assert float(torch.linalg.matrix_norm(err, ord=2)) == pytest.approx(
        spectral, rel=1e-9, abs=1e-12
    )
    # Balanced factors: both carry sqrt(sigma), so their column / row norms are equal.
    assert torch.allclose(up.norm(dim=0), down.norm(dim=1), rtol=1e-9)
    assert torch.allclose(up.norm(dim=0) ** 2, sigma[:rank], rtol=1e-9)


def test_svd_factors_full_rank_is_exact_and_keeps_dtype():
    w = _weight(5, 3, 1)
    up, down = svd_factors(w, 3)
    assert torch.allclose(up @ down, w, atol=1e-12)
    w32 = w.float().requires_grad_(True)
    up32, down32 = svd_factors(w32, 2)
    assert up32.dtype == torch.float32 and not up32.requires_grad
    w16 = w.to(torch.bfloat16)
    assert svd_factors(w16, 2)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("rank", [0, -1, 4, 10])
def test_svd_factors_rank_errors(rank):
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(d_out, d_in\)\] = \[1, 3\]"):
        svd_factors(_weight(5, 3), rank)


def test_svd_factors_other_errors():
    with pytest.raises(ValueError, match="2-D"):
        svd_factors(torch.zeros(2, 3, 4), 1)
    with pytest.raises(ValueError, match="int"):
        svd_factors(_weight(3, 3), 1.5)


# ============================================================================================
# LowRankLinear
# ============================================================================================


def test_structure_state_dict_and_repr():
    m = LowRankLinear(6, 4, 2)
    assert (m.in_features, m.out_features, m.rank) == (6, 4, 2)
    assert set(m.state_dict()) == {"down.weight", "up.weight", "up.bias"}
    assert m.down.weight.shape == (2, 6) and m.down.bias is None
    assert m.up.weight.shape == (4, 2) and m.up.bias.shape == (4,)
    assert "in_features=6, out_features=4, rank=2, bias=True" in repr(m)
    no_bias = LowRankLinear(6, 4, 2, bias=False)
    assert set(no_bias.state_dict()) == {"down.weight", "up.weight"} and no_bias.bias is None
    assert "bias=False" in repr(no_bias)
    x = torch.randn(3, 5, 6)
    assert torch.allclose(m(x), x @ m.down.weight.T @ m.up.weight.T + m.up.bias, atol=1e-6)


def test_constructor_device_dtype_and_errors():
    m = LowRankLinear(4, 3, 2, dtype=F64, device="cpu")
    assert all(p.dtype == F64 for p in m.parameters())
    with pytest.raises(ValueError, match=r"rank=4 exceeds"):
        LowRankLinear(4, 3, 4)
    for bad in ({"rank": 0}, {"in_features": 0}, {"out_features": True}):
        kwargs = {"in_features": 4, "out_features": 3, "rank": 1, **bad}
        with pytest.raises(ValueError):
            LowRankLinear(**kwargs)


def test_default_init_matches_linear_scale():
    torch.manual_seed(0)
    d_in, d_out, rank = 256, 192, 48
    m = LowRankLinear(d_in, d_out, rank)
    ref = nn.Linear(d_in, d_out)
    w_std = m.to_dense().weight.std().item()
    ref_std = ref.weight.std().item()
    assert w_std == pytest.approx(ref_std, rel=0.1)
    assert w_std == pytest.approx(1 / math.sqrt(3 * d_in), rel=0.1)
    assert m.up.bias.abs().max().item() <= 1 / math.sqrt(d_in)
    # Scale is rank-independent.
    small = LowRankLinear(d_in, d_out, 4).to_dense().weight.std().item()
    assert small == pytest.approx(ref_std, rel=0.15)


@PROPS
@given(
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_full_rank_from_linear_reproduces_outputs(d_in, d_out, bias, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias, dtype=F64)
    m = LowRankLinear.from_linear(lin, min(d_in, d_out))
    x = torch.randn(4, d_in, dtype=F64)
    assert torch.allclose(m(x), lin(x), atol=1e-12)
    dense = m.to_dense()
    assert isinstance(dense, nn.Linear)
    assert torch.allclose(dense.weight, lin.weight, atol=1e-12)
    if bias:
        assert torch.equal(m.up.bias, lin.bias) and torch.equal(dense.bias, lin.bias)
    else:
        assert m.up.bias is None and dense.bias is None
    assert m.num_parameters(d_in, d_out, m.rank, bias) == sum(p.numel() for p in m.parameters())


def test_from_linear_truncated_matches_svd_and_keeps_dtype():
    torch.manual_seed(1)
    lin = nn.Linear(8, 6, dtype=F64)
    m = LowRankLinear.from_linear(lin, 2)
    up, down = svd_factors(lin.weight, 2)
    assert torch.equal(m.up.weight, up) and torch.equal(m.down.weight, down)
    assert torch.equal(m.up.bias, lin.bias)
    sigma = torch.linalg.svdvals(lin.weight.detach())
    err = torch.linalg.matrix_norm(m.to_dense().weight - lin.weight)
    assert err.item() == pytest.approx(sigma[2:].square().sum().sqrt().item(), rel=1e-9)
    # Parameters are independent copies, trainable, and not tied to the source layer.
    assert m.up.weight.requires_grad and m.up.bias.data_ptr() != lin.bias.data_ptr()
    bf16 = nn.Linear(8, 6, dtype=torch.bfloat16)
    m16 = LowRankLinear.from_linear(bf16, 3)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    assert m16.to_dense().weight.dtype == torch.bfloat16


def test_from_weight_and_errors():
    w = _weight(5, 4, 3)
    b = torch.arange(5, dtype=F64)
    m = LowRankLinear.from_weight(w, 4, bias=b)
    x = torch.randn(2, 4, dtype=F64)
    assert torch.allclose(m(x), x @ w.T + b, atol=1e-12)
    assert LowRankLinear.from_weight(w, 2).up.bias is None
    with pytest.raises(ValueError, match="bias"):
        LowRankLinear.from_weight(w, 2, bias=torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear.from_weight(w, 5)


def test_to_dense_round_trip():
    torch.manual_seed(2)
    m = LowRankLinear(7, 5, 3)
    dense = m.to_dense()
    x = torch.randn(4, 7)
    assert torch.allclose(dense(x), m(x), atol=1e-5)
    back = LowRankLinear.from_linear(dense, 3)  # rank-3 dense weight: exact again
    assert torch.allclose(back(x), m(x), atol=1e-5)


def test_gradients_flow_to_both_factors():
    m = LowRankLinear(4, 3, 2)
    m(torch.randn(5, 4)).square().sum().backward()
    assert m.down.weight.grad.abs().sum() > 0 and m.up.weight.grad.abs().sum() > 0


# ============================================================================================
# rank_for_budget / num_parameters
# ============================================================================================


def test_num_parameters_formula():
    assert LowRankLinear.num_parameters(10, 6, 3, True) == 3 * 16 + 6
    assert LowRankLinear.num_parameters(10, 6, 3, False) == 48


@PROPS
@given(
    d_in=st.integers(1, 300),
    d_out=st.integers(1, 300),
    bias=st.booleans(),
    data=st.data(),
)
def test_rank_for_budget_int_is_largest_fitting_rank(d_in, d_out, bias, data):
    need_1 = LowRankLinear.num_parameters(d_in, d_out, 1, bias)
    budget = data.draw(st.integers(need_1, 2 * d_in * d_out + 2 * d_out + need_1))
    r = rank_for_budget(d_in, d_out, budget, bias)
    assert 1 <= r <= min(d_in, d_out)
    assert LowRankLinear.num_parameters(d_in, d_out, r, bias) <= budget
    assert r == min(d_in, d_out) or LowRankLinear.num_parameters(d_in, d_out, r + 1, bias) > budget


@PROPS
@given(
    d_in=st.integers(1, 300),
    d_out=st.integers(1, 300),
    bias=st.booleans(),
    frac=st.floats(0.01, 1.0),
)
def test_rank_for_budget_fraction(d_in, d_out, bias, frac):
    dense = d_in * d_out + (d_out if bias else 0)
    allowed = math.floor(frac * dense + 1e-9)
    if LowRankLinear.num_parameters(d_in, d_out, 1, bias) > allowed:
        with pytest.raises(ValueError, match="too small"):
            rank_for_budget(d_in, d_out, frac, bias)
        return
    r = rank_for_budget(d_in, d_out, frac, bias)
    assert LowRankLinear.num_parameters(d_in, d_out, r, bias) <= frac * dense + 1e-9
    assert r == min(d_in, d_out) or (
        LowRankLinear.num_parameters(d_in, d_out, r + 1, bias) > frac * dense
    )


def test_rank_for_budget_examples():
    # 1024 -> 1024 with bias: dense 1_049_600, half is 524_800; rank 256 would need 525_312
    # (the bias is paid on top), rank 255 needs 523_264.
    assert rank_for_budget(1024, 1024, 0.5) == 255
    assert rank_for_budget(1024, 1024, 0.5, bias=False) == 256  # 524_288 == half exactly
    # The whole dense budget buys rank 512 of a square layer (2 * 1024 * r + 1024 <= dense).
    assert rank_for_budget(1024, 1024, 1.0) == 512
    assert rank_for_budget(1024, 1024, 10**9) == 1024  # capped at min(in, out)
    assert rank_for_budget(100, 100, 0.29, bias=False) == 14  # floor(2900 / 200)
    assert rank_for_budget(10, 30, 40 + 30) == 1
    assert rank_for_budget(10, 30, 40 + 30 + 39) == 1
    assert rank_for_budget(10, 30, 40 + 30 + 40) == 2
    # Decimal reading of the fraction: 0.29 of 4 * 25 = 100 is 29 parameters (rank 1 costs
    # exactly 29), although 0.29 * 100 == 28.999999999999996 in binary floating point.
    assert 0.29 * 100 < 29
    assert rank_for_budget(4, 25, 0.29, bias=False) == 1
    with pytest.raises(ValueError, match=r"8 parameters.*needs 29"):
        rank_for_budget(1, 28, 0.29, bias=False)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((10, 30, 69), r"budget of 69 parameters is too small.*needs 70"),
        ((10, 30, 0), "positive"),
        ((10, 30, -5), "positive"),
        ((10, 30, 0.0), r"\(0, 1\]"),
        ((10, 30, 1.5), r"\(0, 1\]"),
        ((10, 30, float("nan")), r"\(0, 1\]"),
        ((10, 30, True), "budget"),
        ((10, 30, "half"), "budget"),
        ((0, 30, 100), "in_features"),
        ((10, -1, 100), "out_features"),
        ((10.0, 30, 100), "in_features"),
        ((10, 30, 0.001), "too small"),
    ],
)
def test_rank_for_budget_errors(args, match):
    with pytest.raises(ValueError, match=match):
        rank_for_budget(*args)


def test_module_is_standalone():
    import ast
    import inspect

    import makd_registry.lowrank as mod

    tree = ast.parse(inspect.getsource(mod))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("makd")
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("makd") for alias in node.names)
