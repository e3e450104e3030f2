"""Resumable checkpoints, written atomically.

A checkpoint directory holds the student's weights and the aspects' trainable modules
(safetensors), the optimizer and scheduler state (``torch.save``, loaded back with
``weights_only=True``), the RNG states and the data position (JSON). It is written to a
temporary sibling and renamed into place: a run killed while saving keeps its previous
checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.serialization import atomic_directory

STATE = "state.json"


def save_checkpoint(
    directory: Path,
    *,
    student: torch.nn.Module,
    modules: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> None:
    from safetensors.torch import save_model

    rng = {
        "python": _jsonable(random.getstate()),
        "numpy": _numpy_state(),
    }
    with atomic_directory(directory) as tmp:
        save_model(student, str(tmp / "student.safetensors"))
        if len(list(modules.parameters())):
            save_model(modules, str(tmp / "modules.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            tmp / "optimizer.pt",
        )
        (tmp / STATE).write_text(json.dumps({**state, "rng": rng}, indent=1), encoding="utf-8")


def load_checkpoint(
    directory: Path,
    *,
    student: torch.nn.Module,
    modules: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns the saved ``state``."""
    from safetensors.torch import load_model

    state = json.loads((directory / STATE).read_text(encoding="utf-8"))
    load_model(student, str(directory / "student.safetensors"), strict=True)
    if (directory / "modules.safetensors").is_file():
        load_model(modules, str(directory / "modules.safetensors"), strict=True)
    blob = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    rng = state.pop("rng")
    random.setstate(_tuplify(rng["python"]))
    np.random.set_state(_numpy_tuple(rng["numpy"]))
    return state


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def _numpy_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _numpy_tuple(state: list[Any]) -> tuple[Any, ...]:
    name, keys, pos, has_gauss, cached = state
    return (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
