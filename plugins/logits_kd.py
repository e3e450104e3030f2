"""Model-wise output aspects: ``logits_kd`` (soft targets) and ``ce`` (hard labels)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from makd_registry import Aspect, AspectConfig, Feature, FeatureRequest, hookimpl
from makd_registry.strict import raise_at


def _ce_key(logits):
    """The shared-value key of the student's CE on ``logits`` (see FeatureSet.shared); the
    value is ``(logits, ce)``, checked by identity when read."""
    return ("makd", "student_ce", id(logits))


def _student_ce(features, logits):
    """CE of student logits on the batch labels (next-token labels for causal LMs); the one
    ``logits_kd`` already computed in its pass over the same logits, when it did."""
    from makd_registry import losses

    def compute():
        if features.labels is None:
            raise ValueError("this objective needs hard labels, but the batch has none")
        labels, mask = features.labels, _token_mask(logits, features.attention_mask)
        if _next_token(features, logits):  # targets shifted, the logits never copied
            return logits, losses.next_token_cross_entropy(logits, labels, mask)
        return logits, losses.cross_entropy(logits, labels, mask)

    seen, ce = features.shared(_ce_key(logits), compute)
    return ce if seen is logits else compute()[1]


def _next_token(features, logits):
    return logits.dim() == 3 and features.causal


def _ce_from_the_same_pass(features, logits, config):
    """Whether ``logits_kd`` also computes the student's CE: always for ``alpha`` > 0; else
    when it is nearly free, so that a ``ce`` term on the same logits reads it instead of
    making a second pass (the fused KL at τ 1: the CE value is a gather, and its gradient
    costs nothing unless the CE is used)."""
    labels = features.labels
    if labels is None:
        return False
    want = logits.shape[:2] if _next_token(features, logits) else logits.shape[:-1]
    if tuple(labels.shape) != tuple(want):
        return False
    if config.alpha > 0:
        return True
    import torch

    return (
        config.temperature == 1.0
        and config.divergence != "jsd"
        and torch.is_grad_enabled()
        and logits.requires_grad
    )


def _token_mask(logits, mask):
    """The padding mask when ``logits`` are per token (B, T, V); None for per-example logits
    and for QA's (B, 2, T) start/end logits, whose padded positions hold a large negative
    value instead."""
    if logits.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(logits.shape[:2]):
        return mask
    return None


class LogitsKD(Aspect):
    """τ²·KL(p_T^τ ‖ p_S^τ) per example or valid token; reverse KL or JSD(β); α-mixed hard CE."""

    name = "logits_kd"

    class Config(AspectConfig):
        temperature: float = Field(default=1.0, gt=0, le=100, description="Softmax temperature τ.")
        divergence: Literal["forward", "reverse", "jsd"] = Field(
            default="forward",
            description="forward: KL(p_T‖p_S); reverse: KL(p_S‖p_T); jsd: generalized JSD(β).",
        )
        beta: float = Field(default=0.5, gt=0, lt=1, description="JSD mixing weight β.")
        alpha: float = Field(
            default=0.0,
            ge=0,
            le=1,
            description="Mix in hard-label CE: (1−α)·KD + α·CE (Hinton et al.).",
        )
        chunk_size: int | None = Field(
            default=None,
            ge=1,
            description="Rows per chunk for large vocabularies: never more than one chunk of "
            "fp32 probabilities in memory.",
        )

        @model_validator(mode="after")
        def _beta_for_jsd(self) -> LogitsKD.Config:
            if self.divergence != "jsd" and "beta" in self.model_fields_set:
                raise_at(
                    ("beta",), "beta_unused", "'beta' only applies to divergence: jsd", self.beta
                )
            return self

    def requires(self) -> list[FeatureRequest]:
        return [
            FeatureRequest("teacher", Feature.LOGITS),
            FeatureRequest("student", Feature.LOGITS),
        ]

    def loss(self, features):
        from makd_registry.losses import kd_and_cross_entropy, kd_divergence

        c = self.config
        z_s = features.student(Feature.LOGITS)
        top_k = features.teacher_top_k(Feature.LOGITS)  # from a top-k teacher cache
        residual = None
        if top_k is not None:
            z_t, ids = top_k.values, top_k.indices
            if c.temperature == 1.0 and c.divergence == "forward":
                residual = top_k.log_residual  # known at τ 1: the rest is one bucket
        else:
            z_t, ids = features.teacher(Feature.LOGITS), None
        # the positions whose predictions are in the loss (instruction data: the responses)
        mask = _token_mask(z_s, features.prediction_mask())
        options = {
            "temperature": c.temperature,
            "kind": c.divergence,
            "beta": c.beta,
            "mask": mask,
            "chunk_size": c.chunk_size,
            "teacher_indices": ids,
            "teacher_log_residual": residual,
        }
        if not _ce_from_the_same_pass(features, z_s, c):
            kd = kd_divergence(z_s, z_t, **options)
        else:  # the student's CE from the same pass over the logits, for alpha and for `ce`
            kd, ce = kd_and_cross_entropy(
                z_s,
                z_t,
                features.labels,
                next_token=_next_token(features, z_s),
                ce_mask=_token_mask(z_s, features.attention_mask),  # labels mark the CE's
                **options,
            )
            features.offer(_ce_key(z_s), (z_s, ce))
        if c.alpha == 0:
            return kd
        return (1 - c.alpha) * kd + c.alpha * _student_ce(features, z_s)


class CrossEntropy(Aspect):
    """Hard-label cross-entropy of the student (task loss; next-token CE for causal LMs)."""

    name = "ce"
    task_loss = True  # a teacher that makd trains trains on this alone

    class Config(AspectConfig):
        pass

    def requires(self) -> list[FeatureRequest]:
        return [FeatureRequest("student", Feature.LOGITS)]

    def loss(self, features):
        return _student_ce(features, features.student(Feature.LOGITS))


@hookimpl
def makd_register_aspects(register):
    register(LogitsKD)
    register(CrossEntropy)
