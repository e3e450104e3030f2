"""``makd student``: build an objective's models and report what the student is."""

from __future__ import annotations

from typing import Any


def build_student_report(resolved: Any, architectures: Any = None) -> tuple[dict[str, Any], Any]:
    """Build the teacher and student of ``resolved`` and describe them: parameter counts,
    layers, the factorization, and the features the objective will capture."""
    from .capture import CapturePlan
    from .engine.seeding import seeded
    from .models import ArchitectureError, make_architecture_registry
    from .models.build import build_student, build_teacher, check_vocabulary, load_tokenizers
    from .objective.sections import TrainingSection

    architectures = architectures or make_architecture_registry()
    spec = resolved.spec
    seed = (spec.training or TrainingSection()).seed
    finetune = spec.teacher.finetune if spec.teacher is not None else None
    # each on the random stream makd run builds it on: the student makd run starts from
    with seeded(finetune.seed if finetune is not None else seed, "teacher_init"):
        teacher, teacher_adapter = build_teacher(spec, architectures, base_dir=resolved.base_dir)
    with seeded(seed, "student_init"):
        models = build_student(
            spec,
            architectures,
            base_dir=resolved.base_dir,
            teacher=teacher,
            teacher_adapter=teacher_adapter,
        )
    models.teacher_tokenizer, models.student_tokenizer = load_tokenizers(
        spec, base_dir=resolved.base_dir
    )
    check_vocabulary(models, resolved.root)
    plan = CapturePlan.from_requests(resolved.requires())
    teacher_pair = None
    if models.teacher is not None:
        teacher_pair = (
            models.teacher_adapter,
            models.teacher_adapter.model_info(models.teacher.config),
        )
    student_pair = (
        models.student_adapter,
        models.student_adapter.model_info(models.student.config),
    )
    problems = plan.check(teacher_pair, student_pair)
    if problems:
        raise ArchitectureError("; ".join(problems))
    counts = models.parameters()
    report: dict[str, Any] = {"head": models.head, "recipe": models.recipe}
    for name, model, adapter in (
        ("teacher", models.teacher, models.teacher_adapter),
        ("student", models.student, models.student_adapter),
    ):
        if model is None:
            continue
        report[name] = {
            "class": type(model).__name__,
            "architecture": adapter.name,
            "layers": len(adapter.layers(model)),
            "parameters": counts[name].as_dict(),
        }
    if "teacher" in counts:
        report["student_to_teacher_non_embedding"] = counts["student"].non_embedding / max(
            counts["teacher"].non_embedding, 1
        )
    if models.factorization is not None:
        f = models.factorization
        report["factorization"] = {
            "summary": f.summary(),
            "before": f.before.as_dict(),
            "after": f.after.as_dict(),
            "ranks": f.ranks(),
            "kept_dense": f.kept_dense,
        }
    report["capture"] = plan.summary()
    return report, models
