"""Multi-process data parallelism under ``torchrun`` (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def init_world(device_kind: str) -> World:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``...), or a
    single-process world when there is none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local)
    return World(dist.get_rank(), dist.get_world_size(), local)


def close_world(world: World) -> None:
    if world.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            import gc

            gc.collect()  # wrappers (DDP, FSDP2) still holding the group go first
            dist.destroy_process_group()
