"""``makd run``: from an objective file to a trained student, metrics and plots.

Order of work: resolve the file; load the tokenizer and the data; build (and, with
``teacher.finetune``, train or reuse) the teacher; build the student; check vocabularies and
the capture plan; then train, evaluating on a schedule, checkpointing atomically, and finally
write the student, ``metrics.jsonl`` and PNG plots into the run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..capture import CapturePlan
from ..errors import ExitCode, MakdError, ObjectiveError
from ..objective.sections import TrainingSection
from .distributed import World, close_world, init_world
from .evaluate import MAIN_METRIC, evaluate
from .reporting import METRICS, MetricsLog, StepProgress, read_metrics
from .trainer import Trainer, seed_everything

CHECKPOINT = "checkpoint"
STUDENT = "student"
#: fault injection for tests: the process kills itself (SIGKILL) after this step
FAULT_ENV = "MAKD_FAULT_AT_STEP"


class RunError(MakdError):
    """The run directory or the command line does not allow this run."""

    exit_code = ExitCode.INVALID_INPUT


@dataclass
class RunOptions:
    output: Path | None = None
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    overrides: tuple[str, ...] = ()


def _device(training: TrainingSection) -> torch.device:
    if training.device == "cuda" or (training.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RunError("training.device: cuda was asked for, but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


def _bf16(training: TrainingSection, device: torch.device) -> bool:
    if training.precision == "bf16":
        return True
    return training.precision == "auto" and device.type == "cuda"


def _require(resolved: Any, section: str, key: str | None, message: str) -> None:
    path: tuple[Any, ...] = (section,) if key is None else (section, key)
    raise ObjectiveError([resolved.source.diagnostic(path[:1], message)])


class Run:
    """One ``makd run``."""

    def __init__(self, path: str | Path, options: RunOptions, console: Console) -> None:
        from ..models import make_architecture_registry
        from ..objective import load_objective
        from ..plugins import make_plugin_manager, make_registry

        self.path = Path(path)
        self.options = options
        self.console = console
        pm = make_plugin_manager()
        self.registry = make_registry(pm)
        self.architectures = make_architecture_registry(pm)
        self.resolved = load_objective(
            self.path, self.registry, architectures=self.architectures, overrides=options.overrides
        )
        self.spec = self.resolved.spec
        self.base_dir = self.resolved.base_dir
        if self.spec.student is None:
            _require(self.resolved, "objective", None, "makd run needs a 'student' section")
        if self.spec.data is None or self.spec.data.train is None:
            _require(self.resolved, "objective", None, "makd run needs 'data' with 'train'")
        self.training = self.spec.training or TrainingSection()
        self.device = _device(self.training)
        self.bf16 = _bf16(self.training, self.device)
        self.run_dir = options.output or Path("runs") / self.path.stem
        self.world: World = World()

    # -- helpers -----------------------------------------------------------------------

    def autocast(self) -> Any:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _bar_console(self) -> Console:
        """Progress bars show on the main process only."""
        return self.console if self.world.main else Console(quiet=True)

    def say(self, text: str) -> None:
        if self.world.main:
            self.console.print(text, markup=False, highlight=False)

    def _prepare_run_dir(self) -> None:
        checkpoint = self.run_dir / CHECKPOINT
        if self.options.resume:
            if not (checkpoint / "state.json").is_file():
                raise RunError(f"--resume: {checkpoint} holds no checkpoint to resume from")
            return
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not self.options.overwrite:
                raise RunError(
                    f"run directory {self.run_dir} is not empty: pass --resume to continue "
                    "it, --overwrite to replace it, or --output for another directory"
                )
            if self.world.main:
                shutil.rmtree(self.run_dir)
        self.world.barrier()

    # -- the run -----------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        self.world = init_world(self.device.type)
        try:
            return self._execute()
        finally:
            close_world(self.world)

    def _execute(self) -> dict[str, Any]:
        from ..data.tasks import load_task_data
        from ..models.build import build_student, build_teacher, check_vocabulary, load_tokenizers

        if not self.options.dry_run:
            self._prepare_run_dir()
        seed_everything(self.training.seed)
        teacher_tok, student_tok = load_tokenizers(self.spec, base_dir=self.base_dir)
        tokenizer = student_tok or teacher_tok
        data = load_task_data(self.spec.data, tokenizer, base_dir=self.base_dir)
        teacher, teacher_adapter = build_teacher(
            self.spec, self.architectures, base_dir=self.base_dir, num_labels=data.num_labels
        )
        plan = CapturePlan.from_requests(self.resolved.requires())
        teacher_eval: dict[str, float] = {}
        self.finetune_plan: dict[str, Any] | None = None
        if teacher is not None:
            teacher = teacher.to(self.device)
            if self.spec.teacher.finetune is not None and self.options.dry_run:
                from .teacher import cache_root, teacher_key

                cached = cache_root() / "teachers" / teacher_key(self.spec, self.base_dir)
                self.finetune_plan = {
                    "steps": self.spec.teacher.finetune.steps,
                    "cache": str(cached),
                    "cached": (cached / "makd_student.json").is_file(),
                }
            elif self.spec.teacher.finetune is not None:
                teacher, teacher_eval = self._finetuned_teacher(
                    teacher, teacher_adapter, data, tokenizer
                )
            elif self.spec.teacher.config is not None and (
                plan.needs_teacher_forward or plan.teacher.generated
            ):
                raise ObjectiveError(
                    [
                        self.resolved.source.diagnostic(
                            ("teacher", "config"),
                            "this teacher is built from a config, so its weights are random, "
                            "but the objective distils from it: add 'finetune: {steps: N}' "
                            "to the teacher section, or give a trained 'model'",
                        )
                    ]
                )
        models = build_student(
            self.spec,
            self.architectures,
            base_dir=self.base_dir,
            teacher=teacher,
            teacher_adapter=teacher_adapter,
            num_labels=data.num_labels,
        )
        models.teacher_tokenizer, models.student_tokenizer = teacher_tok, student_tok
        check_vocabulary(models, self.resolved.root)
        if not self.options.dry_run:
            self._seqkd_pass(teacher, data, tokenizer)
        student = models.student.to(self.device)
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            if self.bf16:
                teacher.to(torch.bfloat16)
        if self.options.dry_run:
            return self._plan_report(models, data, plan)
        return self._train(models, student, teacher, data, tokenizer, teacher_eval)

    def _finetuned_teacher(
        self, teacher: Any, adapter: Any, data: Any, tokenizer: Any
    ) -> tuple[Any, dict[str, float]]:
        from ..models.serialization import load_student, read_record, save_student
        from .teacher import (
            cache_root,
            ce_objective,
            copy_for_training,
            finetune_training,
            teacher_key,
        )

        key = teacher_key(self.spec, self.base_dir)
        directory = cache_root() / "teachers" / key
        if not (directory / "makd_student.json").is_file():
            self.say(
                f"training the teacher ({self.spec.teacher.finetune.steps} steps, "
                f"cached as {directory})"
            )
            training = finetune_training(self.spec)
            model = copy_for_training(teacher)
            trainer = Trainer(
                student=model,
                student_adapter=adapter,
                root=ce_objective(self.registry),
                data=data,
                training=training,
                pad_id=_pad_id(tokenizer),
                device=self.device,
                autocast=self.autocast,
                rank=self.world.rank,
                world_size=self.world.world_size,
            )
            start = time.perf_counter()
            try:
                bar = StepProgress(training.steps, 0, self._bar_console(), [], label="teacher")
                with bar as progress:
                    while trainer.step < training.steps:
                        result = _finite_step(trainer, "the teacher's own")
                        progress.update(result.step, result.loss, {})
            finally:
                trainer.close()
            scores = self._evaluate(model, data, tokenizer)
            self.say(
                f"teacher trained in {time.perf_counter() - start:.0f}s: " + _fmt_scores(scores)
            )
            if self.world.main:
                save_student(
                    model,
                    directory,
                    tokenizer=tokenizer,
                    record={"teacher_key": key, "eval": scores},
                )
            self.world.barrier()
        record = read_record(directory) or {}
        teacher = load_student(directory).to(self.device)
        return teacher, dict(record.get("eval") or {})

    def _teacher_id(self) -> str:
        from .teacher import teacher_key

        t = self.spec.teacher
        if t.finetune is not None:
            return "finetuned:" + teacher_key(self.spec, self.base_dir)
        return json.dumps(t.model_dump(mode="json"), sort_keys=True)

    def _seqkd_pass(self, teacher: Any, data: Any, tokenizer: Any) -> None:
        from .seqkd import (
            apply_targets,
            cache_key,
            generate_targets,
            load_or_generate,
            seqkd_config,
        )
        from .teacher import cache_root

        config = seqkd_config(self.resolved.root)
        if config is None:
            return
        if teacher is None:
            _require(self.resolved, "objective", None, "seqkd needs a teacher section")
        key = cache_key(self._teacher_id(), self.spec.data, tokenizer, config)
        directory = (
            (self.base_dir / config.cache_dir) if config.cache_dir else cache_root() / "seqkd"
        )
        cache_file = directory / f"{key}.safetensors"

        def make() -> dict[str, Any]:
            start = time.perf_counter()
            targets = generate_targets(
                teacher,
                data,
                tokenizer,
                config,
                batch_size=self.training.eval_batch_size or self.training.batch_size,
                device=self.device,
                autocast=self.autocast,
                max_length=self.spec.data.max_length,
                seed=self.training.seed,
            )
            self.say(
                f"seqkd: the teacher labelled {len(data.train)} training rows in "
                f"{time.perf_counter() - start:.0f}s"
            )
            return targets

        if self.world.main:
            targets, cached = load_or_generate(cache_file, make)
            if cached:
                self.say(f"seqkd: reusing the teacher's targets from {cache_file}")
        self.world.barrier()
        if not self.world.main:
            targets, _ = load_or_generate(cache_file, make)
        apply_targets(data, targets)

    def _evaluate(self, model: Any, data: Any, tokenizer: Any) -> dict[str, float]:
        if not self.world.main or data.validation is None:
            return {}
        return evaluate(
            model,
            data,
            tokenizer,
            batch_size=self.training.eval_batch_size or self.training.batch_size,
            device=self.device,
            autocast=self.autocast if self.bf16 else None,
            max_new_tokens=self.spec.data.max_new_tokens,
        )

    def _train(
        self,
        models: Any,
        student: Any,
        teacher: Any,
        data: Any,
        tokenizer: Any,
        teacher_eval: dict[str, float],
    ) -> dict[str, Any]:
        from ..models.serialization import save_student

        training = self.training
        run_dir = self.run_dir
        if self.world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "objective.yaml").write_text(
                self.path.read_text(encoding="utf-8"), encoding="utf-8"
            )
            if self.options.overrides:
                (run_dir / "overrides.txt").write_text(
                    "".join(f"--set {o}\n" for o in self.options.overrides), encoding="utf-8"
                )
            (run_dir / "objective.resolved.json").write_text(
                json.dumps(self.resolved.dump(), indent=2) + "\n", encoding="utf-8"
            )
        trainer = Trainer(
            student=student,
            student_adapter=models.student_adapter,
            root=self.resolved.root,
            data=data,
            training=training,
            pad_id=_pad_id(tokenizer),
            device=self.device,
            teacher=teacher,
            teacher_adapter=models.teacher_adapter,
            autocast=self.autocast,
            rank=self.world.rank,
            world_size=self.world.world_size,
            cache_dir=run_dir,
        )
        if training.teacher_cache is not None and self.world.world_size > 1:
            raise RunError(
                "training.teacher_cache: the teacher cache is for single-process runs (each "
                "process would need every example's features)"
            )
        state: dict[str, Any] = {}
        if self.options.resume:
            state = trainer.resume(run_dir / CHECKPOINT)
            self.say(f"resumed from step {trainer.step} ({run_dir / CHECKPOINT})")
        metrics = (
            MetricsLog(run_dir / METRICS, keep_until=trainer.step if self.options.resume else None)
            if self.world.main
            else None
        )
        if teacher is not None and not teacher_eval:
            teacher_eval = dict(state.get("teacher_eval") or {}) or self._evaluate(
                teacher, data, tokenizer
            )
        if metrics is not None and teacher_eval and not self.options.resume:
            metrics.write({"kind": "eval", "step": 0, "teacher": teacher_eval})
        fault = int(os.environ.get(FAULT_ENV, "0") or 0)
        top_terms = [c.path for c in self.resolved.root.children][:3]
        student_eval: dict[str, float] = {}
        start = time.perf_counter()
        bar = StepProgress(training.steps, trainer.step, self._bar_console(), top_terms)
        with bar as progress:
            while trainer.step < training.steps:
                result = _finite_step(trainer, "the student's")
                step = result.step
                if self.world.main:
                    progress.update(step, result.loss, result.terms)
                    if step % training.log_every == 0 or step == training.steps:
                        metrics.write(
                            {
                                "kind": "train",
                                "step": step,
                                "loss": result.loss,
                                "lr": result.lr,
                                "grad_norm": result.grad_norm,
                                "terms": result.terms,
                                "elapsed_s": time.perf_counter() - start,
                            }
                        )
                last = step == training.steps
                if (training.eval_every and step % training.eval_every == 0) or last:
                    student_eval = self._evaluate(student, data, tokenizer)
                    if self.world.main and student_eval:
                        metrics.write(
                            {
                                "kind": "eval",
                                "step": step,
                                "student": student_eval,
                                "teacher": teacher_eval,
                            }
                        )
                        progress.note(f"step {step}: student {_fmt_scores(student_eval)}")
                if training.checkpoint_every and step % training.checkpoint_every == 0:
                    if self.world.main:
                        trainer.save(run_dir / CHECKPOINT, {"teacher_eval": teacher_eval})
                    self.world.barrier()
                if fault and step == fault:
                    os.kill(os.getpid(), signal.SIGKILL)
        trainer.close()
        elapsed = time.perf_counter() - start
        summary = {
            "objective": str(self.path),
            "run_dir": str(run_dir),
            "steps": training.steps,
            "train_seconds": elapsed,
            "final_loss": result.loss if training.steps > 0 else None,
            "student": student_eval,
            "teacher": teacher_eval,
            "main_metric": MAIN_METRIC[data.task],
            "parameters": {k: v.as_dict() for k, v in models.parameters().items()},
        }
        if self.world.main:
            record = {
                "recipe": models.recipe,
                "objective": str(self.path),
                "eval": student_eval,
                "teacher_eval": teacher_eval,
            }
            save_student(student, run_dir / STUDENT, tokenizer=tokenizer, record=record)
            if len(list(trainer.modules.parameters())):
                from safetensors.torch import save_model

                save_model(trainer.modules, str(run_dir / STUDENT / "aspect_modules.safetensors"))
            from .plots import plot_run

            summary["plots"] = [str(p) for p in plot_run(read_metrics(run_dir / METRICS), run_dir)]
            (run_dir / "summary.json").write_text(
                json.dumps(summary, indent=2) + "\n", encoding="utf-8"
            )
        self.world.barrier()
        return summary

    def _plan_report(self, models: Any, data: Any, plan: CapturePlan) -> dict[str, Any]:
        from .memory import estimate_memory

        training = self.training
        micro = training.batch_size // training.gradient_accumulation
        return {
            "objective": str(self.path),
            "run_dir": str(self.run_dir),
            "device": str(self.device),
            "precision": "bf16 autocast" if self.bf16 else "fp32",
            "task": data.task,
            "examples": {
                "train": len(data.train),
                "validation": len(data.validation) if data.validation else 0,
            },
            "steps": training.steps,
            "batch_size": training.batch_size,
            "micro_batch": micro,
            "parameters": {k: v.as_dict() for k, v in models.parameters().items()},
            "recipe": models.recipe,
            "teacher_finetune": self.finetune_plan,
            "captured": plan.summary(),
            "memory_estimate_mb": estimate_memory(
                models, plan, micro, self.spec.data.max_length, bf16_teacher=self.bf16
            ),
        }


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad or 0)


def _fmt_scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) or "no validation data"


def _finite_step(trainer: Trainer, whose: str) -> Any:
    """One training step; a non-finite loss stops the run before it is saved or cached."""
    result = trainer.train_step()
    if not math.isfinite(result.loss):
        raise MakdError(f"{whose} loss is {result.loss} at step {result.step}")
    return result
