"""Saving and loading students: safetensors weights, the model config, a makd record.

A student directory holds ``config.json``, the weights, the tokenizer files when known, and
``makd_student.json`` (format version, model class, recipe, parameter counts, and for a
factorized student the rank of each factorized module).

* A plain student is written with ``save_pretrained``: ``model.safetensors`` that plain
  transformers loads with ``from_pretrained``.
* A factorized student's weights are ``makd_model.safetensors`` (``down``/``up`` factors),
  deliberately not ``model.safetensors``, so that plain transformers refuses the directory
  instead of loading random weights; :func:`load_student` rebuilds it, and
  :func:`export_dense` writes a dense copy that plain transformers loads.

Every directory is written to a temporary sibling first and renamed into place, so a
failure never leaves a half-written student behind. Nothing is unpickled: weights are
safetensors and the record is JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..lowrank import LowRankLinear
from .adapter import set_submodule
from .loading import ModelError, quiet_transformers

STUDENT_RECORD = "makd_student.json"
FACTORIZED_WEIGHTS = "makd_model.safetensors"
FORMAT = 1
#: files :func:`export_dense` does not copy from a factorized directory
_WEIGHT_FILES = {STUDENT_RECORD, FACTORIZED_WEIGHTS, "config.json", "model.safetensors"}


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` when the block succeeds
    (and is deleted when it fails); an existing ``target`` is swapped out, not merged."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{tag}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def factorized_modules(model: Any) -> dict[str, dict[str, Any]]:
    """``{path: {kind, in, out, rank, bias}}`` for every :class:`LowRankLinear` in ``model``
    that replaces a projection (alignment maps outside the model are not included)."""
    kinds = getattr(model, "_makd_factorized_kinds", {})
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            out[path] = {
                "kind": kinds.get(path, "linear"),
                "in": module.in_features,
                "out": module.out_features,
                "rank": module.rank,
                "bias": module.bias is not None,
            }
    return out


def save_student(
    model: Any,
    directory: str | Path,
    *,
    tokenizer: Any = None,
    record: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (plain or factorized) to ``directory`` atomically; returns the path."""
    from safetensors.torch import save_model

    from .students import parameter_counts

    directory = Path(directory)
    factorized = factorized_modules(model)
    meta = {
        "format": FORMAT,
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "factorized": factorized,
        "parameters": parameter_counts(model).as_dict(),
        **(record or {}),
    }
    with atomic_directory(directory) as tmp, quiet_transformers():
        if factorized:
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(tmp)
            save_model(model, str(tmp / FACTORIZED_WEIGHTS), metadata={"format": "pt"})
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / STUDENT_RECORD).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


def read_record(directory: str | Path) -> dict[str, Any] | None:
    """The directory's ``makd_student.json``, or None for a plain transformers directory."""
    path = Path(directory) / STUDENT_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the student record: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ModelError(
            f"{path}: not a makd student record of format {FORMAT} "
            f"(format: {record.get('format') if isinstance(record, dict) else None!r})"
        )
    return record


def _model_class(name: Any, directory: Path) -> Any:
    import transformers

    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if (
        cls is None
        or not isinstance(cls, type)
        or not issubclass(cls, transformers.PreTrainedModel)
    ):
        raise ModelError(f"{directory}: unknown model class {name!r} in {STUDENT_RECORD}")
    return cls


def load_student(directory: str | Path, *, attn_implementation: str | None = None) -> Any:
    """Load a student written by :func:`save_student` (factorized or not), or any plain
    transformers model directory."""
    import transformers
    from safetensors.torch import load_model

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"student directory {directory} does not exist")
    record = read_record(directory)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if record is None or not record.get("factorized"):
        if record is not None:
            cls = _model_class(record.get("architecture"), directory)
        else:
            cls = transformers.AutoModel
            try:
                config = transformers.AutoConfig.from_pretrained(directory)
                archs = getattr(config, "architectures", None) or []
                if archs and hasattr(transformers, archs[0]):
                    cls = getattr(transformers, archs[0])
            except Exception as exc:  # libraries raise many kinds on malformed files
                raise ModelError(f"{directory}: cannot read its config: {exc}") from None
        try:
            with quiet_transformers():
                return cls.from_pretrained(directory, **kwargs)
        except Exception as exc:  # libraries raise many kinds on malformed files
            raise ModelError(f"{directory}: cannot load the student: {exc}") from None
    cls = _model_class(record.get("architecture"), directory)
    weights = directory / FACTORIZED_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{directory}: the factorized student has no {FACTORIZED_WEIGHTS}")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, **kwargs)
        model = cls._from_config(config, **kwargs)
    except Exception as exc:  # libraries raise many kinds on malformed files
        raise ModelError(f"{directory}: cannot rebuild the student: {exc}") from None
    kinds = {}
    for path, info in record["factorized"].items():
        try:
            module = LowRankLinear(info["in"], info["out"], info["rank"], bias=info["bias"])
            set_submodule(model, path, module)
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelError(
                f"{directory}: bad factorized module {path!r} in {STUDENT_RECORD}: {exc}"
            ) from None
        kinds[path] = info.get("kind", "linear")
    model._makd_factorized_kinds = kinds
    try:
        load_model(model, str(weights), strict=True)
    except Exception as exc:  # libraries raise many kinds on malformed files
        raise ModelError(f"{weights}: does not match the recorded student: {exc}") from None
    return model.eval()


def export_dense(source: str | Path, target: str | Path, registry: Any) -> Path:
    """Write a dense copy of the student at ``source`` to ``target`` (``U·V`` multiplied
    out into the original module kind), loadable by plain transformers."""
    from .students import densify

    source = Path(source)
    model = load_student(source)
    record = read_record(source) or {}
    factorized = record.get("factorized") or {}
    adapter = registry.for_model(model)
    densify(model, adapter, factorized)
    model._makd_factorized_kinds = {}
    extra = {
        k: v
        for k, v in record.items()
        if k not in {"format", "architecture", "model_type", "factorized", "parameters"}
    }
    extra["exported_from"] = str(source.resolve())
    target = save_student(model, target, record=extra)
    for item in source.iterdir():  # tokenizer and other side files
        if item.is_file() and item.name not in _WEIGHT_FILES and not (target / item.name).exists():
            shutil.copy2(item, target / item.name)
    return target


__all__ = [
    "FACTORIZED_WEIGHTS",
    "STUDENT_RECORD",
    "atomic_directory",
    "export_dense",
    "factorized_modules",
    "load_student",
    "read_record",
    "save_student",
]
