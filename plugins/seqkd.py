"""``seqkd``: sequence-level KD, CE of the student on teacher-generated outputs.

The engine runs the generation (batched, cached on disk under a hash of this config) before
training and feeds the student the generated sequences; this aspect declares what it needs
and computes the loss. For classifiers the "generation" is the teacher's argmax: pseudo-labels.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from makd_registry import Aspect, AspectConfig, Feature, FeatureRequest, hookimpl
from makd_registry.strict import raise_at


class SeqKD(Aspect):
    """CE of the student on teacher-generated sequences (or teacher pseudo-labels), cached."""

    name = "seqkd"

    class Config(AspectConfig):
        decoding: Literal["greedy", "beam", "sample"] = Field(
            default="greedy", description="How the teacher generates."
        )
        num_beams: int = Field(default=4, ge=2, le=64, description="Beams for decoding: beam.")
        max_new_tokens: int = Field(default=128, ge=1, le=8192)
        temperature: float = Field(default=1.0, gt=0, le=100, description="Sampling temperature.")
        top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
        cache_dir: str | None = Field(
            default=None,
            min_length=1,
            description="Where generations are cached, relative to the objective file "
            "(default: $MAKD_CACHE_DIR/seqkd).",
        )

        @model_validator(mode="after")
        def _options_match_decoding(self) -> SeqKD.Config:
            given = self.model_fields_set
            if "num_beams" in given and self.decoding != "beam":
                raise_at(
                    ("num_beams",),
                    "unused",
                    "'num_beams' only applies to decoding: beam",
                    self.num_beams,
                )
            for key in ("temperature", "top_p"):
                if key in given and self.decoding != "sample":
                    raise_at(
                        (key,),
                        "unused",
                        "'{key}' only applies to decoding: sample",
                        getattr(self, key),
                        key=key,
                    )
            return self

    def requires(self) -> list[FeatureRequest]:
        return [
            FeatureRequest("teacher", Feature.GENERATED),
            FeatureRequest("student", Feature.LOGITS),
        ]

    def loss(self, features):
        from makd_registry import losses

        targets = features.teacher(Feature.GENERATED)
        logits = features.student(Feature.LOGITS)
        if logits.dim() == 2:
            return losses.cross_entropy(logits, targets)
        if not features.causal and targets.dim() == 2 and targets.shape == logits.shape[:2]:
            return losses.cross_entropy(logits, targets)  # QA: (B, 2, T) start/end
        mask = features.attention_mask
        if features.causal:  # targets shifted, the logits never copied
            return losses.next_token_cross_entropy(logits, targets, mask)
        return losses.cross_entropy(logits, targets, mask)


@hookimpl
def makd_register_aspects(register):
    register(SeqKD)
