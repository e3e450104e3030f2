"""The optimizer: fused AdamW where the device supports it, the same update as the
multi-tensor one."""

from __future__ import annotations

import torch

from makd_registry.engine.optim import make_optimizer
from makd_registry.objective.sections import TrainingSection


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(500, 16), torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)
    )


def test_cpu_training_uses_the_fused_adamw_with_the_same_update():
    training = TrainingSection(steps=10, learning_rate=1e-2, weight_decay=0.1)
    fused_model, ref_model = _model(0), _model(0)
    fused, _ = make_optimizer(list(fused_model.named_parameters()), training)
    assert fused.defaults["fused"] is True
    groups = [
        {
            "params": [
                p for n, p in ref_model.named_parameters() if p.dim() >= 2 and "norm" not in n
            ]
        },
        {"params": [p for n, p in ref_model.named_parameters() if p.dim() < 2 or "norm" in n]},
    ]
    groups[0]["weight_decay"], groups[1]["weight_decay"] = 0.1, 0.0
    ref = torch.optim.AdamW(groups, lr=1e-2, foreach=True)
    ids = torch.randint(0, 500, (4, 7), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for model, opt in ((fused_model, fused), (ref_model, ref)):
            loss = model[2](model[1](model[0](ids))).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(fused_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
