"""``attention_kl``: KL between teacher and student self-attention distributions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from makd_registry import Aspect, Feature, FeatureRequest, LayerwiseConfig, hookimpl
from makd_registry.strict import raise_at


class AttentionKL(Aspect):
    """KL(A_T ‖ A_S) of self-attention per head, over valid queries, in fp32 (MiniLM)."""

    name = "attention_kl"

    class Config(LayerwiseConfig):
        direction: Literal["forward", "reverse"] = Field(
            default="forward",
            description="forward: KL(A_T‖A_S) (MiniLM, teacher first); reverse: KL(A_S‖A_T).",
        )
        temperature: float = Field(default=1.0, gt=0, le=100, description="Softmax temperature.")
        source: Literal["qk", "probs"] = Field(
            default="qk",
            description="qk: recompute A from captured queries and keys (keeps SDPA/flash "
            "attention); probs: the (B, H, T, T) probabilities, computed by the capture from "
            "the same Q and K (equal to eager attention's).",
        )
        relation_heads: int | None = Field(
            default=None,
            ge=1,
            description="Compare MiniLMv2-style relation heads: split the concatenated Q and K "
            "into this many heads on both sides (needed when head counts differ).",
        )

        @model_validator(mode="after")
        def _relation_needs_qk(self) -> AttentionKL.Config:
            if self.relation_heads is not None and self.source == "probs":
                raise_at(
                    ("relation_heads",),
                    "relation_needs_qk",
                    "relation_heads needs source: qk (queries and keys)",
                    self.relation_heads,
                )
            return self

    def requires(self) -> list[FeatureRequest]:
        kinds = (
            [Feature.ATTENTION_PROBS]
            if self.config.source == "probs"
            else [Feature.ATTENTION_QUERY, Feature.ATTENTION_KEY]
        )
        out = []
        for s, t in self.pairs:
            for kind in kinds:
                out += [FeatureRequest("teacher", kind, t), FeatureRequest("student", kind, s)]
        return out

    def build(self, teacher, student) -> None:
        r = self.config.relation_heads
        if r is None:
            if teacher.num_heads != student.num_heads:
                raise ValueError(
                    f"attention_kl: the teacher has {teacher.num_heads} heads and the student "
                    f"{student.num_heads}; set relation_heads to compare relation heads"
                )
            return
        for side, info in (("teacher", teacher), ("student", student)):
            width = info.num_heads * (info.head_dim or info.hidden_size // info.num_heads)
            if width % r:
                raise ValueError(
                    f"attention_kl: relation_heads={r} does not divide the {side}'s query "
                    f"width {width}"
                )

    def _log_probs(self, features, side: str, layer: int):
        """Teacher side: log-probabilities (from Q/K or from the captured probabilities)."""
        from makd_registry import losses

        if self.config.source == "probs":
            get = features.teacher if side == "teacher" else features.student
            mask, causal = features.attention_mask, features.causal
            logp = losses.probs_to_log_probs(get(Feature.ATTENTION_PROBS, layer), mask, causal)
            if self.config.temperature != 1.0:
                import torch

                logp = torch.log_softmax(logp / self.config.temperature, dim=-1)
            return logp
        import torch

        return torch.log_softmax(self._scores(features, side, layer), dim=-1)

    def _scores(self, features, side: str, layer: int):
        """Pre-softmax scores from the captured queries and keys (``source: qk``)."""
        from makd_registry import losses

        get = features.teacher if side == "teacher" else features.student
        mask, causal, tau = features.attention_mask, features.causal, self.config.temperature
        query = get(Feature.ATTENTION_QUERY, layer)
        key = get(Feature.ATTENTION_KEY, layer)
        r = self.config.relation_heads
        if r is None:
            info = features.teacher_info if side == "teacher" else features.student_info
            scale = info.attention_scale if info is not None else None
            return losses.attention_scores(
                query, key, scale=scale, attention_mask=mask, causal=causal, temperature=tau
            )
        return losses.attention_scores(
            _split_relation_heads(query, r),
            _split_relation_heads(_expand_kv(key, query), r),
            attention_mask=mask,
            causal=causal,
            temperature=tau,
        )

    def _pair_loss(self, features, s: int, t: int):
        from makd_registry import losses

        teacher = self._log_probs(features, "teacher", t)
        mask, direction = features.attention_mask, self.config.direction
        rows = features.token_mask()  # the query rows in the loss; keys: every real token
        if self.config.source == "qk":  # fused: the scores' gradient in the same pass
            student = self._scores(features, "student", s)
            return losses.attention_kl_from_scores(
                teacher, student, mask, direction=direction, query_mask=rows
            )
        student = self._log_probs(features, "student", s)
        return losses.attention_kl(teacher, student, mask, direction=direction, query_mask=rows)

    def loss(self, features):
        terms = [self._pair_loss(features, s, t) for s, t in self.pairs]
        return sum(terms[1:], terms[0]) / len(terms) if terms else features.zero()


def _expand_kv(key: Any, query: Any) -> Any:
    """Repeat GQA key heads so that there is one per query head."""
    groups = query.shape[1] // key.shape[1]
    return key if groups == 1 else key.repeat_interleave(groups, dim=1)


def _split_relation_heads(x: Any, heads: int) -> Any:
    """(B, H, T, d) → concatenate heads → split into ``heads`` relation heads (B, r, T, H·d/r)."""
    b, h, t, d = x.shape
    if (h * d) % heads:
        raise ValueError(f"relation_heads={heads} does not divide the width {h * d}")
    return x.transpose(1, 2).reshape(b, t, heads, h * d // heads).transpose(1, 2)


@hookimpl
def makd_register_aspects(register):
    register(AttentionKL)
