"""Resumable checkpoints, replaced atomically.

A checkpoint holds the student's weights and the aspects' trainable modules (safetensors),
the optimizer and scheduler state (``torch.save``, loaded back with ``weights_only=True``),
the RNG states, the data position and the objective's fingerprint (JSON).

Layout in the run directory::

    checkpoints/step-00000400/   complete checkpoints (normally one)
    checkpoint -> checkpoints/step-00000400   the current one (a relative symlink)

A new checkpoint is written into a temporary directory, flushed to disk, renamed to its
``step-N`` name, and only then does the ``checkpoint`` link switch to it, by an atomic
rename of a new link over the old one; older step directories are removed after that. At
every moment ``checkpoint`` names a complete checkpoint: a run killed at any point keeps
the previous one (or the new one, once the link has switched).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ExitCode, MakdError
from .faults import fault_point

STATE = "state.json"
LINK = "checkpoint"
STORE = "checkpoints"
#: files of a complete checkpoint (modules.safetensors only when the objective has modules)
REQUIRED = ("student.safetensors", "optimizer.pt", STATE)


class CheckpointError(MakdError):
    """A checkpoint that cannot be read back (a damaged run directory: exit code 2)."""

    exit_code = ExitCode.INVALID_INPUT


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync directories
    finally:
        os.close(fd)


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The current checkpoint directory of ``run_dir`` (the link's target), or None."""
    link = Path(run_dir) / LINK
    if link.is_symlink() or link.is_dir():
        target = link.resolve()
        if (target / STATE).is_file():
            return target
        return None
    # no link at all (killed while an older makd's checkpoint/ directory was converted):
    # the newest complete checkpoint
    store = Path(run_dir) / STORE
    steps = sorted(store.glob("step-*")) if store.is_dir() else []
    complete = [d for d in steps if all((d / name).is_file() for name in REQUIRED)]
    return complete[-1] if complete else None


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The current checkpoint's ``state.json`` (step, data position, fingerprint), or None
    when the run has no checkpoint; :class:`CheckpointError` when it is unreadable."""
    directory = checkpoint_dir(run_dir)
    if directory is None:
        return None
    try:
        state = json.loads((directory / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / STATE}: cannot read the checkpoint: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{directory / STATE}: not a makd checkpoint (no step)")
    missing = [name for name in REQUIRED if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: the checkpoint has no {', '.join(missing)}")
    return state


def save_checkpoint(
    run_dir: Path,
    *,
    student: torch.nn.Module,
    modules: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
    """Write a checkpoint of step ``state["step"]`` and make it the current one."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    store = run_dir / STORE
    store.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    name = f"step-{step:08d}"
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = store / f".{name}.tmp-{tag}"
    tmp.mkdir()
    try:
        rng = {"python": _jsonable(random.getstate()), "numpy": _numpy_state()}
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
        for item in tmp.iterdir():
            _fsync_file(item)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = store / name
    current = checkpoint_dir(run_dir)
    if final.exists() and (current is None or current != final.resolve()):
        shutil.rmtree(final)  # a stale copy of this step that never became current
    if final.exists():  # the current checkpoint is of this very step: keep it
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    os.replace(tmp, final)
    _fsync_dir(store)
    fault_point("before_checkpoint_switch", step)
    link_tmp = run_dir / f".{LINK}.tmp-{tag}"
    os.symlink(os.path.join(STORE, name), link_tmp)
    link = run_dir / LINK
    if link.is_dir() and not link.is_symlink():  # a checkpoint directory of an older makd
        legacy = run_dir / f".{LINK}.legacy-{tag}"
        os.replace(link, legacy)
        os.replace(link_tmp, link)
        shutil.rmtree(legacy, ignore_errors=True)
    else:
        os.replace(link_tmp, link)
    _fsync_dir(run_dir)
    for old in store.iterdir():  # only the current checkpoint is kept
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    return final


def load_checkpoint(
    run_dir: Path,
    *,
    student: torch.nn.Module,
    modules: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns the saved ``state``."""
    from safetensors.torch import load_model

    state = read_state(run_dir)
    directory = checkpoint_dir(run_dir)
    if state is None or directory is None:
        raise CheckpointError(f"{Path(run_dir) / LINK}: no checkpoint to resume from")
    try:
        load_model(student, str(directory / "student.safetensors"), strict=True)
        if len(list(modules.parameters())):
            if not (directory / "modules.safetensors").is_file():
                raise CheckpointError(
                    f"{directory}: the checkpoint has no modules.safetensors, but the "
                    "objective has trainable modules (alignment maps)"
                )
            load_model(modules, str(directory / "modules.safetensors"), strict=True)
        blob = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors, torch.load and load_state_dict raise many kinds
        raise CheckpointError(
            f"{directory}: the checkpoint does not match this run's student and objective "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''})"
        ) from None
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    rng = state.pop("rng")
    random.setstate(_tuplify(rng["python"]))
    np.random.set_state(_numpy_tuple(rng["numpy"]))
    return state


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain data (JSON-able)."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state().tolist()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": cuda,
        "python": _jsonable(random.getstate()),
        "numpy": _numpy_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    random.setstate(_tuplify(state["python"]))
    np.random.set_state(_numpy_tuple(state["numpy"]))


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
