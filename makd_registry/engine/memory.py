"""A memory estimate for ``makd run --dry-run``: weights, optimizer state, captured features."""

from __future__ import annotations

import os
from typing import Any

from ..features import Feature, ModelInfo

MB = 1024 * 1024


def feature_numel(feature: Feature, info: ModelInfo, batch: int, seq: int, head: str) -> int:
    d = info.head_dim or info.hidden_size // info.num_heads
    kv = info.num_kv_heads or info.num_heads
    inter = info.intermediate_size or 4 * info.hidden_size
    sizes = {
        Feature.EMBEDDINGS: seq * info.hidden_size,
        Feature.HIDDEN: seq * info.hidden_size,
        Feature.ATTENTION_QUERY: info.num_heads * seq * d,
        Feature.ATTENTION_KEY: kv * seq * d,
        Feature.ATTENTION_VALUE: kv * seq * d,
        Feature.ATTENTION_PROBS: info.num_heads * seq * seq,
        Feature.Q_PROJ: seq * info.num_heads * d,
        Feature.K_PROJ: seq * kv * d,
        Feature.V_PROJ: seq * kv * d,
        Feature.O_PROJ: seq * info.hidden_size,
        Feature.FFN_INTERMEDIATE: seq * inter,
        Feature.FFN_GATE: seq * inter,
        Feature.FFN_UP: seq * inter,
        Feature.FFN_OUTPUT: seq * info.hidden_size,
        Feature.GENERATED: seq,
    }
    if feature is Feature.LOGITS:
        if head in ("causal_lm", "masked_lm"):
            return batch * seq * (info.vocab_size or 0)
        if head == "question_answering":
            return batch * 2 * seq
        return batch * (info.num_labels or 2)
    return batch * sizes[feature]


def estimate_memory(
    models: Any, plan: Any, micro_batch: int, seq: int, *, bf16_teacher: bool
) -> dict[str, float]:
    """Megabytes of: student weights + gradients + AdamW state (fp32), teacher weights,
    and the features captured per micro-batch (activations of the forwards themselves are
    not included)."""
    counts = models.parameters()
    out = {"student_weights_grads_adam": counts["student"].total * 16 / MB}
    if "teacher" in counts:
        out["teacher_weights"] = counts["teacher"].total * (2 if bf16_teacher else 4) / MB
    captured = 0.0
    for side, model, adapter in (
        ("teacher", models.teacher, models.teacher_adapter),
        ("student", models.student, models.student_adapter),
    ):
        if model is None:
            continue
        info = adapter.model_info(model.config)
        side_plan = getattr(plan, side)
        width = 2 if (side == "teacher" and bf16_teacher) else 4
        for feature, _ in side_plan.features:
            captured += feature_numel(feature, info, micro_batch, seq, models.head) * width
        for feature, _, _ in getattr(side_plan, "on_teacher_input", ()):
            captured += feature_numel(feature, info, micro_batch, seq, models.head) * width
    out["captured_features_per_micro_batch"] = captured / MB
    out["total_excluding_activations"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def available_memory_mb(device: Any) -> float | None:
    """Total memory of ``device`` in MB (physical RAM for the CPU), or None when unknown."""
    try:
        if getattr(device, "type", str(device)) == "cuda":
            import torch

            index = device.index if getattr(device, "index", None) is not None else 0
            return torch.cuda.get_device_properties(index).total_memory / MB
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MB
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None
