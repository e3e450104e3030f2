"""Resumable checkpoints, written by every process together and replaced atomically.

A checkpoint (format 2) holds, through :mod:`torch.distributed.checkpoint` (DCP) in its
safetensors storage (no pickle anywhere): the student's weights and the aspects' trainable
modules (alignment maps), and the optimizer's tensors (AdamW's moments and step counts),
each process writing its own shards (``shard-0000K-model-00001-of-00001.safetensors``, K the
rank + 1); and
in ``state.json``: the optimizer's other settings, the scheduler, every process's RNG
states, the data position and the objective's fingerprint. The data position is global
(step, epoch, offset in the epoch's permutation): each process derives its rows from it, so
a checkpoint resumes on any number of processes (DCP reshards the tensors on load).

Layout in the run directory::

    checkpoints/step-00000400/   complete checkpoints (normally one)
    checkpoint -> checkpoints/step-00000400   the current one (a relative symlink)

A new checkpoint is written into a temporary directory (the main process creates it and
tells the others its name), flushed to disk, renamed to its ``step-N`` name, and only then
does the ``checkpoint`` link switch to it, by an atomic rename of a new link over the old
one; older step directories are removed after that. At every moment ``checkpoint`` names a
complete checkpoint: a run killed at any point keeps the previous one (or the new one, once
the link has switched). With several machines the run directory must be on a file system
they share.

Format 1 (makd before 0.x: ``student.safetensors``, ``modules.safetensors``,
``optimizer.pt`` read with ``weights_only=True``) is still read, by an unsharded student.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ExitCode, MakdError
from .faults import fault_point

STATE = "state.json"
LINK = "checkpoint"
STORE = "checkpoints"
#: the checkpoint format this makd writes (``state.json``'s ``format``; absent: 1)
FORMAT = 2
#: files of a complete format-1 checkpoint (modules.safetensors only when the objective has
#: modules); a format-2 checkpoint lists its shard files in state.json
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
    complete = [d for d in steps if _complete(d)]
    return complete[-1] if complete else None


def _complete(directory: Path) -> bool:
    """Whether ``directory`` holds every file its checkpoint format needs."""
    try:
        state = json.loads((directory / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and not _missing(directory, state)


def _missing(directory: Path, state: dict[str, Any]) -> list[str]:
    if state.get("format", 1) == 1:
        names: list[Any] = list(REQUIRED)
    else:
        names = state.get("files")
        if (
            not isinstance(names, list)
            or not names
            or not all(
                isinstance(n, str) and "/" not in n and n.endswith(".safetensors") for n in names
            )
        ):
            return ["its list of shard files (state.json 'files')"]
    return [str(n) for n in names if not (directory / n).is_file()]


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
    if state.get("format", 1) not in (1, FORMAT):
        raise CheckpointError(
            f"{directory / STATE}: checkpoint format {state.get('format')!r}, which this makd "
            f"does not read (it reads 1 and {FORMAT}): resume with the makd that wrote it"
        )
    missing = _missing(directory, state)
    if missing:
        raise CheckpointError(f"{directory}: the checkpoint has no {', '.join(missing)}")
    return state


def _flat_state(train_state: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """``(tensors, settings, aliases)``: the model's and the optimizer's tensors by name
    (this process's shards of sharded ones), the optimizer's other (JSON-able) entries, and
    ``{name: name it shares its tensor with}`` (tied weights, such as an output layer tied to
    the input embeddings, are stored once)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(
        train_state, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True)
    )
    tensors: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in model_sd.items():
        name = f"model.{key}"
        local = value.to_local() if hasattr(value, "to_local") else value
        if isinstance(local, torch.Tensor) and local.numel():
            where = (local.data_ptr(), tuple(local.shape), local.stride(), local.dtype)
            if where in seen:
                aliases[name] = seen[where]
                continue
            seen[where] = name
        tensors[name] = value
    settings: dict[str, Any] = {}
    for key, value in optim_sd.items():
        if isinstance(value, torch.Tensor):
            tensors[f"optim.{key}"] = value
        else:
            settings[key] = value
    return tensors, settings, aliases


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        # one process: DCP notes that it runs without a process group, which is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _shared_tag(world_size: int) -> str:
    """A name all processes agree on (the main process draws it)."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if world_size > 1:
        import torch.distributed as dist

        box = [tag]
        dist.broadcast_object_list(box, src=0)
        tag = str(box[0])
    return tag


def save_checkpoint(
    run_dir: Path,
    *,
    train_state: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Write a checkpoint of step ``state["step"]`` and make it the current one. Every
    process calls it (a collective); the main process writes ``state.json`` and switches
    the link. ``state`` must be JSON-able (it holds every process's RNG states)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    run_dir = Path(run_dir)
    store = run_dir / STORE
    step = int(state["step"])
    name = f"step-{step:08d}"
    final = store / name
    tag = _shared_tag(world_size)
    tmp = store / f".{name}.tmp-{tag}"
    if rank == 0:
        store.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _barrier(world_size)
    try:
        tensors, settings, _ = _flat_state(train_state, optimizer)
        with _quiet():
            dcp.save(
                tensors,
                storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True),
                no_dist=world_size <= 1,
            )
        if rank != 0:
            return final
        files = sorted(p.name for p in tmp.iterdir() if p.name.endswith(".safetensors"))
        document = {
            **state,
            "format": FORMAT,
            "world_size": world_size,
            "files": files,
            "optimizer": _jsonable(settings),
            "scheduler": _jsonable(scheduler.state_dict()),
        }
        (tmp / STATE).write_text(json.dumps(document, indent=1), encoding="utf-8")
        for item in tmp.iterdir():
            _fsync_file(item)
        _fsync_dir(tmp)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit(run_dir, tmp, name, step, tag)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _commit(run_dir: Path, tmp: Path, name: str, step: int, tag: str) -> Path:
    """The complete checkpoint in ``tmp`` becomes ``checkpoints/NAME`` and the current one."""
    store = run_dir / STORE
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
    train_state: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    world_size: int = 1,
    sharded: bool = False,
) -> dict[str, Any]:
    """Restore the model, the modules, the optimizer and the scheduler that
    :func:`save_checkpoint` wrote (on any number of processes: every process calls it);
    returns the saved ``state`` (with every process's RNG states in ``rank_rng``)."""
    state = read_state(run_dir)
    directory = checkpoint_dir(run_dir)
    if state is None or directory is None:
        raise CheckpointError(f"{Path(run_dir) / LINK}: no checkpoint to resume from")
    if state.get("format", 1) == 1:
        if sharded:
            raise CheckpointError(
                f"{directory}: a checkpoint of an older makd (format 1), which a sharded "
                "student (training.distributed.strategy: fsdp) cannot read: resume it with "
                "strategy replicate or ddp (its next checkpoint is of the current format)"
            )
        return _load_format1(directory, state, train_state, optimizer, scheduler)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        _load_format2(directory, state, train_state, optimizer, scheduler, world_size)
    except CheckpointError:
        raise
    # DCP, safetensors and load_state_dict raise many kinds (DCP's is a BaseException)
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(
            f"{directory}: the checkpoint does not match this run's student and objective "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _load_format2(
    directory: Path,
    state: dict[str, Any],
    train_state: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    world_size: int,
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # what this run holds, to be filled in place
    tensors, settings, aliases = _flat_state(train_state, optimizer)
    saved = state.get("optimizer")
    if not isinstance(saved, dict) or set(saved) != set(settings):
        raise CheckpointError(
            f"{directory / STATE}: the optimizer's settings do not match this run's student "
            "and objective"
        )
    reader = HuggingFaceStorageReader(str(directory))
    stored = set(reader.read_metadata().state_dict_metadata)
    # a parameter that has had no gradient yet has no optimizer state in the checkpoint
    # (this run's template has some for every parameter): it starts without, as it was
    stateless = {k for k in tensors if k.startswith("optim.state.") and k not in stored}
    # read in place (the template keeps its placeholder state for the stateless ones)
    stored_part = {k: v for k, v in tensors.items() if k not in stateless}
    with _quiet():
        dcp.load(stored_part, storage_reader=reader, no_dist=world_size <= 1)
    for name, same in aliases.items():
        tensors[name] = tensors[same]
    model_sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    optim_sd: dict[str, Any] = {
        k[len("optim.") :]: v for k, v in tensors.items() if k.startswith("optim.")
    }
    for key, value in saved.items():  # JSON made tuples lists: back to this run's types
        optim_sd[key] = tuple(value) if isinstance(settings[key], tuple) else value
    set_state_dict(
        train_state,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(flatten_optimizer_state_dict=True),
    )
    if stateless:  # their placeholder state (step 1, zero moments) removed again
        names = {key.rsplit(".", 1)[0][len("optim.state.") :] for key in stateless}
        for name, param in train_state.named_parameters():
            if name in names:
                optimizer.state.pop(param, None)
    scheduler.load_state_dict(state["scheduler"])


def _load_format1(
    directory: Path,
    state: dict[str, Any],
    train_state: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """A checkpoint of an older makd: whole tensors in safetensors, the optimizer in
    ``optimizer.pt`` (read with ``weights_only=True``)."""
    from safetensors.torch import load_model

    student, modules = train_state.student, train_state.aspects
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
            f"({type(exc).__name__}: {_first_line(exc)})"
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
