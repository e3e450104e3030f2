"""``makd student``: build an objective's models and report what the student is."""

from __future__ import annotations

from typing import Any


def build_student_report(resolved: Any, architectures: Any = None) -> tuple[dict[str, Any], Any]:
    """Build the teacher and student of ``resolved`` and describe them: parameter counts,
    layers, the factorization, and the features the objective will capture."""
    from .capture import CapturePlan
    from .engine.seeding import seeded
    from .models import ArchitectureError, make_architecture_registry
    from .models.build import build_models, check_vocabulary
    from .objective.sections import TrainingSection

    architectures = architectures or make_architecture_registry()
    seed = (resolved.spec.training or TrainingSection()).seed
    with seeded(seed, "student_init"):  # the student makd run would start from
        models = build_models(resolved.spec, architectures, base_dir=resolved.base_dir)
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
