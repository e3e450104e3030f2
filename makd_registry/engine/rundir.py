"""The run directory: checked before anything is written, changed only by accepted runs.

:meth:`RunDirectory.check` decides, without writing, whether a run may use the directory:
the path is a directory or can be created, it is writable, and it is empty (or ``--overwrite``
or ``--resume`` is given). For ``--resume`` it compares the objective with the one the run
was started with (``objective.resolved.json``, and fingerprints of its local data and model
files, ``run.json``): any difference is refused, naming the changed keys, except the
settings listed in :data:`SAFE_CHANGES`, which cannot make the resumed run differ from what
its steps computed so far. A run whose checkpoint has reached its steps is finished.

:meth:`RunDirectory.transaction` then writes. ``--overwrite`` first moves the previous run
aside (``.NAME.previous-*`` next to it); it is deleted once the new run has written its first
checkpoint (or finished), and put back if the new run fails before that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExitCode, MakdError
from .checkpoint import read_state

RECORD = "run.json"
RESOLVED = "objective.resolved.json"
OBJECTIVE_COPY = "objective.yaml"
OVERRIDES = "overrides.txt"
SUMMARY = "summary.json"

#: resolved-objective keys a resume may change: they decide how long to train and how
#: often to log, evaluate and checkpoint, never what a step computes
SAFE_CHANGES = (
    "training.steps",
    "training.log_every",
    "training.eval_every",
    "training.checkpoint_every",
    # how processes share the work: the same update within rounding (docs/running.md)
    "training.distributed",
)


class RunError(MakdError):
    """The run directory or the command line does not allow this run."""

    exit_code = ExitCode.INVALID_INPUT


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any

    def describe(self) -> str:
        return f"{self.key}: {_show(self.before)} → {_show(self.after)}"


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, str) and " " in value:
        return value
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


_ABSENT = object()


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted.path[i]: leaf}`` of nested dicts and lists (empty ones are leaves)."""
    out: dict[str, Any] = {}
    if isinstance(value, dict) and value:
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            out.update(_leaves(item, f"{prefix}[{index}]"))
    else:
        out[prefix] = value
    return out


def changes_between(before: Any, after: Any) -> list[Change]:
    """Every leaf that differs between two plain-data documents, by dotted path."""
    a, b = _leaves(before), _leaves(after)
    keys = sorted(set(a) | set(b))
    return [
        Change(k, a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in keys
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    ]


def _safe(change: Change) -> bool:
    return any(change.key == s or change.key.startswith(s + ".") for s in SAFE_CHANGES)


# -- input fingerprints --------------------------------------------------------------------

_SAMPLE = 4 * 1024 * 1024


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size and a hash of the first and last 4 MiB (the whole file when smaller): cheap for
    large files, independent of modification times (a copied run keeps its fingerprints)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(_SAMPLE))
        if size > 2 * _SAMPLE:
            handle.seek(size - _SAMPLE)
            digest.update(handle.read(_SAMPLE))
        elif size > _SAMPLE:
            digest.update(handle.read())
    return {"size": size, "sha256_sample": digest.hexdigest()}


def input_fingerprints(spec: Any, base_dir: Path) -> dict[str, Any]:
    """Fingerprints of the local files the objective reads: data files, and the files of
    local model and tokenizer directories (hub references are recorded by name only)."""
    from ..objective.depths import DepthError, is_local_data, local_model_dir

    out: dict[str, Any] = {}
    data = spec.data
    if data is not None:
        for key in ("train", "validation"):
            ref = getattr(data, key)
            if ref is not None and is_local_data(ref):
                path = (base_dir / Path(ref).expanduser()).resolve()
                if path.is_file():
                    out[f"data.{key}"] = file_fingerprint(path)
    for section in ("teacher", "student"):
        part = getattr(spec, section, None)
        for key in ("model", "tokenizer"):
            ref = getattr(part, key, None) if part is not None else None
            if ref is None:
                continue
            try:
                directory = local_model_dir(ref, base_dir)
            except DepthError:
                continue
            if directory is None:
                continue
            out[f"{section}.{key}"] = {
                item.name: file_fingerprint(item)
                for item in sorted(directory.iterdir())
                if item.is_file()
            }
    cache = getattr(spec.teacher, "cache", None) if spec.teacher is not None else None
    if cache is not None:  # a teacher artifact: its manifest names every shard's sha256
        from ..objective.artifact import MANIFEST, artifact_dir

        manifest = artifact_dir(cache, base_dir) / MANIFEST
        if manifest.is_file():
            out["teacher.cache"] = {MANIFEST: file_fingerprint(manifest)}
    return out


def fingerprint(resolved: dict[str, Any], inputs: dict[str, Any]) -> str:
    blob = json.dumps({"objective": resolved, "inputs": inputs}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


# -- the directory -------------------------------------------------------------------------


@dataclass
class ResumePoint:
    """What ``--resume`` continues from."""

    step: int
    changes: list[Change] = field(default_factory=list)  # accepted (safe) changes
    finished: bool = False


def check_writable(path: Path) -> None:
    """Raise :class:`RunError` unless ``path`` is a writable directory or can be created."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise RunError(f"run directory {path} is a file, not a directory: give --output DIR")
        if not _writable(path):
            raise RunError(f"run directory {path} is not writable")
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RunError(f"run directory {path} cannot be created: {ancestor} is a file")
    if not _writable(ancestor):
        raise RunError(f"run directory {path} cannot be created: {ancestor} is not writable")


def _writable(directory: Path) -> bool:
    """Permission to create entries in ``directory``, on a file system mounted read-write."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        return not os.statvfs(directory).f_flag & os.ST_RDONLY
    except (OSError, AttributeError):
        return True


class RunDirectory:
    """One run's directory (see the module docstring)."""

    def __init__(self, path: Path, *, resume: bool, overwrite: bool, main: bool = True) -> None:
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self.main = main
        self.previous: Path | None = None  # the moved-aside run of --overwrite
        self.resume_point: ResumePoint | None = None

    # -- checks (no writes) --------------------------------------------------------------

    def leftovers(self) -> list[Path]:
        """Runs moved aside by an ``--overwrite`` that was killed before its first checkpoint."""
        parent = self.path.parent
        if not parent.is_dir():
            return []
        return sorted(parent.glob(f".{self.path.name}.previous-*"))

    def check(
        self, resolved: dict[str, Any], inputs: dict[str, Any], steps: int
    ) -> ResumePoint | None:
        """Whether this run may use the directory; for ``--resume``, from where."""
        check_writable(self.path)
        if self.resume:
            self.resume_point = self._check_resume(resolved, inputs, steps)
            return self.resume_point
        if self.path.is_dir() and any(self.path.iterdir()):
            if not self.overwrite:
                raise RunError(
                    f"run directory {self.path} is not empty: pass --resume to continue "
                    "it, --overwrite to replace it, or --output for another directory"
                )
            here = Path.cwd().resolve()
            target = self.path.resolve()
            if target == here or target in here.parents or os.path.ismount(target):
                raise RunError(
                    f"--overwrite cannot replace {self.path}: it is the working directory, "
                    "one of its parents, or a mount point (it is moved aside first); give "
                    "--output a directory below it"
                )
        return None

    def _check_resume(
        self, resolved: dict[str, Any], inputs: dict[str, Any], steps: int
    ) -> ResumePoint:
        state = read_state(self.path)
        summary = _read_json(self.path / SUMMARY)
        recorded = _read_json(self.path / RESOLVED)
        if recorded is None:
            if summary is None and state is None:
                raise RunError(f"--resume: {self.path} holds no checkpoint to resume from")
            raise RunError(
                f"--resume: {self.path} has no {RESOLVED}: it was not written by makd run"
            )
        record = _read_json(self.path / RECORD) or {}
        changes = changes_between(recorded, resolved)
        old_inputs = record.get("inputs")
        if isinstance(old_inputs, dict):
            for key in sorted(set(old_inputs) | set(inputs)):
                if old_inputs.get(key) != inputs.get(key):
                    changes.append(
                        Change(f"{key} (file contents)", "recorded", "changed since the start")
                    )
        refused = [c for c in changes if not _safe(c)]
        if refused:
            listed = "; ".join(c.describe() for c in refused)
            raise RunError(
                f"--resume: the objective differs from the one {self.path} was started with "
                f"({self.path / RESOLVED}): {listed}. Resume with the original settings, or "
                "start a new run (--output DIR). Only these may change on resume: "
                + ", ".join(SAFE_CHANGES)
            )
        done = int(state["step"]) if state is not None else 0
        if state is not None and done > steps:
            raise RunError(
                f"--resume: training.steps is {steps}, but the checkpoint in {self.path} is "
                f"already at step {done}"
            )
        finished = summary is not None and summary.get("steps") == steps
        if state is None and not finished:
            raise RunError(f"--resume: {self.path} holds no checkpoint to resume from")
        return ResumePoint(step=done, changes=changes, finished=finished)

    # -- writes ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, record: dict[str, Any], files: dict[str, str]) -> Iterator[None]:
        """Prepare the directory and write ``files`` (name → text) and the run record; on a
        failure before :meth:`commit`, an overwritten run is put back."""
        try:
            if self.main:
                self._begin(record, files)
            yield
        except BaseException:
            if self.main:
                self._abort()
            raise
        if self.main:
            self.commit()

    def _begin(self, record: dict[str, Any], files: dict[str, str]) -> None:
        if self.resume:
            previous = _read_json(self.path / RECORD) or {}
            history = list(previous.get("resumes", []))
            point = self.resume_point
            history.append(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "step": point.step if point else None,
                    "changes": [c.describe() for c in (point.changes if point else [])],
                    "overrides": record.get("overrides", []),
                }
            )
            merged = {
                **previous,
                **record,
                "started": previous.get("started", record.get("started")),
            }
            merged["overrides"] = previous.get("overrides", record.get("overrides", []))
            merged["resumes"] = history
            if point and point.changes:
                _write(self.path / RESOLVED, files[RESOLVED])
            _write(self.path / RECORD, json.dumps(merged, indent=2) + "\n")
            return
        if self.path.is_dir() and any(self.path.iterdir()):  # --overwrite (checked)
            tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            self.previous = self.path.parent / f".{self.path.name}.previous-{tag}"
            os.replace(self.path, self.previous)
        self.path.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            _write(self.path / name, text)
        _write(self.path / RECORD, json.dumps(record, indent=2) + "\n")

    def commit(self) -> None:
        """The new run is safe on disk: the moved-aside previous run goes."""
        if self.main and self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
            self.previous = None

    def _abort(self) -> None:
        if self.previous is not None and self.previous.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
            os.replace(self.previous, self.path)
            self.previous = None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: cannot read it ({exc}); the run directory is damaged") from None


def _write(path: Path, text: str) -> None:
    """Write ``text`` atomically (a temporary file renamed over ``path``)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
