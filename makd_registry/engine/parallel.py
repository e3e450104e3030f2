"""How several processes share a run (``training.distributed``).

The **student** and the objective's trainable modules (alignment maps) form one module,
:class:`TrainState`, whose ``forward`` runs a whole micro-batch: the capture forward of
both models, the student's modules applied to the teacher's inputs, and the weighted
objective. A wrapper around it therefore sees every use of every trained parameter, which
a wrapper around the student alone does not (an alignment map, or a student projection
applied to a teacher's activations, runs outside the student's forward).

- ``replicate``: every process holds the whole student; after the backward one coalesced
  all-reduce averages every gradient (makd's own loop, the behaviour before FSDP).
- ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel` around :class:`TrainState`
  (bucketed all-reduce overlapping the backward; ``no_sync`` on all micro-batches but the
  last of a step).
- ``fsdp``: FSDP2 (:func:`~torch.distributed.fsdp.fully_shard`). Each transformer block of
  the student is its own unit; :class:`TrainState` is the root unit, holding the rest of the
  student (embeddings, final norm, head) and the alignment modules. A block's parameters
  are gathered while it runs, and gathered explicitly (``block.unshard()``, through the
  capture's ``block_access``) before one of its modules is applied to a teacher's input.
  Gradients are reduce-scattered, clipping uses the global norm, AdamW steps on the shards.
  With bf16 on CUDA, parameters are gathered in bf16 and gradients reduced in fp32.

The **teacher** is placed on its own: ``replicate`` (whole on every process) or ``fsdp``
(sharded per block for inference only, no gradients or optimizer state; with
``teacher_offload`` on CUDA its shards stay in CPU memory).

Every mean in the losses is over the global batch (:mod:`makd_registry.losses`), and every
strategy averages the processes' gradients, so each computes the single-process update.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: the share of a process's device memory above which ``auto`` shards a model
AUTO_SHARE = 0.25


class TrainState(nn.Module):
    """The trained modules as one module: ``student`` and ``aspects`` (the objective's
    alignment modules). ``forward(compute)`` returns ``compute()``: the micro-batch's loss,
    computed inside the module's forward so that a wrapper sees it all."""

    def __init__(self, student: nn.Module, aspects: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.aspects = aspects

    def forward(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return compute()


@dataclass(frozen=True)
class Placement:
    """The resolved strategies of a run (``auto`` decided)."""

    strategy: str = "replicate"  # replicate | ddp | fsdp
    teacher: str = "replicate"  # replicate | fsdp
    teacher_offload: bool = False
    reshard_after_forward: bool = True

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "teacher": self.teacher,
            "teacher_offload": self.teacher_offload,
        }


def resolve_placement(
    section: Any,
    world_size: int,
    *,
    student_state_mb: float,
    teacher_mb: float,
    process_memory_mb: float | None,
    has_teacher: bool,
) -> Placement:
    """``training.distributed`` with ``auto`` decided for this model and machine. One
    process: nothing to share (replicate). ``auto`` shards a model whose memory would take
    more than :data:`AUTO_SHARE` of a process's device memory."""
    if world_size <= 1:
        return Placement()

    def big(mb: float) -> bool:
        return process_memory_mb is not None and mb > AUTO_SHARE * process_memory_mb

    strategy = section.strategy
    if strategy == "auto":
        strategy = "fsdp" if big(student_state_mb) else "ddp"
    teacher = section.teacher
    if teacher == "auto":
        teacher = "fsdp" if has_teacher and big(teacher_mb) else "replicate"
    return Placement(
        strategy=strategy,
        teacher=teacher if has_teacher else "replicate",
        teacher_offload=bool(section.teacher_offload) and teacher == "fsdp",
        reshard_after_forward=bool(section.reshard_after_forward),
    )


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are on the meta device (no memory; ties kept;
    buffers copied): the skeleton a gathered state dict is loaded into."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    return copy.deepcopy(module, memo)


class Parallel:
    """One process, or ``replicate``: every process holds everything; gradients averaged
    by one coalesced all-reduce after the backward."""

    name = "replicate"
    #: whether a micro-batch's backward is a collective (every process must run one)
    collective_backward = False
    #: the capture's ``block_access`` (a block's parameters reached outside its forward)
    block_access: Callable[[nn.Module], None] | None = None

    def __init__(self, placement: Placement, world_size: int, device: torch.device, bf16: bool):
        self.placement = placement
        self.world_size = world_size
        self.device = device
        self.bf16 = bf16
        self.state: TrainState | None = None
        self.module: nn.Module | None = None  # what runs a micro-batch (maybe a wrapper)

    @property
    def sharded(self) -> bool:
        return False

    @property
    def sparse_embeddings(self) -> bool:
        """Whether the CPU sparse-gradient path of the word embeddings may be used."""
        return True

    def wrap(self, state: TrainState, adapter: Any) -> None:
        """Before the optimizer is built (a wrapper may replace the parameters)."""
        self.state = self.module = state

    def forward(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        assert self.module is not None
        return self.module(compute)

    def sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around one micro-batch's forward and backward: ``last`` is the step's last."""
        return contextlib.nullcontext()

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """After the step's backwards: every process holds the global batch's gradient."""
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # one flag per parameter, reduced with the gradients: whether any process gave it one
        used = torch.tensor([float(p.grad is not None) for p in params])
        flat = torch.cat([*(g.reshape(-1).float() for g in grads), used])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g, flag in zip(params, grads, flat[-len(params) :].tolist(), strict=True):
            n = g.numel()
            # no process used it: no gradient, as with one process (AdamW leaves it alone)
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype) if flag > 0 else None
            offset += n

    def clip(self, params: list[nn.Parameter], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)
        return float(full() if callable(full) else norm)

    def place_teacher(self, teacher: nn.Module, adapter: Any) -> None:
        """Shard the teacher when its placement says so (after its evaluation)."""
        if self.placement.teacher == "fsdp" and self.world_size > 1:
            shard_for_inference(teacher, adapter, self)

    @contextlib.contextmanager
    def full_student(self) -> Iterator[tuple[nn.Module, nn.Module] | None]:
        """``(student, aspects)`` as whole, ordinary modules: on the main process (None on
        the others, whose parameters are sharded). A collective under fsdp."""
        assert self.state is not None
        yield self.state.student, self.state.aspects

    def close(self) -> None:
        self.module = self.state = None

    def mesh(self) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        # explicit: the default mesh follows the accelerator, not the run's device
        return init_device_mesh(self.device.type, (self.world_size,))


class DDPParallel(Parallel):
    """PyTorch's DistributedDataParallel around :class:`TrainState`."""

    name = "ddp"
    collective_backward = True

    @property
    def sparse_embeddings(self) -> bool:
        return False

    def wrap(self, state: TrainState, adapter: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.state = state
        ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
        # some parameters get no gradient in a step (a pooler under an LM objective, a
        # stage's alignment maps before the stage starts): found from the graph
        self.module = DistributedDataParallel(
            state, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False
        )

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        # averaged during the backward; a parameter no process used keeps no gradient
        return None

    def sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        assert self.module is not None
        return contextlib.nullcontext() if last else self.module.no_sync()


class FSDPParallel(Parallel):
    """FSDP2: the student's blocks and :class:`TrainState` (its root) sharded."""

    name = "fsdp"
    collective_backward = True

    @property
    def sharded(self) -> bool:
        return True

    @property
    def sparse_embeddings(self) -> bool:
        return False

    def _policy(self) -> dict[str, Any]:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.bf16 and self.device.type == "cuda":
            return {
                "mp_policy": MixedPrecisionPolicy(
                    param_dtype=torch.bfloat16, reduce_dtype=torch.float32
                )
            }
        return {}

    def wrap(self, state: TrainState, adapter: Any) -> None:
        from torch.distributed.fsdp import fully_shard

        self._skeleton = _meta_copy(state)  # what a gathered state dict is loaded into
        mesh = self.mesh()
        policy = self._policy()
        for block in adapter.layers(state.student):
            fully_shard(
                block,
                mesh=mesh,
                reshard_after_forward=self.placement.reshard_after_forward,
                **policy,
            )
        fully_shard(state, mesh=mesh, **policy)
        # a parameter that gets no gradient on one process still takes part in the
        # reduce-scatter (with zeros): the processes' collectives always match
        state.set_reduce_scatter_unused_params(True)
        self.state = self.module = state

    # every micro-batch's gradients are reduce-scattered (sync() stays the default): holding
    # them unsharded across the micro-batches of a step would cost the memory fsdp saves

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        _drop_unused(params)  # reduce-scattered during the backward, unused ones as zeros

    @staticmethod
    def _gather_block(block: nn.Module) -> None:
        unshard = getattr(block, "unshard", None)
        if callable(unshard):
            unshard()  # freed again after the block's backward

    block_access = _gather_block

    @contextlib.contextmanager
    def full_student(self) -> Iterator[tuple[nn.Module, nn.Module] | None]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        assert self.state is not None
        full = get_model_state_dict(
            self.state, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not full:  # not the main process: its part has been sent
            yield None
            return
        whole = _meta_copy(self._skeleton)
        whole.load_state_dict(full, strict=True, assign=True)
        tie = getattr(whole.student, "tie_weights", None)
        if callable(tie):
            tie()
        del full
        try:
            yield whole.student.to(self.device), whole.aspects.to(self.device)
        finally:
            del whole

    def close(self) -> None:
        self._skeleton = None
        super().close()


def _drop_unused(params: list[nn.Parameter]) -> None:
    """A parameter that no process used in the step comes back from FSDP2's reduce-scatter
    of unused parameters with a gradient of zeros; with one process it has none, and AdamW
    leaves it alone (no weight decay, no moment update). Every process agrees which
    gradients are zero everywhere (one small all-reduce) and drops them. A used parameter
    whose gradient is exactly zero on every process is dropped too, which one process would
    not do: that needs an exactly zero gradient tensor."""
    import torch.distributed as dist

    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    flags = []
    for p in with_grad:
        grad = p.grad
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        flags.append(local.detach().abs().amax() if local.numel() else local.new_zeros(()))
    nonzero = torch.stack([f.float().reshape(()) for f in flags])
    dist.all_reduce(nonzero, op=dist.ReduceOp.MAX)
    for p, value in zip(with_grad, nonzero.tolist(), strict=True):
        if value == 0.0:
            p.grad = None


def shard_for_inference(model: nn.Module, adapter: Any, parallel: Parallel) -> None:
    """FSDP2 over a model that only runs forwards (the teacher): per block, parameters
    freed after each block's forward; on CUDA with ``teacher_offload``, shards in CPU memory."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = parallel.mesh()
    extra: dict[str, Any] = {}
    if parallel.placement.teacher_offload and parallel.device.type == "cuda":
        extra["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for block in adapter.layers(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True, **extra)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, **extra)


STRATEGIES: dict[str, type[Parallel]] = {
    "replicate": Parallel,
    "ddp": DDPParallel,
    "fsdp": FSDPParallel,
}


def make_parallel(
    placement: Placement, world_size: int, device: torch.device, bf16: bool
) -> Parallel:
    cls = STRATEGIES[placement.strategy] if world_size > 1 else Parallel
    return cls(placement, world_size, device, bf16)
