"""Training the teacher itself (``teacher.finetune``), cached by its settings.

The fine-tuned teacher is stored under ``$MAKD_CACHE_DIR`` (default ``~/.cache/makd``) in
``teachers/<hash>``, where the hash covers the teacher section, the data section, the
training settings its own training uses, the training file's size and modification time,
and makd's version: a second run (or another objective file with the same teacher) reuses it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .. import __version__


def cache_root() -> Path:
    return Path(os.environ.get("MAKD_CACHE_DIR") or Path.home() / ".cache" / "makd")


def teacher_key(spec: Any, base_dir: Path) -> str:
    data = spec.data
    train = (base_dir / data.train).resolve() if data.train else None
    stamp = None
    if train is not None and train.is_file():
        stat = train.stat()
        stamp = [str(train), stat.st_size, int(stat.st_mtime)]
    training = finetune_training(spec).model_dump(
        mode="json",
        exclude={
            "log_every",
            "eval_every",
            "checkpoint_every",
            "eval_batch_size",
            "teacher_cache",
            "distributed",
        },
    )
    payload = {
        # where the teacher's outputs are read from is not part of the teacher
        "teacher": spec.teacher.model_dump(mode="json", exclude={"cache"}),
        "training": training,  # everything the teacher's own training step depends on
        "data": data.model_dump(mode="json", exclude={"validation", "validation_limit"}),
        "train_file": stamp,
        "makd": __version__,
        # 2: the teacher's initialisation and training draw from their own seeded streams
        "format": 2,
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def finetune_training(spec: Any) -> Any:
    """The training section of the teacher's own training."""
    from ..objective.sections import TrainingSection

    f = spec.teacher.finetune
    base = spec.training or TrainingSection()
    return base.model_copy(
        update={
            "steps": f.steps,
            "learning_rate": f.learning_rate,
            "batch_size": f.batch_size or base.batch_size,
            "gradient_accumulation": 1,
            "warmup_steps": f.warmup_steps,
            "seed": f.seed,
            "eval_every": None,
            "checkpoint_every": None,
            "schedule": "linear",
            "embeddings": "train",  # a student setting: the teacher trains all its weights
        }
    )


def task_objective(registry: Any) -> Any:
    """A one-node objective of the registered task loss (the teacher's own training)."""
    cls = registry.task_loss()
    return cls(cls.Config(type=cls.name), path=f"teacher/{cls.name}")


def copy_for_training(teacher: Any) -> Any:
    model = copy.deepcopy(teacher)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
