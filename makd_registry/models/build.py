"""The teacher and the student of an objective file, built and checked before training.

:func:`build_models` reads the teacher and student sections of a resolved objective and
returns both models, their adapters, the shared tokenizer and the student's parameter
report. Student recipes: ``model`` (load), ``config`` (fresh), ``teacher_layers`` (copy of
the chosen teacher layers), and ``factorize`` alone (a low-rank copy of the teacher) or on
top of ``model`` / ``teacher_layers``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapter import ArchitectureAdapter
from .loading import ModelError, build_from_config, build_on_meta, head_for_task, load_pretrained
from .registry import ArchitectureRegistry
from .students import (
    FactorizationReport,
    ParameterCounts,
    factorize,
    parameter_counts,
    select_layers,
)


@dataclass
class Models:
    """Everything model-related a run needs."""

    student: Any
    student_adapter: ArchitectureAdapter
    teacher: Any = None
    teacher_adapter: ArchitectureAdapter | None = None
    teacher_tokenizer: Any = None
    student_tokenizer: Any = None
    head: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)
    factorization: FactorizationReport | None = None

    @property
    def tokenizer(self) -> Any:
        return self.student_tokenizer or self.teacher_tokenizer

    def parameters(self) -> dict[str, ParameterCounts]:
        out = {"student": parameter_counts(self.student)}
        if self.teacher is not None:
            out["teacher"] = parameter_counts(self.teacher)
        return out


def default_head(task: str | None, section: Any, registry: ArchitectureRegistry) -> str:
    """The task head: from the data section's task, else from the model family."""
    if task is not None:
        return head_for_task(task)
    config = getattr(section, "config", None)
    if isinstance(config, dict):
        adapter = registry.for_config(config)
        return "causal_lm" if adapter.causal else "sequence_classification"
    return "sequence_classification"


def _load(
    section: Any,
    head: str,
    registry: ArchitectureRegistry,
    base: Path,
    what: str,
    attn: str | None,
    num_labels: int | None,
) -> Any:
    if section.config is not None:
        config = dict(section.config)
        if num_labels is not None and head == "sequence_classification":
            config.setdefault("num_labels", num_labels)
        return build_from_config(
            config, head, registry, what=f"{what}.config", attn_implementation=attn
        )
    return load_pretrained(
        section.model,
        head,
        registry,
        base_dir=base,
        what=f"{what}.model",
        attn_implementation=attn,
        num_labels=num_labels,
    )


def _tokenizer(ref: str | None, fallback: str | None, base: Path, what: str) -> Any:
    from .tokenizers import load_tokenizer

    if ref is not None:
        return load_tokenizer(ref, base_dir=base, what=what)
    if fallback is not None:
        try:
            return load_tokenizer(fallback, base_dir=base, what=what)
        except ModelError:
            return None  # a model directory without tokenizer files
    return None


def build_teacher(
    spec: Any,
    registry: ArchitectureRegistry,
    *,
    base_dir: Path,
    attn_implementation: str | None = None,
    num_labels: int | None = None,
    weights: bool | None = None,
) -> tuple[Any, ArchitectureAdapter | None]:
    """The teacher of ``spec`` (an ``ObjectiveFile``) and its adapter, or ``(None, None)``.

    A teacher read from an artifact (``teacher.cache``) is built from the artifact's config
    on the ``meta`` device: no weights are loaded or allocated. ``weights=True`` loads the
    teacher's ``model``/``config`` even then (to build the artifact)."""
    if spec.teacher is None:
        return None, None
    head = _head(spec, registry)
    cache = getattr(spec.teacher, "cache", None)
    if cache is not None and not weights:
        from ..objective.artifact import artifact_dir

        teacher = build_on_meta(artifact_dir(cache, base_dir), head, registry, what="teacher.cache")
        return teacher, registry.for_model(teacher)
    if spec.teacher.model is None and spec.teacher.config is None:
        raise ModelError("teacher: only 'cache' is given, so the teacher's weights are unknown")
    teacher = _load(
        spec.teacher, head, registry, base_dir, "teacher", attn_implementation, num_labels
    )
    return teacher, registry.for_model(teacher)


def _head(spec: Any, registry: ArchitectureRegistry) -> str:
    task = spec.data.task if spec.data is not None else None
    return default_head(task, spec.teacher or spec.student, registry)


def build_student(
    spec: Any,
    registry: ArchitectureRegistry,
    *,
    base_dir: Path,
    teacher: Any = None,
    teacher_adapter: ArchitectureAdapter | None = None,
    attn_implementation: str | None = None,
    num_labels: int | None = None,
) -> Models:
    """The student of ``spec``, built from ``teacher`` when its recipe says so."""
    student_spec = spec.student
    if student_spec is None:
        raise ModelError("the objective file has no student section")
    head = _head(spec, registry)
    recipe: dict[str, Any] = {}
    needs_teacher = student_spec.teacher_layers is not None or (
        student_spec.factorize is not None and student_spec.model is None
    )
    if needs_teacher and teacher is None:
        raise ModelError("the student is built from the teacher, but there is no teacher section")
    if needs_teacher and any(p.is_meta for p in teacher.parameters()):
        raise ModelError(
            "the student is built from the teacher's weights, but the teacher is read from "
            "an artifact (teacher.cache) without them: give the student by 'model' or 'config'"
        )
    if student_spec.teacher_layers is not None:
        assert teacher_adapter is not None
        student = select_layers(teacher, teacher_adapter, student_spec.teacher_layers)
        recipe["teacher_layers"] = list(student_spec.teacher_layers)
    elif student_spec.model is not None or student_spec.config is not None:
        student = _load(
            student_spec, head, registry, base_dir, "student", attn_implementation, num_labels
        )
        recipe["source"] = "model" if student_spec.model is not None else "config"
    else:
        student = copy.deepcopy(teacher)
        recipe["source"] = "teacher copy"
    for p in student.parameters():
        p.requires_grad_(True)
    student_adapter = registry.for_model(student)
    report = None
    if student_spec.factorize is not None:
        f = student_spec.factorize
        report = factorize(
            student,
            student_adapter,
            modules=f.modules,
            rank=f.rank,
            budget=f.budget,
            layers=f.layers,
        )
        recipe["factorize"] = f.model_dump(mode="json", exclude_none=True)
    return Models(
        student=student,
        student_adapter=student_adapter,
        teacher=teacher,
        teacher_adapter=teacher_adapter,
        head=head,
        recipe=recipe,
        factorization=report,
    )


def load_tokenizers(spec: Any, *, base_dir: Path) -> tuple[Any, Any]:
    """``(teacher_tokenizer, student_tokenizer)``: each section's ``tokenizer``, else its
    model directory's; a student without one of its own uses the teacher's (None when
    neither is known)."""
    teacher_tok = student_tok = None
    if spec.teacher is not None:
        fallback = spec.teacher.model
        cache = getattr(spec.teacher, "cache", None)
        if fallback is None and cache is not None:  # the artifact's copy of the tokenizer
            from ..objective.artifact import TOKENIZER, artifact_dir

            fallback = str(artifact_dir(cache, base_dir) / TOKENIZER)
        teacher_tok = _tokenizer(spec.teacher.tokenizer, fallback, base_dir, "teacher.tokenizer")
    if spec.student is not None and (spec.student.tokenizer or spec.student.model):
        student_tok = _tokenizer(
            spec.student.tokenizer, spec.student.model, base_dir, "student.tokenizer"
        )
    return teacher_tok, student_tok


def build_models(
    spec: Any,
    registry: ArchitectureRegistry,
    *,
    base_dir: Path,
    attn_implementation: str | None = None,
    num_labels: int | None = None,
    load_tokenizers_too: bool = True,
) -> Models:
    """Build the teacher and the student of ``spec`` (an ``ObjectiveFile``)."""
    teacher, teacher_adapter = build_teacher(
        spec,
        registry,
        base_dir=base_dir,
        attn_implementation=attn_implementation,
        num_labels=num_labels,
    )
    models = build_student(
        spec,
        registry,
        base_dir=base_dir,
        teacher=teacher,
        teacher_adapter=teacher_adapter,
        attn_implementation=attn_implementation,
        num_labels=num_labels,
    )
    if load_tokenizers_too:
        models.teacher_tokenizer, models.student_tokenizer = load_tokenizers(
            spec, base_dir=base_dir
        )
    return models


def logit_level_aspects(root: Any, head: str) -> list[str]:
    """Paths of the aspects that compare distributions over the vocabulary: LM logits on
    both sides, or teacher-generated token sequences."""
    from ..features import Feature

    lm = head in ("causal_lm", "masked_lm")
    out = []
    for aspect in root.walk():
        if aspect.is_combinator:
            continue
        requests = aspect.requires()
        sides = {r.side for r in requests if r.feature is Feature.LOGITS}
        generated = any(r.feature is Feature.GENERATED for r in requests)
        if (lm and sides == {"teacher", "student"}) or generated:
            out.append(aspect.path or aspect.name)
    return out


def check_vocabulary(models: Models, root: Any) -> None:
    """Teacher and student must read the same token ids (one batch feeds both); aspects
    over the vocabulary also need equal output vocabularies. Raises ``VocabularyError``."""
    from .tokenizers import check_vocabularies

    if models.teacher is None:
        return
    check_vocabularies(
        models.teacher_tokenizer,
        models.student_tokenizer,
        teacher_vocab_size=getattr(models.teacher.config, "vocab_size", None),
        student_vocab_size=getattr(models.student.config, "vocab_size", None),
        logit_aspects=logit_level_aspects(root, models.head),
    )
