"""Random streams: one per purpose, each derived from the seed and the purpose alone.

What a run draws at random — the student's initial weights, the aspects' alignment maps,
the teacher's own initialisation and training, SeqKD sampling, dropout during distillation
— must depend only on the objective file and its seed, never on what ran before it (a
teacher trained in this process or read from the cache, a SeqKD pass generated or reused).
So nothing draws from a shared global stream: each purpose runs inside :func:`seeded`,
which seeds torch (CPU and CUDA), Python's ``random`` and NumPy from
``purpose_seed(seed, purpose)`` and restores the previous states afterwards.
The data order has its own ``torch.Generator`` (see the trainer).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch

#: the purposes of a run's random streams (documentation; any string works)
PURPOSES = (
    "student_init",  # a student built from a config, or any random part of its recipe
    "aspect_modules",  # alignment maps and other trainable modules of the objective
    "teacher_init",  # a teacher built from a config before its own training
    "teacher_train",  # dropout during the teacher's own training
    # requirement providers draw from purposes they name themselves
    "train",  # dropout during distillation (restored from checkpoints on resume)
)


def purpose_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed from ``seed`` and ``purpose`` (stable across processes and versions)."""
    digest = hashlib.sha256(f"makd:{int(seed)}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), Python's ``random`` and NumPy."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def seeded(seed: int, purpose: str) -> Iterator[None]:
    """Run the block on the random stream of ``purpose``; the global streams are restored
    afterwards, so the block neither depends on nor disturbs what runs around it."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        seed_all(purpose_seed(seed, purpose))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
