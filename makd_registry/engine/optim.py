"""AdamW with a warm-up and linear, cosine or constant decay."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimisation ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def _adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one pass per tensor) where every parameter's device and
    dtype support it, else the multi-tensor (foreach) one: the same update, computed in
    fewer passes (on CPU the fused step is several times faster on a large embedding table)."""
    params = [p for g in groups for p in g["params"]]
    fusable = bool(params) and all(
        p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        for p in params
    )
    if fusable:
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True)
        except (RuntimeError, ValueError, TypeError):
            pass  # a torch build without the fused kernel for this device
    return torch.optim.AdamW(groups, lr=lr, foreach=bool(params))


def make_optimizer(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], training: Any
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on biases and norms) and its schedule for ``training``."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": training.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = _adamw(groups, training.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, total=training.steps, warmup=training.warmup_steps, schedule=training.schedule
        ),
    )
    return optimizer, scheduler
