"""Model-wise output aspects: ``logits_kd`` (soft targets) and ``ce`` (hard labels)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from makd_registry import Aspect, AspectConfig, Feature, FeatureRequest, hookimpl
from makd_registry.strict import raise_at


def _student_ce(features, logits):
    """CE of student logits on the batch labels (next-token labels for causal LMs)."""
    from makd_registry import losses

    if features.labels is None:
        raise ValueError("this objective needs hard labels, but the batch has none")
    labels, mask = features.labels, features.attention_mask
    if logits.dim() == 3 and features.causal:  # targets shifted, the logits never copied
        return losses.next_token_cross_entropy(logits, labels, _token_mask(logits, mask))
    return losses.cross_entropy(logits, labels, _token_mask(logits, mask))


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
        from makd_registry.losses import kd_divergence

        c = self.config
        z_s = features.student(Feature.LOGITS)
        z_t = features.teacher(Feature.LOGITS)
        mask = _token_mask(z_s, features.attention_mask)
        kd = kd_divergence(
            z_s,
            z_t,
            temperature=c.temperature,
            kind=c.divergence,
            beta=c.beta,
            mask=mask,
            chunk_size=c.chunk_size,
        )
        if c.alpha == 0:
            return kd
        return (1 - c.alpha) * kd + c.alpha * _student_ce(features, z_s)


class CrossEntropy(Aspect):
    """Hard-label cross-entropy of the student (task loss; next-token CE for causal LMs)."""

    name = "ce"

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
