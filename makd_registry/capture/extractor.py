"""One distillation forward: the teacher without gradients, the student with them.

:class:`FeatureExtractor` owns the two :class:`ModelCapture` objects of a run. Each call
runs the teacher under ``torch.no_grad()`` (when the plan needs teacher features), then the
student with gradients, and returns the :class:`FeatureSet` the objective's ``loss`` takes
together with the student's outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..features import Feature, FeatureSet, ModelInfo
from ..models.adapter import ArchitectureAdapter, ArchitectureError
from .hooks import ModelCapture
from .plan import CapturePlan

#: batch keys a transformers model takes as inputs (everything else stays out of forward)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` a transformers model takes."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch and batch[k] is not None}


class FeatureExtractor:
    """Capture an objective's features from a teacher and a student.

    ``teacher`` may be ``None`` when the plan needs no teacher features (a CE-only
    objective). Use as a context manager: hooks are installed on entry and removed on
    exit. Between calls the hooks stay installed but record only inside :meth:`__call__`,
    so evaluation forwards in between capture nothing.
    """

    def __init__(
        self,
        plan: CapturePlan,
        student: nn.Module,
        student_adapter: ArchitectureAdapter,
        teacher: nn.Module | None = None,
        teacher_adapter: ArchitectureAdapter | None = None,
        *,
        span_logits: bool = False,
        block_access: Any = None,
    ) -> None:
        self.plan = plan
        #: extractive QA: (B, 2, T) start/end logits, padded positions set to -1e4 on both
        #: sides before any aspect sees them
        self.span_logits = span_logits
        self.student_info = student_adapter.model_info(student.config)
        self.teacher_info: ModelInfo | None = None
        teacher_pair = None
        if teacher is not None:
            if teacher_adapter is None:
                raise ValueError("a teacher needs its architecture adapter")
            self.teacher_info = teacher_adapter.model_info(teacher.config)
            teacher_pair = (teacher_adapter, self.teacher_info)
        problems = plan.check(teacher_pair, (student_adapter, self.student_info))
        if problems:
            raise ArchitectureError("; ".join(problems))
        self.causal = student_adapter.causal
        self.student = ModelCapture(student, student_adapter, self.student_info, plan.student)
        #: the student's modules applied to the teacher's inputs run outside its forward:
        #: ``block_access`` makes a block's parameters usable there (a sharded student)
        self.student.block_access = block_access
        self.teacher = (
            ModelCapture(teacher, teacher_adapter, self.teacher_info, plan.teacher)
            if teacher is not None and teacher_adapter is not None and self.teacher_info
            else None
        )
        for cap in (self.student, self.teacher):
            if cap is not None:
                cap.recording = False
        self._on_teacher = sorted(plan.student.on_teacher_input, key=str)

    def __enter__(self) -> FeatureExtractor:
        self.student.install()
        if self.teacher is not None:
            self.teacher.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.student.remove()
        if self.teacher is not None:
            self.teacher.remove()

    def run_teacher(self, inputs: Mapping[str, Any]) -> tuple[dict[Any, Any], dict[Any, Any]]:
        """Teacher features and module inputs for ``inputs`` (no gradients)."""
        cap = self.teacher
        if cap is None or cap.plan.empty:
            return {}, {}
        cap.recording = True
        try:
            with torch.no_grad():
                outputs = cap.model(**inputs)
            return cap.features(outputs, inputs.get("attention_mask")), cap.module_inputs()
        finally:
            cap.recording = False
            cap.clear()

    def __call__(
        self,
        batch: Mapping[str, Any],
        *,
        step: int = 0,
        teacher_features: tuple[dict[Any, Any], dict[Any, Any]] | None = None,
    ) -> tuple[FeatureSet, Any]:
        """Run both models on ``batch`` and return ``(features, student_outputs)``.

        ``teacher_features`` (features, module inputs) replaces the teacher forward, e.g.
        with values read from a teacher-output cache.
        """
        inputs = model_inputs(batch)
        t_feats, t_inputs = (
            teacher_features if teacher_features is not None else self.run_teacher(inputs)
        )
        cap = self.student
        cap.recording = True
        try:
            outputs = cap.model(**inputs)
            s_feats = cap.features(outputs, inputs.get("attention_mask"))
        finally:
            cap.recording = False
            cap.clear()
        on_teacher = {
            (feature, s, t): cap.apply_module(feature, s, t_inputs[(feature, t)])
            for feature, s, t in self._on_teacher
        }
        t_feats = dict(t_feats)
        for feature, column in BATCH_COLUMNS.items():  # features the data carries
            if column in batch:
                t_feats[(feature, None)] = batch[column]
        if self.span_logits:
            _mask_span_logits(t_feats, inputs.get("attention_mask"))
            _mask_span_logits(s_feats, inputs.get("attention_mask"))
        features = FeatureSet(
            teacher_features=t_feats,
            student_features=s_feats,
            student_on_teacher_input=on_teacher,
            attention_mask=inputs.get("attention_mask"),
            labels=batch.get("labels"),
            loss_mask=batch.get(LOSS_MASK),
            causal=self.causal,
            step=step,
            teacher_info=self.teacher_info,
            student_info=self.student_info,
        )
        return features, outputs


#: the batch column of the tokens token-level terms average over (instruction data's
#: response tokens; see :attr:`FeatureSet.loss_mask`), written by the data layer
LOSS_MASK = "loss_mask"

#: features that the training data carries as a column instead of a capture: the
#: teacher's generated targets, written by a requirement provider (e.g. SeqKD's)
BATCH_COLUMNS = {Feature.GENERATED: "generated"}


def _mask_span_logits(table: dict[Any, Any], mask: Any) -> None:
    """Padded positions of QA start/end logits get a large negative value."""
    key = (Feature.LOGITS, None)
    if mask is not None and key in table and table[key].dim() == 3:
        table[key] = table[key].masked_fill(~mask.bool()[:, None, :], -1e4)
