"""Combinators: ``sum`` (named, weighted, nestable terms), ``stages`` (ordered sub-objectives)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from makd_registry import Aspect, AspectNode, LayerwiseConfig, hookimpl
from makd_registry.aspect import NAME_PATTERN, AspectConfig, ChildNode
from makd_registry.strict import StrictModel, raise_at
from makd_registry.weighting import weighted_loss

if TYPE_CHECKING:
    import torch

    from makd_registry.features import FeatureSet


class Sum(Aspect):
    """Weighted sum of named terms: L = Σ weight_i · L_i; terms may be sums themselves."""

    name = "sum"
    is_combinator = True

    class Config(LayerwiseConfig):
        terms: list[AspectNode] = Field(
            min_length=1, description="The terms, each an objective node with its own weight."
        )

    def loss(self, features: FeatureSet) -> torch.Tensor:
        total = None
        for child in self.children:
            if child.weight == 0:
                continue  # a switched-off term costs nothing
            term = weighted_loss(child, features)
            total = term if total is None else total + term
        return features.zero() if total is None else total


class Stage(StrictModel):
    """One stage of a staged objective."""

    name: str = Field(pattern=NAME_PATTERN, description="Stage name, shown in logs.")
    steps: int | None = Field(
        default=None,
        ge=1,
        description="Optimisation steps of this stage; only the last stage may omit it "
        "(it then runs until training ends).",
    )
    objective: AspectNode = Field(description="The objective trained during this stage.")


class Stages(Aspect):
    """Ordered sub-objectives, each trained for its own step budget (TinyBERT's two stages)."""

    name = "stages"
    is_combinator = True
    root_only = True

    class Config(AspectConfig):
        stages: list[Stage] = Field(min_length=1, description="The stages, in order.")

        @model_validator(mode="after")
        def _check(self) -> Stages.Config:
            seen: dict[str, int] = {}
            for i, stage in enumerate(self.stages):
                if stage.name in seen:
                    raise_at(
                        ("stages", i, "name"),
                        "duplicate_stage",
                        "stage name '{name}' is already used by stages[{first}]",
                        stage.name,
                        name=stage.name,
                        first=seen[stage.name],
                    )
                seen[stage.name] = i
                if stage.steps is None and i != len(self.stages) - 1:
                    raise_at(
                        ("stages", i),
                        "missing_steps",
                        "only the last stage may omit 'steps'",
                        None,
                    )
            return self

    @classmethod
    def child_nodes(cls, config: Stages.Config) -> list[ChildNode]:  # type: ignore[override]
        """Each stage's objective, named after the stage, with no inherited mapping."""
        return [
            ChildNode(("stages", i, "objective"), stage.objective, stage.name, False)
            for i, stage in enumerate(config.stages)
        ]

    @classmethod
    def schedule_errors(cls, config: Stages.Config, steps: int) -> list[tuple[tuple, str]]:  # type: ignore[override]
        """Every stage must start before training ends, or it would silently never run."""
        out, start = [], 0
        for i, stage in enumerate(config.stages):
            if start >= steps:
                out.append(
                    (
                        ("stages", i),
                        f"stage '{stage.name}' would start at step {start}, but training "
                        f"ends after {steps} steps (training.steps): it would never run",
                    )
                )
            start += stage.steps or 0
        return out

    def stage_nodes(self) -> tuple[Aspect, ...]:
        return self.children

    def active_stage(self, step: int) -> int:
        return self.stage_at(step)

    def explain_info(self) -> dict:
        return {"steps": [s.steps for s in self.config.stages]}

    def boundaries(self) -> list[tuple[int, int | None]]:
        """``(first_step, end_step)`` of each stage; the end of an open last stage is None."""
        out, start = [], 0
        for stage in self.config.stages:
            end = None if stage.steps is None else start + stage.steps
            out.append((start, end))
            start = end if end is not None else start
        return out

    def stage_at(self, step: int) -> int:
        """Index of the stage active at ``step`` (the last one once all budgets are spent)."""
        for index, (_, end) in enumerate(self.boundaries()):
            if end is None or step < end:
                return index
        return len(self.config.stages) - 1

    def loss(self, features: FeatureSet) -> torch.Tensor:
        return weighted_loss(self.children[self.stage_at(features.step)], features)


@hookimpl
def makd_register_aspects(register):
    register(Sum)
    register(Stages)
