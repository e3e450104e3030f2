"""What to capture: the (model, feature, layer) set an objective needs, and nothing more.

:meth:`CapturePlan.from_requests` turns the aspects' :class:`FeatureRequest` list into one
:class:`SidePlan` per model; :meth:`CapturePlan.check` validates it against the two models'
adapters and shapes before anything runs. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..features import Feature, FeatureRequest, ModelInfo

if TYPE_CHECKING:
    from ..models.adapter import ArchitectureAdapter

#: matrix features → the projection role whose *output* they are (``None``: special)
OUTPUT_ROLE: dict[Feature, str] = {
    Feature.Q_PROJ: "q",
    Feature.K_PROJ: "k",
    Feature.V_PROJ: "v",
    Feature.O_PROJ: "o",
    Feature.FFN_GATE: "ffn_gate",
    Feature.FFN_UP: "ffn_up",
    Feature.FFN_OUTPUT: "ffn_out",
}

#: matrix features → the role whose *input* the student's module is applied to
INPUT_ROLE: dict[Feature, str] = {
    Feature.Q_PROJ: "q",
    Feature.K_PROJ: "k",
    Feature.V_PROJ: "v",
    Feature.O_PROJ: "o",
    Feature.FFN_GATE: "ffn_gate",
    Feature.FFN_UP: "ffn_up",
    Feature.FFN_INTERMEDIATE: "ffn_in",
    Feature.FFN_OUTPUT: "ffn_out",
}

Key = tuple[Feature, int | None]


@dataclass(frozen=True)
class SidePlan:
    """What one model must deliver per batch.

    ``features``: (feature, layer) pairs for the :class:`FeatureSet`. ``module_inputs``
    (teacher): (feature, teacher layer) whose module input is kept so that the student's
    module can be applied to it. ``on_teacher_input`` (student): (feature, student layer,
    teacher layer) outputs of the student's module on the teacher's input.
    ``generated``: the objective uses teacher-generated sequences (produced by the engine
    before training, not by a forward hook).
    """

    features: frozenset[Key] = frozenset()
    module_inputs: frozenset[tuple[Feature, int]] = frozenset()
    on_teacher_input: frozenset[tuple[Feature, int, int]] = frozenset()
    generated: bool = False

    @property
    def empty(self) -> bool:
        return not (self.features or self.module_inputs or self.on_teacher_input)

    def layers(self) -> set[int]:
        out = {layer for _, layer in self.features if layer is not None}
        out |= {layer for _, layer in self.module_inputs}
        out |= {s for _, s, _ in self.on_teacher_input}
        return out


@dataclass(frozen=True)
class CapturePlan:
    """The teacher's and the student's :class:`SidePlan`."""

    teacher: SidePlan = field(default_factory=SidePlan)
    student: SidePlan = field(default_factory=SidePlan)

    @classmethod
    def from_requests(cls, requests: list[FeatureRequest]) -> CapturePlan:
        teacher: set[Key] = set()
        student: set[Key] = set()
        inputs: set[tuple[Feature, int]] = set()
        on_teacher: set[tuple[Feature, int, int]] = set()
        generated = False
        for r in requests:
            if r.feature is Feature.GENERATED:
                generated = True
            elif r.on_teacher_input:
                assert r.layer is not None and r.teacher_input_layer is not None
                on_teacher.add((r.feature, r.layer, r.teacher_input_layer))
                inputs.add((r.feature, r.teacher_input_layer))
            elif r.side == "teacher":
                teacher.add((r.feature, r.layer))
            else:
                student.add((r.feature, r.layer))
        return cls(
            teacher=SidePlan(frozenset(teacher), frozenset(inputs), generated=generated),
            student=SidePlan(frozenset(student), on_teacher_input=frozenset(on_teacher)),
        )

    @property
    def needs_teacher_forward(self) -> bool:
        return bool(self.teacher.features or self.teacher.module_inputs)

    def check(
        self,
        teacher: tuple[ArchitectureAdapter, ModelInfo] | None,
        student: tuple[ArchitectureAdapter, ModelInfo],
    ) -> list[str]:
        """Problems of this plan against the models (empty when it can run): layers that do
        not exist, parts an architecture lacks, student modules that cannot take the
        teacher's inputs."""
        problems: list[str] = []
        if teacher is None:
            if self.needs_teacher_forward:
                problems.append("the objective needs teacher features, but there is no teacher")
        else:
            problems += _check_side("teacher", self.teacher, *teacher)
        problems += _check_side("student", self.student, *student)
        if teacher is not None:
            for feature, s, t in sorted(self.student.on_teacher_input, key=str):
                width_t = _input_width(feature, teacher[1])
                width_s = _input_width(feature, student[1])
                if width_t != width_s:
                    problems.append(
                        f"student {feature.value}@{s} on the teacher's input @{t}: the "
                        f"teacher's module input is {width_t} wide and the student's {width_s}"
                    )
        return problems

    def summary(self) -> dict[str, list[str]]:
        """Human-readable lists per side, e.g. ``{"teacher": ["hidden@[1,3]"], ...}``."""
        from ..features import summarize

        requests = [FeatureRequest("teacher", f, layer) for f, layer in self.teacher.features]
        requests += [FeatureRequest("student", f, layer) for f, layer in self.student.features]
        requests += [
            FeatureRequest("student", f, s, teacher_input_layer=t)
            for f, s, t in self.student.on_teacher_input
        ]
        out = summarize(requests)
        if self.teacher.generated:
            out["teacher"].append("generated (before training)")
        return out


def _check_side(
    side: str, plan: SidePlan, adapter: ArchitectureAdapter, info: ModelInfo
) -> list[str]:
    problems = []
    for layer in sorted(plan.layers()):
        if layer >= info.num_layers:
            problems.append(
                f"{side} layer {layer} does not exist: the {side} ({adapter.name}) has "
                f"{info.num_layers} layers (0..{info.num_layers - 1})"
            )
    kinds = {f for f, _ in plan.features} | {f for f, _ in plan.module_inputs}
    kinds |= {f for f, _, _ in plan.on_teacher_input}
    gated = {Feature.FFN_GATE, Feature.FFN_UP}
    if kinds & gated and not adapter.layout.gated:
        names = ", ".join(sorted(f.value for f in kinds & gated))
        problems.append(
            f"the {side} ({adapter.name}) has no gated MLP, so it has no {names}; compare "
            "'intermediate' and 'output' instead"
        )
    return problems


def _input_width(feature: Feature, info: ModelInfo) -> int:
    d = info.head_dim or info.hidden_size // info.num_heads
    if feature is Feature.O_PROJ:
        return info.num_heads * d
    if feature is Feature.FFN_OUTPUT:
        return info.intermediate_size or 0
    return info.hidden_size
