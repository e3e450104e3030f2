"""``hidden_mse``: MSE between (aligned) student and teacher hidden states."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from makd_registry import Aspect, Feature, FeatureRequest, hookimpl

from .alignment import AlignedConfig, Aligner


class HiddenMSE(Aspect):
    """MSE(H_S·W, H_T) or cosine distance over valid tokens at mapped layers; W may be low-rank."""

    name = "hidden_mse"

    class Config(AlignedConfig):
        embeddings: bool = Field(
            default=False, description="Also compare the embedding outputs (TinyBERT)."
        )
        distance: Literal["mse", "cosine"] = Field(
            default="mse",
            description="mse: mean squared error; cosine: 1 − cos(h_S·W, h_T) per token "
            "(DistilBERT's cosine embedding loss).",
        )
        reduction: Literal["mean", "sum"] = Field(
            default="mean", description="Combine the per-layer losses by mean or sum."
        )

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.aligner = Aligner(config)

    def requires(self) -> list[FeatureRequest]:
        out = []
        for s, t in self.pairs:
            out += [
                FeatureRequest("teacher", Feature.HIDDEN, t),
                FeatureRequest("student", Feature.HIDDEN, s),
            ]
        if self.config.embeddings:
            out += [
                FeatureRequest("teacher", Feature.EMBEDDINGS),
                FeatureRequest("student", Feature.EMBEDDINGS),
            ]
        return out

    def build(self, teacher, student) -> None:
        for pair in self.pairs:
            self.aligner.add("hidden", pair, student.hidden_size, teacher.hidden_size, "hidden_mse")
        if self.config.embeddings:
            self.aligner.add(
                "hidden", (-1, -1), student.hidden_size, teacher.hidden_size, "hidden_mse"
            )

    def modules(self) -> dict[str, Any]:
        return self.aligner.modules()

    def _distance(self, student, teacher, mask):
        from makd_registry import losses

        if self.config.distance == "mse":
            return losses.hidden_mse(student, teacher, mask)
        import torch

        if student.shape != teacher.shape:
            raise ValueError(
                f"hidden_mse: student {tuple(student.shape)} and teacher "
                f"{tuple(teacher.shape)} hidden states differ in shape"
            )
        if mask is not None:  # padded content must not reach the arithmetic
            keep = mask.to(torch.bool).unsqueeze(-1)
            student = torch.where(keep, student.float(), 1.0)
            teacher = torch.where(keep, teacher.float(), 1.0)
        cos = torch.nn.functional.cosine_similarity(student.float(), teacher.float(), dim=-1)
        return losses.masked_mean((1.0 - cos).unsqueeze(-1), mask)

    def loss(self, features):
        mask = features.token_mask()
        terms = [
            self._distance(
                self.aligner("hidden", (s, t), features.student(Feature.HIDDEN, s)),
                features.teacher(Feature.HIDDEN, t),
                mask,
            )
            for s, t in self.pairs
        ]
        if self.config.embeddings:
            terms.append(
                self._distance(
                    self.aligner("hidden", (-1, -1), features.student(Feature.EMBEDDINGS)),
                    features.teacher(Feature.EMBEDDINGS),
                    mask,
                )
            )
        if not terms:
            return features.zero()
        total = sum(terms[1:], terms[0])
        return total if self.config.reduction == "sum" else total / len(terms)


@hookimpl
def makd_register_aspects(register):
    register(HiddenMSE)
