"""Losses are computed in fp32 even inside an autocast region (here CPU bf16 autocast)."""

from __future__ import annotations

import pytest
import torch

from makd_registry import losses


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 9, 8, generator=g) * 3
    k = torch.randn(2, 4, 9, 8, generator=g) * 3
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return q, k, mask


def _tokens(x):
    """(B, H, T, d) -> (B, T, H*d)"""
    return x.transpose(1, 2).flatten(2)


CASES = {
    "attention": lambda q, k, m: losses.attention_kl(
        losses.attention_log_probs(q, k, attention_mask=m),
        losses.attention_log_probs(k, q, attention_mask=m),
        m,
    ),
    "relation": lambda q, k, m: losses.attention_kl(
        losses.relation_log_probs(_tokens(q), 2, attention_mask=m),
        losses.relation_log_probs(_tokens(k), 2, attention_mask=m),
        m,
    ),
    "hidden": lambda q, k, m: losses.hidden_mse(_tokens(q), _tokens(k), m),
    "kd": lambda q, k, m: losses.kd_divergence(_tokens(q) * 4, _tokens(k) * 4, mask=m),
    "kd-chunked": lambda q, k, m: losses.kd_divergence(
        _tokens(q) * 4, _tokens(k) * 4, mask=m, chunk_size=5, kind="jsd"
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_losses_ignore_bf16_autocast(name):
    q, k, mask = _inputs()
    fn = CASES[name]
    reference = fn(q, k, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fn(q, k, mask)
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(under_autocast, reference, rtol=1e-5, atol=1e-6), (
        reference.item(),
        under_autocast.item(),
    )
