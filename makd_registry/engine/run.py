"""``makd run``: from an objective file to a trained student, metrics and plots.

A run is **plan → setup → train → finish**.

**Plan** (:meth:`Run.plan`), which writes nothing: resolve the file; check the run directory
(writable; empty, ``--overwrite`` or a ``--resume`` whose objective is unchanged); load the
tokenizers and the data and check them; build the teacher (the cached fine-tuned one when
there is one) and the student; check vocabularies, the capture plan, every aspect against
the models' shapes, every requirement against its provider, the batch against the data, and
the memory estimate against the machine. Any problem stops the run here with its exit
code, before anything is written.

**Setup** (:meth:`Run.setup`): train the teacher when ``teacher.finetune`` asks and it is
not cached (through the same loop as the student, writing only the cache), and serve the
requirements' providers (e.g. SeqKD's generation pass).

**Train** (:meth:`Run.train`): open the run directory (moving a previous run aside for
``--overwrite``) and run :func:`~makd_registry.engine.loop.fit`, whose callbacks log,
evaluate, write atomic checkpoints and turn SIGINT/SIGTERM into a checkpoint and exit 130.

**Finish** (:meth:`Run.finish`): write the student, its alignment maps, the plots and
``summary.json``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from .. import __version__
from ..callbacks import LoopState
from ..capture import CapturePlan
from ..errors import ObjectiveError
from ..features import Feature
from ..objective.sections import TrainingSection
from .distributed import World, close_world, init_world
from .evaluate import MAIN_METRIC, evaluate
from .loop import LoopHost, fit
from .reporting import METRICS, MetricsLog, StepProgress, read_metrics
from .rundir import (
    OBJECTIVE_COPY,
    OVERRIDES,
    RESOLVED,
    SUMMARY,
    RunDirectory,
    RunError,
    fingerprint,
    input_fingerprints,
)
from .seeding import purpose_seed, seed_all, seeded
from .stopping import Interrupted, StopRequests
from .trainer import Trainer

STUDENT = "student"

__all__ = ["Run", "RunError", "RunOptions"]


@dataclass
class RunOptions:
    output: Path | None = None
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    overrides: tuple[str, ...] = ()
    #: ``makd teacher cache``: the teacher's weights are loaded even with ``teacher.cache``,
    #: and no student section is needed
    build_artifact: bool = False


@dataclass
class Plan:
    """Everything :meth:`Run.plan` checked and built; nothing of it is on disk yet."""

    teacher_tokenizer: Any
    student_tokenizer: Any
    data: Any
    teacher: Any
    teacher_adapter: Any
    teacher_cached: bool  # the fine-tuned teacher came from the cache
    models: Any  # Models: the student (rebuilt after the teacher's own training)
    capture: CapturePlan
    resolved: dict[str, Any]
    inputs: dict[str, Any]
    memory_mb: dict[str, float]
    finetune: dict[str, Any] | None = None
    teacher_eval: dict[str, float] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        return self.student_tokenizer or self.teacher_tokenizer


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


@dataclass
class Setup:
    """What :meth:`Run.setup` prepared for training."""

    plan: Plan
    models: Any
    student: Any
    teacher: Any
    teacher_eval: dict[str, float]


class Run:
    """One ``makd run``."""

    def __init__(self, path: str | Path, options: RunOptions, console: Console) -> None:
        from ..objective import load_objective
        from ..plugins import load_plugins

        self.path = Path(path)
        self.options = options
        self.console = console
        self.plugins = load_plugins()  # once per command
        self.registry, self.architectures = self.plugins.registry, self.plugins.architectures
        self.resolved = load_objective(
            self.path, self.registry, architectures=self.architectures, overrides=options.overrides
        )
        self.spec = self.resolved.spec
        self.base_dir = self.resolved.base_dir
        if self.spec.student is None and not options.build_artifact:
            self._refuse(("objective",), "makd run needs a 'student' section")
        if self.spec.data is None or self.spec.data.train is None:
            self._refuse(("objective",), "makd run needs 'data' with 'train'")
        self.training = self.spec.training or TrainingSection()
        self.device = _device(self.training)
        self.bf16 = _bf16(self.training, self.device)
        self.run_dir = options.output or Path("runs") / self.path.stem
        if options.resume and options.overwrite:
            raise RunError("--resume and --overwrite exclude each other")
        self.world: World = World()
        #: how the processes share the models, decided by the plan (:mod:`.parallel`)
        from .parallel import Placement

        self.placement = Placement()
        self.rundir = RunDirectory(self.run_dir, resume=options.resume, overwrite=options.overwrite)
        #: the teacher artifact the run reads (``teacher.cache``), opened by the plan
        self.artifact_dir: Path | None = None
        self.artifact: Any = None
        cache = getattr(self.spec.teacher, "cache", None) if self.spec.teacher else None
        if cache is not None and not options.build_artifact:
            from ..objective.artifact import artifact_dir

            self.artifact_dir = artifact_dir(cache, self.base_dir)

    # -- helpers -----------------------------------------------------------------------

    def _refuse(self, path: tuple[Any, ...], message: str) -> None:
        raise ObjectiveError([self.resolved.source.diagnostic(path, message)])

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

    def resume_command(self) -> str:
        """The command that continues this run."""
        args = ["run", str(self.path), "--output", str(self.run_dir), "--resume"]
        for item in self.options.overrides:
            args += ["--set", item]
        if self.world.world_size > 1:
            head = ["torchrun", f"--nproc_per_node={self.world.world_size}", "-m"]
            return shlex.join([*head, "makd_registry.cli", *args])
        return shlex.join(["makd", *args])

    # -- the run -----------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        self.world = init_world(self.device.type)
        self.rundir.main = self.world.main
        try:
            return self._execute()
        finally:
            close_world(self.world)

    def _execute(self) -> dict[str, Any]:
        point = self._check_run_dir()
        self.world.barrier()  # every process has checked the directory before rank 0 writes
        if point is not None and point.finished and not self.options.dry_run:
            summary = json.loads((self.run_dir / SUMMARY).read_text(encoding="utf-8"))
            further = (
                "give --set training.steps=N to train further"
                if point.step == summary.get("steps")
                else "it has no final checkpoint to train further from: set "
                "training.checkpoint_every for runs you may want to extend"
            )
            done = (
                f"stopped at step {summary['stopped_at']} of {summary.get('steps')} "
                f"({summary.get('stop_reason')})"
                if "stopped_at" in summary
                else f"finished its {summary.get('steps')} steps"
            )
            self.say(f"{self.run_dir} already {done}: nothing to do ({further})")
            return {**summary, "already_finished": True}
        plan = self.plan()
        if self.options.dry_run:
            return self._plan_report(plan)
        return self.train(self.setup(plan))

    def setup(self, plan: Plan) -> Setup:
        """After the plan: the teacher (trained through the same loop, or read from the
        cache), the student built from it, the providers' requirements served, the models
        placed. Writes nothing in the run directory."""
        teacher, teacher_eval = self._teacher(plan)
        models = plan.models
        if teacher is not plan.teacher:  # trained now: build the student from it
            models = self._build_student(teacher, plan.teacher_adapter, plan.data)
            self._check_models(models, plan)
        # an artifact's teacher has no weights: providers get none
        self._provide(None if self.artifact is not None else teacher, plan.data, plan.tokenizer)
        student = models.student.to(self.device)
        if teacher is not None:
            self._prepare_teacher(teacher)
        return Setup(plan, models, student, teacher, teacher_eval or plan.teacher_eval)

    def _prepare_teacher(self, teacher: Any) -> None:
        """Eval mode, no gradients; on CUDA with bf16, bf16 weights."""
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self.bf16 and self.device.type == "cuda":  # memory; on the CPU autocast alone
            teacher.to(torch.bfloat16)

    # -- plan ----------------------------------------------------------------------------

    def _check_run_dir(self) -> Any:
        """The run directory may be used (see :class:`RunDirectory`); for ``--resume``,
        where it continues from. Reads only."""
        for leftover in self.rundir.leftovers():
            self.say(
                f"note: {leftover} is a previous run that an interrupted --overwrite moved "
                "aside; it is not used: delete it, or move it back to restore that run"
            )
        self._resolved_dump = self.resolved.dump()
        self._inputs = input_fingerprints(self.spec, self.base_dir)
        return self.rundir.check(self._resolved_dump, self._inputs, self.training.steps)

    def _load_inputs(self) -> tuple[Any, Any, Any]:
        """``(teacher tokenizer, student tokenizer, tokenised data)``."""
        from ..data.tasks import load_task_data
        from ..models.build import load_tokenizers

        teacher_tok, student_tok = load_tokenizers(self.spec, base_dir=self.base_dir)
        tokenizer = student_tok or teacher_tok
        data = load_task_data(self.spec.data, tokenizer, base_dir=self.base_dir)
        return teacher_tok, student_tok, data

    def _check_teacher_weights(self, teacher: Any, capture: CapturePlan) -> None:
        """A teacher built from a config without ``finetune`` has random weights: refused
        when the objective distils from it."""
        if (
            teacher is not None
            and self.artifact_dir is None
            and self.spec.teacher.finetune is None
            and self.spec.teacher.config is not None
            and (capture.needs_teacher_forward or capture.teacher.generated)
        ):
            self._refuse(
                ("teacher", "config"),
                "this teacher is built from a config, so its weights are random, but the "
                "objective distils from it: add 'finetune: {steps: N}' to the teacher "
                "section, or give a trained 'model'",
            )

    def plan(self) -> Plan:
        """Build and check everything the run needs; write nothing (see the module doc).
        The run directory has been checked by :meth:`_check_run_dir` first."""
        resolved, inputs = self._resolved_dump, self._inputs
        if self.artifact_dir is not None:
            self._check_artifact_objective()
        teacher_tok, student_tok, data = self._load_inputs()
        self._check_batch(data)
        teacher, adapter, cached, finetune, teacher_eval = self._initial_teacher(data)
        capture = CapturePlan.from_requests(self.resolved.requires())
        self._check_teacher_weights(teacher, capture)
        if self.artifact_dir is not None:
            teacher_eval = self._open_artifact(data, capture, teacher_tok, student_tok)
        self._check_needs()
        models = self._build_student(teacher, adapter, data)
        models.teacher_tokenizer, models.student_tokenizer = teacher_tok, student_tok
        plan = Plan(
            teacher_tokenizer=teacher_tok,
            student_tokenizer=student_tok,
            data=data,
            teacher=teacher,
            teacher_adapter=adapter,
            teacher_cached=cached,
            models=models,
            capture=capture,
            resolved=resolved,
            inputs=inputs,
            memory_mb={},
            finetune=finetune,
            teacher_eval=teacher_eval,
        )
        self._check_models(models, plan)
        plan.memory_mb = self._check_memory(models, capture)
        return plan

    def _check_needs(self) -> None:
        """Every requirement beyond features has a provider, and the provider accepts it
        (problems located at the nodes that asked); nothing is written."""
        from ..objective.build import SOURCE_PATH
        from ..providers import PlanContext, collect_needs

        context = PlanContext(self.spec, self.base_dir, has_teacher=self.spec.teacher is not None)
        problems = []
        for kind, needs in collect_needs(self.resolved.root).items():
            provider = self.registry.provider(kind)
            if provider is None:
                problems.append(
                    (
                        needs[0].node,
                        f"'{needs[0].node.name}' needs '{kind}', which no installed plugin "
                        "provides (see makd plugins)",
                    )
                )
                continue
            problems += provider.check(needs, context)
        if problems:
            raise ObjectiveError(
                [
                    self.resolved.source.diagnostic(getattr(node, SOURCE_PATH, ("objective",)), m)
                    for node, m in problems
                ]
            )

    def _check_artifact_objective(self) -> None:
        """With ``teacher.cache``: what needs the teacher's weights is refused, located."""
        from ..objective.build import SOURCE_PATH

        spec = self.spec
        problems: list[tuple[tuple[Any, ...], str]] = []
        if self.training.teacher_cache is not None:
            problems.append(
                (
                    ("training", "teacher_cache"),
                    "the teacher's outputs already come from its artifact (teacher.cache): "
                    "drop training.teacher_cache",
                )
            )
        student = spec.student
        copy_note = (
            "is made from the teacher's weights, which a teacher read from its artifact "
            "(teacher.cache) does not have: give the student by 'model' or 'config'"
        )
        if student is not None and student.teacher_layers is not None:
            problems.append(
                (("student", "teacher_layers"), "a student of teacher layers " + copy_note)
            )
        elif student is not None and student.factorize is not None and student.model is None:
            problems.append(
                (("student", "factorize"), "a factorized copy of the teacher " + copy_note)
            )
        for node in self.resolved.root.walk():
            if node.is_combinator:
                continue
            where = getattr(node, SOURCE_PATH, ("objective",))
            generated = any(r.feature is Feature.GENERATED for r in node.requires())
            if generated or any(r.kind == "teacher_targets" for r in node.needs()):
                problems.append(
                    (
                        where,
                        f"'{node.name}' trains on sequences the teacher generates, which "
                        "needs the teacher's weights; its artifact (teacher.cache) holds only "
                        "its outputs on the training rows: give teacher.model or "
                        "teacher.config without cache for this objective",
                    )
                )
            elif any(self._transforms_batches(r.kind) for r in node.needs()):
                problems.append(
                    (
                        where,
                        f"'{node.name}' trains on batches made during training (its "
                        "provider transforms every batch, e.g. with the student's samples), "
                        "and the teacher's artifact (teacher.cache) holds only its outputs on "
                        "the training rows: give teacher.model or teacher.config without cache",
                    )
                )
        if problems:
            raise ObjectiveError(
                [self.resolved.source.diagnostic(where, message) for where, message in problems]
            )

    def _transforms_batches(self, kind: str) -> bool:
        provider = self.registry.provider(kind)
        return bool(getattr(provider, "transforms_batches", False))

    def _open_artifact(
        self, data: Any, capture: CapturePlan, teacher_tok: Any, student_tok: Any
    ) -> dict[str, float]:
        """Open the teacher artifact and check it against this objective (data,
        preprocessing, tokenizer, teacher, capture plan, shards); the teacher's stored
        scores when they were measured on this validation data. Refused, located at
        ``teacher.cache``, with every reason."""
        import dataclasses

        from ..models.build import default_head
        from .teacher_artifact import (
            ArtifactProblem,
            TeacherArtifact,
            check_artifact,
            stored_teacher_eval,
        )

        where = ("teacher", "cache")
        source = self.resolved.source
        assert self.artifact_dir is not None
        try:
            artifact = TeacherArtifact.open(self.artifact_dir)
        except ArtifactProblem as exc:
            diag = dataclasses.replace(source.diagnostic(where, str(exc)), code=exc.code)
            raise ObjectiveError([diag]) from None
        head = default_head(self.spec.data.task, self.spec.teacher, self.architectures)
        problems = check_artifact(
            artifact,
            self.spec,
            self.base_dir,
            data,
            capture,
            student_tok=student_tok,
            teacher_tok=teacher_tok,
            head=head,
        )
        if problems:
            raise ObjectiveError(
                [
                    dataclasses.replace(source.diagnostic(where, message), code=code)
                    for message, code in problems
                ]
            )
        self.artifact = artifact
        scores = stored_teacher_eval(artifact, self.spec, self.base_dir)
        if not scores and artifact.manifest.get("teacher_eval"):
            self.say(
                "note: the teacher's scores are not reported: its artifact measured them on "
                "other validation data"
            )
        return scores

    def _check_batch(self, data: Any) -> None:
        """Settings that cannot work with this data or this number of processes."""
        training = self.training
        examples = len(data.train)
        if training.batch_size > examples:
            self._refuse(
                ("training", "batch_size"),
                f"batch_size {training.batch_size} exceeds the {examples} training examples "
                "(after data.train_limit and filtering)",
            )
        micro = training.batch_size // training.gradient_accumulation
        if micro < self.world.world_size:
            self._refuse(
                ("training", "batch_size"),
                f"each micro-batch ({micro} examples) must give every one of the "
                f"{self.world.world_size} processes at least one example",
            )
        if training.teacher_cache is not None and self.world.world_size > 1:
            self._refuse(
                ("training", "teacher_cache"),
                "the teacher cache is for single-process runs (each process would need every "
                "example's features)",
            )
        finetune = self.spec.teacher.finetune if self.spec.teacher is not None else None
        if finetune is not None:
            batch = finetune.batch_size or training.batch_size
            where = ("teacher", "finetune", "batch_size" if finetune.batch_size else "steps")
            if batch > examples:
                self._refuse(
                    where,
                    f"the teacher's batch of {batch} exceeds the {examples} training examples",
                )
            if batch < self.world.world_size:
                self._refuse(
                    where,
                    f"the teacher's batch of {batch} must give every one of the "
                    f"{self.world.world_size} processes at least one example",
                )

    def _initial_teacher(self, data: Any) -> tuple[Any, Any, bool, dict | None, dict]:
        """The teacher as the run starts: built or loaded, or the cached fine-tuned one."""
        from ..models.build import build_teacher
        from ..models.serialization import load_student, read_record
        from .teacher import cache_root, teacher_key

        spec = self.spec
        if spec.teacher is None:
            return None, None, False, None, {}
        if self.artifact_dir is not None:  # on the meta device: no weights
            teacher, adapter = build_teacher(spec, self.architectures, base_dir=self.base_dir)
            self._check_labels(teacher, data, "teacher")
            return teacher, adapter, True, None, {}
        finetune = spec.teacher.finetune
        seed = finetune.seed if finetune is not None else self.training.seed
        with seeded(seed, "teacher_init"):  # a config-built teacher, a new task head
            teacher, adapter = build_teacher(
                spec,
                self.architectures,
                base_dir=self.base_dir,
                num_labels=data.num_labels,
                weights=True,
            )
        self._check_labels(teacher, data, "teacher")
        if finetune is None:
            return teacher, adapter, False, None, {}
        directory = cache_root() / "teachers" / teacher_key(spec, self.base_dir)
        cached = (directory / "makd_student.json").is_file()
        info = {"steps": finetune.steps, "cache": str(directory), "cached": cached}
        if not cached:
            return teacher, adapter, False, info, {}
        record = read_record(directory) or {}
        teacher = load_student(directory)
        return teacher, adapter, True, info, dict(record.get("eval") or {})

    def _check_labels(self, model: Any, data: Any, side: str) -> None:
        from ..data.sources import DataError

        if data.num_labels is None or model is None:
            return
        if not type(model).__name__.endswith("ForSequenceClassification"):
            return
        have = int(getattr(model.config, "num_labels", data.num_labels))
        if have != data.num_labels:
            names = getattr(data, "label_names", None)
            shown = f" ({', '.join(map(str, names))})" if names else ""
            raise DataError(
                f"data.train: the data has {data.num_labels} labels{shown}, but the {side}'s "
                f"classification head has {have} (num_labels in its config)"
            )

    def _build_student(self, teacher: Any, adapter: Any, data: Any) -> Any:
        from ..models.build import build_student

        with seeded(self.training.seed, "student_init"):
            models = build_student(
                self.spec,
                self.architectures,
                base_dir=self.base_dir,
                teacher=teacher,
                teacher_adapter=adapter,
                num_labels=data.num_labels,
            )
        self._check_labels(models.student, data, "student")
        _name_labels(models.student, data)
        return models

    def _check_models(self, models: Any, plan: Plan) -> None:
        """Vocabularies, the capture plan and every aspect against the real models."""
        from ..models.adapter import ArchitectureError
        from ..models.build import check_vocabulary
        from ..objective.build import build_objective

        models.teacher_tokenizer = plan.teacher_tokenizer
        models.student_tokenizer = plan.student_tokenizer
        check_vocabulary(models, self.resolved.root)
        s_info = models.student_adapter.model_info(models.student.config)
        t_pair = None
        t_info = s_info
        if models.teacher is not None:
            t_info = models.teacher_adapter.model_info(models.teacher.config)
            t_pair = (models.teacher_adapter, t_info)
        problems = plan.capture.check(t_pair, (models.student_adapter, s_info))
        if problems:
            raise ArchitectureError("; ".join(problems))
        probe = copy.deepcopy(self.resolved.root)
        build_objective(probe, t_info, s_info, self.resolved.source, meta=True)

    def _check_memory(self, models: Any, capture: CapturePlan) -> dict[str, float]:
        from .memory import available_memory_mb, estimate_memory

        micro = self.training.batch_size // self.training.gradient_accumulation
        estimate = estimate_memory(
            models, capture, micro, self.spec.data.max_length, bf16_teacher=self.bf16
        )
        if self.artifact is not None and "teacher_weights" in estimate:  # none resident
            estimate["total_excluding_activations"] -= estimate["teacher_weights"]
            estimate["teacher_weights"] = 0.0
        available = available_memory_mb(self.device)
        if available is not None and self.device.type == "cpu":
            available /= _local_processes(self.world.world_size)  # they share the machine
        available = self._smallest(available)  # every process decides alike
        self.placement = self._place(estimate, available)
        need = estimate["total_excluding_activations"]
        world = self.world.world_size
        if self.placement.strategy == "fsdp":  # each process holds its shard of the state
            need -= estimate["student_weights_grads_adam"] * (1 - 1 / world)
        if self.placement.teacher == "fsdp":
            need -= estimate.get("teacher_weights", 0.0) * (1 - 1 / world)
        if available is not None and need > available:
            raise RunError(
                f"this run needs at least {need / 1024:.1f} GiB on {self.device} per process "
                f"(student weights, gradients and AdamW state, the teacher, and the captured "
                f"features of a micro-batch of {micro}; activations not counted), but a "
                f"process has {available / 1024:.1f} GiB: lower training.batch_size (or raise "
                "gradient_accumulation), data.max_length, use a smaller student, or shard "
                "with more processes (training.distributed, docs/running.md)"
            )
        return estimate

    def _smallest(self, value: float | None) -> float | None:
        """The smallest of the processes' ``value`` (None where any has none): a collective."""
        import torch.distributed as dist

        if self.world.world_size <= 1 or not dist.is_initialized():
            return value
        low = torch.tensor(
            [-1.0 if value is None else float(value)], device=self._collective_device()
        )
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        return None if float(low) < 0 else float(low)

    def _place(self, estimate: dict[str, float], process_mb: float | None) -> Any:
        """``training.distributed`` decided for this run (:func:`.parallel.resolve_placement`),
        and what a sharded student or teacher cannot do refused, located."""
        from .parallel import resolve_placement

        section = self.training.distributed
        where = ("training", "distributed")
        problems: list[tuple[tuple[Any, ...], str]] = []
        unshardable = self._unshardable()
        if section.strategy == "fsdp":
            problems += [(where + ("strategy",), why) for why in unshardable]
        if section.teacher == "fsdp" and self.artifact_dir is not None:
            problems.append(
                (
                    where + ("teacher",),
                    "the teacher's outputs come from its artifact (teacher.cache): it has no "
                    "weights to shard; drop training.distributed.teacher",
                )
            )
        if section.teacher == "fsdp" and self.spec.teacher is None:
            problems.append((where + ("teacher",), "the objective has no teacher to shard"))
        if section.teacher_offload and section.teacher == "replicate":
            problems.append(
                (
                    where + ("teacher_offload",),
                    "offloading keeps a sharded teacher's shards in CPU memory: it needs "
                    "teacher: fsdp (or auto)",
                )
            )
        if problems:
            raise ObjectiveError(
                [self.resolved.source.diagnostic(at, message) for at, message in problems]
            )
        if unshardable and section.strategy == "auto":  # auto never picks what cannot run
            section = section.model_copy(update={"strategy": "ddp"})
        placement = resolve_placement(
            section,
            self.world.world_size,
            student_state_mb=estimate.get("student_weights_grads_adam", 0.0),
            teacher_mb=estimate.get("teacher_weights", 0.0),
            process_memory_mb=process_mb,
            has_teacher=self.spec.teacher is not None and self.artifact_dir is None,
        )
        if placement.teacher_offload and self.device.type != "cuda":
            self.say(
                "note: training.distributed.teacher_offload has no effect on the CPU (the "
                "teacher's shards are in CPU memory already)"
            )
        return placement

    def _unshardable(self) -> list[str]:
        """Why this objective cannot train a sharded (fsdp) student; empty when it can."""
        out = []
        if self.training.compile:
            out.append(
                "training.compile and a sharded student (fsdp) are not combined by makd: "
                "compile with strategy ddp or replicate"
            )
        for kind in sorted(self._batch_kinds()):
            out.append(
                f"'{kind}' makes batches with the student during training (e.g. GKD's "
                "samples), which a student sharded across processes cannot do in step: use "
                "strategy ddp or replicate"
            )
        return out

    def _batch_kinds(self) -> set[str]:
        from ..providers import collect_needs

        return {
            kind for kind in collect_needs(self.resolved.root) if self._transforms_batches(kind)
        }

    # -- act -----------------------------------------------------------------------------

    def _teacher(self, plan: Plan) -> tuple[Any, dict[str, float]]:
        """The teacher to distil from: trained now (and cached) when it is not cached."""
        teacher = plan.teacher
        if teacher is None:
            return None, {}
        if self.artifact is not None:  # the meta-device teacher: its outputs are stored
            return teacher, plan.teacher_eval
        teacher = teacher.to(self.device)
        if self.spec.teacher.finetune is None or plan.teacher_cached:
            return teacher, plan.teacher_eval
        return self._finetune_teacher(teacher, plan)

    def _finetune_teacher(self, teacher: Any, plan: Plan) -> tuple[Any, dict[str, float]]:
        from ..models.serialization import load_student, read_record, save_student
        from .callbacks import FiniteLossGuard, ProgressBar, StopOnSignal, fmt_scores
        from .teacher import (
            cache_root,
            copy_for_training,
            finetune_training,
            task_objective,
            teacher_key,
        )

        key = teacher_key(self.spec, self.base_dir)
        directory = cache_root() / "teachers" / key
        finetune = self.spec.teacher.finetune
        if self.world.main:
            self.say(f"training the teacher ({finetune.steps} steps, cached as {directory})")
        training = finetune_training(self.spec)
        model = copy_for_training(teacher)
        start = time.perf_counter()
        with seeded(finetune.seed, "teacher_train"):
            trainer = Trainer(
                student=model,
                student_adapter=plan.teacher_adapter,
                root=task_objective(self.registry),
                data=plan.data,
                training=training,
                pad_id=_pad_id(plan.tokenizer),
                device=self.device,
                autocast=self.autocast,
                rank=self.world.rank,
                world_size=self.world.world_size,
                parallel=self._parallel(),
            )
            fit(
                trainer,
                [
                    FiniteLossGuard("the teacher's own"),
                    ProgressBar(
                        lambda: StepProgress(
                            training.steps, 0, self._bar_console(), [], label="teacher"
                        ),
                        show_terms=False,
                    ),
                    *self._plugin_callbacks("teacher"),
                    StopOnSignal(self._stop_agreed, before_end=False),
                ],
                LoopState(role="teacher", step=0, max_steps=training.steps, main=self.world.main),
                LoopHost(
                    evaluate=dict,
                    checkpoint=None,
                    evaluate_at_end=False,
                    interrupted=lambda at, reason: Interrupted(
                        f"interrupted by {reason} during the teacher's own training (step "
                        f"{at.step} of {training.steps}); nothing was saved: the next run "
                        "trains the teacher again"
                    ),
                ),
            )
        with trainer.parallel.full_student() as whole:  # a collective when sharded
            scores = self._evaluate(whole[0], plan.data, plan.tokenizer) if whole else {}
            self.say(
                f"teacher trained in {time.perf_counter() - start:.0f}s: " + fmt_scores(scores)
            )
            if self.world.main and whole is not None:
                save_student(
                    whole[0],
                    directory,
                    tokenizer=plan.tokenizer,
                    record={"teacher_key": key, "eval": scores},
                )
        trainer.parallel.close()
        self.world.barrier()
        record = read_record(directory) or {}
        return load_student(directory).to(self.device), dict(record.get("eval") or {})

    def _stop_agreed(self, stop: StopRequests) -> bool:
        """Whether any process was asked to stop (all processes stop at the same step)."""
        if self.world.world_size <= 1:
            return stop.requested
        import torch.distributed as dist

        # the signal number itself, so that every process reports the one that came
        flag = torch.tensor([float(stop.signal or 0)], device=self._collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            stop.signal = int(flag.item())
        return bool(flag.item() > 0)

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _teacher_id(self) -> str:
        from .teacher import teacher_key

        t = self.spec.teacher
        if t.finetune is not None:
            return "finetuned:" + teacher_key(self.spec, self.base_dir)
        return json.dumps(t.model_dump(mode="json", exclude={"cache"}), sort_keys=True)

    def _provide(self, teacher: Any, data: Any, tokenizer: Any) -> None:
        """Before training: each provider serves the requirements of its kind."""
        from ..providers import ProviderContext, collect_needs
        from .teacher import cache_root

        needs = collect_needs(self.resolved.root)
        if not needs:
            return
        context = ProviderContext(
            spec=self.spec,
            base_dir=self.base_dir,
            teacher=teacher,
            data=data,
            tokenizer=tokenizer,
            device=self.device,
            autocast=self.autocast,
            bf16=self.bf16,
            cache_root=cache_root(),
            teacher_id=self._teacher_id() if self.spec.teacher is not None else "",
            say=self.say,
            random_stream=lambda purpose: seeded(self.training.seed, purpose),
            main=self.world.main,
            barrier=self.world.barrier,
        )
        for kind, kind_needs in needs.items():
            self.registry.provider(kind).provide(kind_needs, context)

    def _batch_providers(self) -> list[tuple[Any, list[Any]]]:
        """The providers that transform every training micro-batch, with their needs."""
        from ..providers import collect_needs

        out = []
        for kind, needs in collect_needs(self.resolved.root).items():
            provider = self.registry.provider(kind)
            if provider.transforms_batches:
                out.append((provider, needs))
        return out

    def _evaluate(self, model: Any, data: Any, tokenizer: Any) -> dict[str, float]:
        if not self.world.main or (data.validation is None and not data.extra_validation):
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

    def _evaluate_student(self, trainer: Trainer, data: Any, tokenizer: Any) -> dict[str, float]:
        """The student's scores, on the main process; a sharded student is gathered whole
        for it (a collective: every process calls this)."""
        with trainer.parallel.full_student() as whole:
            return self._evaluate(whole[0], data, tokenizer) if whole is not None else {}

    def _parallel(self) -> Any:
        """A fresh strategy object of this run's placement (:mod:`.parallel`)."""
        from .parallel import make_parallel

        return make_parallel(self.placement, self.world.world_size, self.device, self.bf16)

    def _record(self, plan: Plan) -> tuple[dict[str, Any], dict[str, str]]:
        """``run.json`` and the files a new run directory starts with."""
        record = {
            "makd": __version__,
            "file": str(self.path),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "overrides": list(self.options.overrides),
            "fingerprint": fingerprint(plan.resolved, plan.inputs),
            "inputs": plan.inputs,
            "processes": self.world.world_size,
            "distributed": self.placement.describe(),
            "labels": getattr(plan.data, "label_names", None),
        }
        files = {
            OBJECTIVE_COPY: self.path.read_text(encoding="utf-8"),
            RESOLVED: json.dumps(plan.resolved, indent=2) + "\n",
        }
        if self.options.overrides:
            files[OVERRIDES] = "".join(f"--set {o}\n" for o in self.options.overrides)
        return record, files

    def train(self, setup: Setup) -> dict[str, Any]:
        """Distil: the trainer (resumed, or seeded afresh), then :func:`fit` inside the run
        directory's transaction, then :meth:`finish`."""
        plan, models, student, teacher = setup.plan, setup.models, setup.student, setup.teacher
        teacher_eval = setup.teacher_eval
        training = self.training
        run_dir = self.run_dir
        data, tokenizer = plan.data, plan.tokenizer
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
            source=self.resolved.source,
            teacher_artifact=self.artifact,
            batch_providers=self._batch_providers(),
            eos_id=getattr(tokenizer, "eos_token_id", None),
            parallel=self._parallel(),
        )
        state: dict[str, Any] = {}
        if self.options.resume:
            state = trainer.resume(run_dir)  # reads only: the checkpoint is checked first
        else:
            # dropout's own stream, one per process (rank 0: the single-process stream)
            rank = self.world.rank
            seed_all(purpose_seed(training.seed, "train" if rank == 0 else f"train:{rank}"))
        record, files = self._record(plan)
        with self.rundir.transaction(record, files):
            self.world.barrier()
            if self.rundir.previous is not None:
                self.say(
                    f"the previous run is kept at {self.rundir.previous} until this run's first "
                    "checkpoint"
                )
            if self.options.resume:
                accepted = self.rundir.resume_point.changes if self.rundir.resume_point else []
                note = (
                    ("; changed: " + "; ".join(c.describe() for c in accepted)) if accepted else ""
                )
                self.say(f"resumed from step {trainer.step} ({run_dir / 'checkpoint'}){note}")
                if state.get("reseeded"):
                    self.say(
                        f"note: the checkpoint was written by {state['reseeded']} process(es) "
                        f"and this run has {self.world.world_size}: each process's random "
                        "streams (dropout) start afresh from the seed, so the steps from here "
                        "differ from a run that kept its number of processes wherever dropout "
                        "is on"
                    )
            summary = self._loop(trainer, plan, models, student, teacher, teacher_eval, state)
            self.finish(setup, trainer, summary)
        return summary

    def finish(self, setup: Setup, trainer: Trainer, summary: dict[str, Any]) -> None:
        """The run's outputs (main process): the student and its alignment maps, the
        plots, ``summary.json`` (written last: a run with a summary is finished)."""
        from ..models.serialization import save_student

        run_dir = self.run_dir
        with trainer.parallel.full_student() as whole:  # a collective when sharded
            if self.world.main and whole is not None:
                student, modules = whole
                save_student(
                    student,
                    run_dir / STUDENT,
                    tokenizer=setup.plan.tokenizer,
                    record={
                        "recipe": setup.models.recipe,
                        "objective": str(self.path),
                        "eval": summary["student"],
                        "teacher_eval": summary["teacher"],
                        "distributed": {
                            "processes": self.world.world_size,
                            **self.placement.describe(),
                        },
                    },
                )
                if len(list(modules.parameters())):
                    from safetensors.torch import save_model

                    save_model(modules, str(run_dir / STUDENT / "aspect_modules.safetensors"))
        trainer.parallel.close()
        if self.world.main:
            from .plots import plot_run

            summary["plots"] = [str(p) for p in plot_run(read_metrics(run_dir / METRICS), run_dir)]
            (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        self.world.barrier()

    def _loop(
        self,
        trainer: Trainer,
        plan: Plan,
        models: Any,
        student: Any,
        teacher: Any,
        teacher_eval: dict[str, float],
        state: dict[str, Any],
    ) -> dict[str, Any]:
        from .callbacks import (
            CheckpointSchedule,
            EvaluationSchedule,
            FaultInjection,
            FiniteLossGuard,
            MetricsLogger,
            ProgressBar,
            StopOnSignal,
        )

        training = self.training
        run_dir = self.run_dir
        data, tokenizer = plan.data, plan.tokenizer
        metrics = (
            MetricsLog(run_dir / METRICS, keep_until=trainer.step if self.options.resume else None)
            if self.world.main
            else None
        )
        if teacher is not None and not teacher_eval and self.artifact is None:
            teacher_eval = dict(state.get("teacher_eval") or {}) or self._evaluate(
                teacher, data, tokenizer
            )
        if metrics is not None and teacher_eval and not self.options.resume:
            metrics.write({"kind": "eval", "step": 0, "teacher": teacher_eval})
        trainer.place_teacher()  # sharded (teacher fsdp) only now: it was evaluated whole
        top_terms = [c.path for c in self.resolved.root.children][:3]
        saved_at = trainer.step if self.options.resume else -1
        extra = {"teacher_eval": teacher_eval}
        loop = LoopState(
            role="student",
            step=trainer.step,
            max_steps=training.steps,
            run_dir=run_dir,
            loss=state.get("final_loss"),
            main_metric=MAIN_METRIC[data.task],
            main=self.world.main,
        )

        def save() -> Path:
            nonlocal saved_at
            if saved_at != trainer.step:
                extra["final_loss"] = loop.loss
                trainer.save(run_dir, extra)  # a collective: every process takes part
                self.world.barrier()
                saved_at = trainer.step
            self.rundir.commit()
            return run_dir / "checkpoint"

        def interrupted(at: LoopState, reason: str) -> BaseException:
            return Interrupted(
                f"interrupted by {reason} at step {at.step} of {training.steps}: checkpoint "
                f"saved in {run_dir / 'checkpoint'}; continue with: {self.resume_command()}"
            )

        host = LoopHost(
            evaluate=lambda: self._evaluate_student(trainer, data, tokenizer),
            checkpoint=save,
            interrupted=interrupted,
            checkpoint_at_end=bool(training.checkpoint_every),
        )
        callbacks = [
            FiniteLossGuard("the student's"),
            ProgressBar(
                lambda: StepProgress(training.steps, trainer.step, self._bar_console(), top_terms)
            ),
            MetricsLogger(metrics, training.log_every, teacher_eval),
            EvaluationSchedule(training.eval_every),
            CheckpointSchedule(training.checkpoint_every),
            *self._plugin_callbacks("student"),
            FaultInjection(),
            StopOnSignal(self._stop_agreed),
        ]
        start = time.perf_counter()
        control = fit(trainer, callbacks, loop, host)
        student_eval = loop.scores
        if loop.evaluated_at != trainer.step:  # a resumed run with no step left to train
            student_eval = self._evaluate_student(trainer, data, tokenizer)
        summary = {
            "objective": str(self.path),
            "run_dir": str(run_dir),
            "steps": training.steps,
            "train_seconds": time.perf_counter() - start,
            "final_loss": loop.loss,
            "student": student_eval,
            "teacher": teacher_eval,
            "main_metric": MAIN_METRIC[data.task],
            "parameters": {k: v.as_dict() for k, v in models.parameters().items()},
        }
        if control.should_stop and trainer.step < training.steps:
            summary["stopped_at"] = trainer.step
            summary["stop_reason"] = control.stop_reason
            self.say(f"stopped at step {trainer.step} of {training.steps}: {control.stop_reason}")
        return summary

    def _plugin_callbacks(self, role: str) -> list[Any]:
        """The callbacks ``training.callbacks`` lists, built from their configs, for the
        loops of ``role``."""
        out = []
        for config in self.training.callbacks:
            cls = self.registry.callback(config.type)
            if role in cls.roles:
                out.append(cls(config))
        return out

    def _plan_report(self, plan: Plan) -> dict[str, Any]:
        training = self.training
        point = self.rundir.resume_point
        return {
            "objective": str(self.path),
            "run_dir": str(self.run_dir),
            "resume_from_step": point.step if point is not None else None,
            "device": str(self.device),
            "precision": "bf16 autocast" if self.bf16 else "fp32",
            "task": plan.data.task,
            "examples": _example_counts(plan.data),
            "labels": getattr(plan.data, "label_names", None),
            "steps": training.steps,
            "batch_size": training.batch_size,
            "micro_batch": training.batch_size // training.gradient_accumulation,
            "parameters": {k: v.as_dict() for k, v in plan.models.parameters().items()},
            "recipe": plan.models.recipe,
            "teacher_finetune": plan.finetune,
            "teacher_cache": str(self.artifact_dir) if self.artifact_dir is not None else None,
            "captured": plan.capture.summary(),
            "memory_estimate_mb": plan.memory_mb,
            "processes": self.world.world_size,
            "distributed": self.placement.describe(),
        }


def _example_counts(data: Any) -> dict[str, int]:
    """Rows of each split; for QA also the questions (a long context gives several windows)."""
    out = {
        "train": len(data.train),
        "validation": len(data.validation) if data.validation is not None else 0,
    }
    raw = data.validation_raw
    if data.task == "qa" and isinstance(raw, dict) and "answers" in raw:
        out["validation_questions"] = len(raw["answers"])
    for name, (rows, _) in getattr(data, "extra_validation", {}).items():
        out[f"{name}.validation"] = len(rows)
    return out


def _name_labels(model: Any, data: Any) -> None:
    """Classification: the label names become the model's ``id2label``/``label2id``, so
    that the saved student predicts names in plain transformers."""
    names = getattr(data, "label_names", None)
    if not names or not type(model).__name__.endswith("ForSequenceClassification"):
        return
    model.config.id2label = {i: str(n) for i, n in enumerate(names)}
    model.config.label2id = {str(n): i for i, n in enumerate(names)}


def _local_processes(world_size: int) -> int:
    """The processes of this run on this machine (``torchrun`` sets LOCAL_WORLD_SIZE)."""
    import os

    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    except ValueError:
        return max(1, world_size)


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad or 0)
