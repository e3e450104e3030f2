"""The training loop: one optimisation step = capture, objective, backward, clip, step.

:class:`Trainer` owns the student, the teacher, the objective tree and its trainable modules,
the optimizer and schedule, the data order and the checkpoints. Data order is a fixed
permutation per epoch drawn from the seed, so a resumed run sees exactly the batches an
uninterrupted one would. The objective's modules are built on their own random stream
(:mod:`.seeding`). With several processes, every mean in the losses is over the global
batch (:func:`makd_registry.losses.global_mean_scope`), so the processes' averaged gradient
is exactly the single-process one.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture import CapturePlan
from ..capture.extractor import FeatureExtractor, model_inputs
from ..capture.hooks import logits_of
from ..data.collate import collate
from ..losses import global_mean_scope
from ..objective.build import build_objective, third_party_failure
from ..weighting import weighted_loss
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .embeddings import EmbeddingGradients, freeze_input_embeddings
from .optim import make_optimizer
from .parallel import Placement, TrainState, make_parallel
from .seeding import purpose_seed, seed_all, seeded
from .terms import TermRecorder


class AspectModules(nn.Module):
    """The objective's trainable modules (alignment maps) under their stable names."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.names = dict(modules)
        self.inner = nn.ModuleDict({_key(k): m for k, m in modules.items()})


def _key(name: str) -> str:
    return name.replace(".", "__")


@dataclass
class StepResult:
    step: int
    loss: float
    terms: dict[str, float]
    lr: float
    grad_norm: float | None = None


@dataclass
class Trainer:
    """Everything one distillation run trains with."""

    student: nn.Module
    student_adapter: Any
    root: Any  # the objective's root aspect
    data: Any  # TaskData
    training: Any  # TrainingSection
    pad_id: int
    device: torch.device
    teacher: nn.Module | None = None
    teacher_adapter: Any = None
    autocast: Callable[[], Any] = contextlib.nullcontext
    rank: int = 0
    world_size: int = 1
    cache_dir: Path | None = None  # where training.teacher_cache files go (the run directory)
    source: Any = None  # the objective file's SourceMap, for located build errors
    #: (provider, needs) pairs whose provider transforms every training micro-batch
    batch_providers: list[tuple[Any, list[Any]]] = field(default_factory=list)
    eos_id: int | None = None
    #: a teacher artifact (``teacher.cache``): every batch's teacher features are read from
    #: it (the teacher is then a meta-device model, never run)
    teacher_artifact: Any = None
    #: how the processes share the student and the teacher (:mod:`.parallel`); None: one
    #: process, or ``replicate``
    parallel: Any = None
    step: int = 0
    epoch: int = 0
    position: int = 0
    modules: AspectModules = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: Any = field(init=False)

    def __post_init__(self) -> None:
        s_info = self.student_adapter.model_info(self.student.config)
        t_info = (
            self.teacher_adapter.model_info(self.teacher.config)
            if self.teacher is not None
            else s_info
        )
        with seeded(self.training.seed, "aspect_modules"):
            build_objective(self.root, t_info, s_info, self.source)
        self.modules = AspectModules(self.root.modules()).to(self.device)
        if getattr(self.training, "embeddings", "train") == "freeze":
            freeze_input_embeddings(self.student)
        if self.parallel is None:
            self.parallel = make_parallel(Placement(), self.world_size, self.device, False)
        # the student and the alignment modules, wrapped (DDP) or sharded (FSDP2) as one
        # module before the optimizer sees their parameters
        self.train_state = TrainState(self.student, self.modules)
        self.parallel.wrap(self.train_state, self.student_adapter)
        self.embedding_grads = EmbeddingGradients(
            self.student,
            self.device,
            compiled=bool(self.training.compile),
            enabled=self.parallel.sparse_embeddings,
        )
        params = [("student." + n, p) for n, p in self.student.named_parameters()]
        params += [("modules." + n, p) for n, p in self.modules.named_parameters()]
        self.optimizer, self.scheduler = make_optimizer(params, self.training)
        self.recorder = TermRecorder(self.root)
        self._extractors: dict[int, FeatureExtractor] = {}
        self._stack = contextlib.ExitStack()
        self.is_qa = self.data.task == "qa"

    # -- plans per stage ---------------------------------------------------------------

    def _stage(self) -> int:
        return self.root.active_stage(self.step)

    def extractor(self) -> FeatureExtractor:
        stage = self._stage()
        if stage not in self._extractors:
            node = self.root.stage_nodes()[stage]
            plan = CapturePlan.from_requests(node.requires())
            for old in self._extractors.values():
                old.close()
            fx = FeatureExtractor(
                plan,
                self.student,
                self.student_adapter,
                self.teacher if plan.needs_teacher_forward else None,
                self.teacher_adapter if plan.needs_teacher_forward else None,
                span_logits=self.is_qa,
                block_access=self.parallel.block_access,
            )
            if self.training.compile:
                # hooks stay on the student's modules; the forward runs compiled
                fx.student.model = self._compiled()
            self._extractors = {stage: self._stack.enter_context(fx)}
        return self._extractors[stage]

    def _compiled(self) -> nn.Module:
        if getattr(self, "_compiled_student", None) is None:
            self._compiled_student = torch.compile(self.student)
        return self._compiled_student

    def close(self) -> None:
        """Remove the capture hooks (the trainer can go on: they are installed again)."""
        self._stack.close()
        self._extractors.clear()

    def finish(self) -> None:
        """Training is over: hooks removed and the student's modules as they were."""
        self.close()
        self.embedding_grads.close()

    def place_teacher(self) -> None:
        """The teacher placed as ``training.distributed.teacher`` says (sharded for
        inference, or left whole); after its evaluation, before the first step."""
        if self.teacher is not None and self.teacher_artifact is None:
            self.parallel.place_teacher(self.teacher, self.teacher_adapter)

    # -- data --------------------------------------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        """The seeded permutation of the training rows for ``epoch`` (computed once)."""
        cached = getattr(self, "_order_cache", None)
        if cached is None or cached[0] != epoch:
            gen = torch.Generator().manual_seed(self.training.seed * 1_000_003 + epoch)
            self._order_cache = (
                epoch,
                torch.randperm(len(self.data.train), generator=gen).tolist(),
            )
        return self._order_cache[1]

    def _micro_indices(self) -> Iterator[list[int]]:
        """This rank's training rows of each micro-batch of the next optimisation step
        (advancing the data position)."""
        accum = self.training.gradient_accumulation
        micro = self.training.batch_size // accum
        order = self._order(self.epoch)
        for _ in range(accum):
            indices: list[int] = []
            while len(indices) < micro:
                if self.position >= len(order):
                    self.epoch += 1
                    self.position = 0
                    order = self._order(self.epoch)
                take = min(micro - len(indices), len(order) - self.position)
                indices += order[self.position : self.position + take]
                self.position += take
            yield indices[self.rank :: self.world_size]

    def micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next optimisation step (as the providers that
        transform batches make them)."""
        for micro, mine in enumerate(self._micro_indices()):
            rows = [self.data.train[i] for i in mine]  # a datasets.Dataset or a list of rows
            batch = {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}
            batch["index"] = torch.tensor(mine)
            for provider, needs in self.batch_providers:
                batch = provider.transform_batch(needs, batch, self._batch_context(micro, mine))
            yield batch

    def _batch_context(self, micro: int, indices: list[int]) -> Any:
        from ..providers import BatchContext

        return BatchContext(
            student=self.student,
            step=self.step,
            micro=micro,
            indices=indices,
            seed_for=lambda purpose: purpose_seed(self.training.seed, purpose),
            device=self.device,
            autocast=self.autocast,
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            data=self.data,
        )

    def _refill_teacher_cache(self) -> None:
        """After a resume: the teacher cache of a stage whose first epoch was not complete
        at the checkpoint is rebuilt from the steps already taken (the same batches, so the
        same stored features), so that later epochs read exactly what an uninterrupted run
        reads."""
        if self.training.teacher_cache is None or self.teacher is None:
            return
        target = (self.step, self.epoch, self.position)
        self.step = self.epoch = self.position = 0
        try:
            while self.step < target[0]:
                cache = self.teacher_cache
                if cache is None or cache.complete:
                    for _ in self._micro_indices():  # only the data position moves
                        pass
                else:
                    fx = self.extractor()
                    for batch in self.micro_batches():
                        self._teacher_from_cache(fx, batch)
                self.step += 1
        finally:
            self.step, self.epoch, self.position = target

    # -- one step ----------------------------------------------------------------------

    def _global_count(self, count: torch.Tensor) -> torch.Tensor:
        """The denominator of a mean over ``count`` local elements: the count summed over
        the processes, divided by their number (see :func:`~makd_registry.losses.global_count`)."""
        import torch.distributed as dist

        total = count.detach().to(torch.float32).reshape(1).clone()
        dist.all_reduce(total)
        return total[0].clamp_min(1.0) / self.world_size

    def _scope(self) -> Any:
        if self.world_size > 1:
            return global_mean_scope(self._global_count)
        return contextlib.nullcontext()

    def train_step(self) -> StepResult:
        self.student.train()
        accum = self.training.gradient_accumulation
        fx = self.extractor()
        total = 0.0
        parallel = self.parallel
        for micro, batch in enumerate(self.micro_batches()):
            teacher = self._teacher_from_cache(fx, batch)
            with parallel.sync(micro == accum - 1):
                with self.autocast(), self._scope():
                    loss = parallel.forward(functools.partial(self._micro_loss, fx, batch, teacher))
                if loss.requires_grad:  # a micro-batch whose terms all skip it adds nothing
                    (loss / accum).backward()
            total += float(loss.detach()) / accum
        self.embedding_grads.densify()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        parallel.reduce_gradients(params)
        norm = None
        if self.training.max_grad_norm is not None:
            norm = parallel.clip(params, self.training.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        terms = self.recorder.pop()
        if self.world_size > 1:
            total, terms = self._average_logged(total, terms)
        return StepResult(self.step, total, terms, lr, norm)

    def _micro_loss(self, fx: FeatureExtractor, batch: dict, teacher: Any) -> torch.Tensor:
        """One micro-batch's weighted objective (inside :class:`TrainState`'s forward)."""
        features, outputs = fx(batch, step=self.step, teacher_features=teacher)
        try:
            loss = weighted_loss(self.root, features)
        except Exception as exc:  # a third-party aspect's bug is a plugin failure
            failure = third_party_failure(self.root, exc, f"at step {self.step + 1}")
            if failure is None:
                raise
            raise failure from None
        if not loss.requires_grad and self.parallel.collective_backward:
            # every process runs a backward (it is a collective under ddp and fsdp): a
            # micro-batch whose terms all skip it here adds zeros, as it adds nothing alone
            loss = loss + 0.0 * logits_of(outputs).float().sum()
        return loss

    def _average_logged(self, total: float, terms: dict[str, float]) -> tuple[float, dict]:
        """The logged loss and terms of the global batch: the mean over ranks."""
        import torch.distributed as dist

        names = sorted(terms)
        values = torch.tensor([total, *(terms[n] for n in names)], dtype=torch.float64)
        dist.all_reduce(values)
        values /= self.world_size
        return float(values[0]), {n: float(v) for n, v in zip(names, values[1:], strict=True)}

    @property
    def teacher_cache(self) -> Any:
        """The teacher cache of the current stage (one file per stage), or None."""
        options = self.training.teacher_cache
        if options is None or self.cache_dir is None or self.teacher is None:
            return None
        stage = self._stage()
        caches = self.__dict__.setdefault("_caches", {})
        if stage not in caches:
            from .teacher_cache import TeacherCache

            logits = {"causal_lm": "token", "instruction": "token", "qa": "span"}.get(
                self.data.task, "example"
            )
            caches[stage] = TeacherCache(
                self.cache_dir / f"teacher_cache-{stage}.safetensors",
                len(self.data.train),
                dtype=options.dtype,
                top_k=options.top_k,
                logits=logits,
            )
        return caches[stage]

    def _teacher_from_cache(self, fx: FeatureExtractor, batch: dict) -> Any:
        """With a teacher artifact: the batch's teacher features read from it (this rank's
        rows). With the teacher cache: read from it, or (first epoch) computed, stored, and
        returned. None without either (``fx`` runs the teacher itself)."""
        if self.teacher_artifact is not None and fx.teacher is not None:
            return self.teacher_artifact.assemble(
                batch["index"].tolist(),
                batch["input_ids"].shape[1],
                fx.plan,
                self.device,
                next(self.teacher.parameters()).dtype,
                getattr(self.teacher.config, "vocab_size", None),
            )
        cache = self.teacher_cache
        if cache is None or fx.teacher is None:
            return None
        indices = batch["index"].tolist()
        if cache.complete:
            dtype = next(self.teacher.parameters()).dtype
            return cache.assemble(
                indices,
                batch["input_ids"].shape[1],
                fx.plan,
                self.device,
                dtype,
                getattr(self.teacher.config, "vocab_size", None),
            )
        with self.autocast():
            feats, inputs = fx.run_teacher(model_inputs(batch))
        cache.store(indices, batch["attention_mask"].sum(-1).tolist(), feats, inputs)
        return feats, inputs

    # -- checkpoints -------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "position": self.position}

    def save(self, run_dir: Path, extra: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint of this step into ``run_dir`` (see :mod:`.checkpoint`):
        every process calls it (a collective)."""
        return save_checkpoint(
            run_dir,
            train_state=self.train_state,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state={
                **self.state(),
                **(extra or {}),
                "rank_rng": self.rank_rng_states(),
                "strategy": self.parallel.name,
            },
            rank=self.rank,
            world_size=self.world_size,
        )

    def rank_rng_states(self) -> list[dict[str, Any]]:
        """Every process's RNG states, in rank order (gathered: a collective)."""
        if self.world_size <= 1:
            return [rng_state()]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, rng_state())
        return out

    def resume(self, run_dir: Path) -> dict[str, Any]:
        """Continue from ``run_dir``'s checkpoint, written by any number of processes
        (every process calls it). Each process continues its own random streams when the
        number of processes is the one that wrote the checkpoint; otherwise each is
        reseeded from the seed, the step and its rank (``state["reseeded"]``)."""
        state = load_checkpoint(
            run_dir,
            train_state=self.train_state,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            world_size=self.world_size,
            sharded=self.parallel.sharded,
        )
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        ranks = state.get("rank_rng")
        if ranks and len(ranks) == self.world_size:
            set_rng_state(ranks[self.rank])  # each process continues its own streams
        elif ranks or self.world_size > 1:
            # another number of processes wrote it: the streams (dropout) cannot continue
            purpose = f"train:resume:{self.step}:{self.rank}/{self.world_size}"
            seed_all(purpose_seed(self.training.seed, purpose))
            state["reseeded"] = len(ranks) if ranks else 1
        # the learning rate of the next step follows this run's schedule (its total steps
        # may have grown since the checkpoint)
        sched = self.scheduler
        for group, base, factor in zip(
            self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.close()
        self._refill_teacher_cache()
        self.close()
        return state
