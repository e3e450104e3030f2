"""Alignment maps from student to teacher feature widths: identity, linear, low-rank U·V.

Shared by ``hidden_mse``, ``mha_matrix`` and ``ffn_matrix``. The maps are trainable modules
that the engine optimises and checkpoints with the student (``Aspect.modules()``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from makd_registry import LayerwiseConfig
from makd_registry.strict import raise_at


class AlignedConfig(LayerwiseConfig):
    """Layer-wise config with an alignment map from the student width to the teacher's."""

    align: Literal["identity", "linear", "lowrank"] = Field(
        default="identity",
        description="Student→teacher width map: identity (equal widths), linear (a full "
        "W, TinyBERT), or lowrank (W = U·V of rank `rank`).",
    )
    rank: int | None = Field(default=None, ge=1, description="Rank of a lowrank alignment.")
    share_alignment: bool = Field(
        default=True,
        description="One alignment map for all layer pairs (TinyBERT) instead of one per pair.",
    )

    @model_validator(mode="after")
    def _rank_with_lowrank(self) -> AlignedConfig:
        if self.align == "lowrank" and self.rank is None:
            raise_at(("rank",), "missing_rank", "align: lowrank needs 'rank'", None)
        if self.align != "lowrank" and self.rank is not None:
            raise_at(("rank",), "rank_unused", "'rank' only applies to align: lowrank", self.rank)
        return self


def make_alignment(config: AlignedConfig, d_student: int, d_teacher: int, what: str) -> Any:
    """The module mapping width ``d_student`` to ``d_teacher``; None for identity."""
    if config.align == "identity":
        if d_student != d_teacher:
            raise ValueError(
                f"{what}: align: identity needs equal widths, but the student's is {d_student} "
                f"and the teacher's {d_teacher}; use align: linear or align: lowrank"
            )
        return None
    import torch

    if config.align == "linear":
        return torch.nn.Linear(d_student, d_teacher, bias=True)
    from makd_registry.lowrank import LowRankLinear

    rank = config.rank or 1
    if rank > min(d_student, d_teacher):
        raise ValueError(
            f"{what}: rank {rank} exceeds min(student width {d_student}, teacher width {d_teacher})"
        )
    return LowRankLinear(d_student, d_teacher, rank, bias=True)


class Aligner:
    """Alignment maps for one aspect, keyed by (feature name, layer pair or 'shared')."""

    def __init__(self, config: AlignedConfig) -> None:
        self.config = config
        self.maps: dict[str, Any] = {}

    def key(self, feature: str, pair: tuple[int, int]) -> str:
        if self.config.share_alignment:
            return feature
        return f"{feature}.s{pair[0]}_t{pair[1]}"

    def add(
        self, feature: str, pair: tuple[int, int], d_student: int, d_teacher: int, what: str
    ) -> None:
        key = self.key(feature, pair)
        if key not in self.maps:
            self.maps[key] = make_alignment(self.config, d_student, d_teacher, what)

    def __call__(self, feature: str, pair: tuple[int, int], x: Any) -> Any:
        key = self.key(feature, pair)
        if key not in self.maps and self.config.align != "identity":
            raise RuntimeError(f"alignment '{key}' does not exist yet: call build() first")
        module = self.maps.get(key)
        if module is None:
            return x
        return module(x.to(next(module.parameters()).dtype))

    def modules(self) -> dict[str, Any]:
        return {key: m for key, m in self.maps.items() if m is not None}
