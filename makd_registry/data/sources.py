"""Raw examples from local files or the hub, through ``datasets``, with clear errors.

Local files: ``.csv``, ``.tsv`` (tab-separated with a header), ``.json`` / ``.jsonl``
(records; a SQuAD-format ``{"data": [...]}`` file is flattened to one row per question),
``.txt`` / ``.raw`` (one row per line, column ``text``) and ``.parquet``. Anything else is a
hub dataset name (``subset`` and the split name apply).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ExitCode, MakdError
from ..objective.depths import is_local_data


class DataError(MakdError):
    """A data file, dataset or column that cannot be used."""

    exit_code = ExitCode.DATA


def _builder(path: Path) -> tuple[str, dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "csv", {"delimiter": "\t", "quoting": 3}  # csv.QUOTE_NONE: GLUE TSVs
    if suffix == ".csv":
        return "csv", {}
    if suffix in (".json", ".jsonl"):
        return "json", {}
    if suffix in (".txt", ".raw"):
        return "text", {}
    if suffix == ".parquet":
        return "parquet", {}
    raise DataError(f"{path}: unsupported data file type {suffix!r} (csv, tsv, json, jsonl, txt)")


def _squad_rows(path: Path) -> list[dict[str, Any]] | None:
    """One row per question of a SQuAD-format file, or None if it is not one."""
    try:
        with path.open(encoding="utf-8") as handle:
            head = handle.read(1)
            if head != "{":
                return None
            handle.seek(0)
            document = json.load(handle)
    except (OSError, ValueError):
        return None
    if not (isinstance(document, dict) and isinstance(document.get("data"), list)):
        return None
    rows = []
    for article in document["data"]:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = qa.get("answers", [])
                rows.append(
                    {
                        "id": qa.get("id"),
                        "title": article.get("title", ""),
                        "context": paragraph["context"],
                        "question": qa["question"],
                        "answers": {
                            "text": [a["text"] for a in answers],
                            "answer_start": [a["answer_start"] for a in answers],
                        },
                    }
                )
    return rows


def load_split(
    ref: str,
    *,
    base_dir: Path,
    split: str,
    subset: str | None = None,
    limit: int | None = None,
    what: str = "data",
) -> Any:
    """A ``datasets.Dataset`` of the raw examples of ``ref``."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if is_local_data(ref):
        path = (base_dir / Path(ref).expanduser()).resolve()
        if not path.is_file():
            raise DataError(f"{what}: data file {path} does not exist")
        if path.suffix.lower() == ".json":
            rows = _squad_rows(path)
            if rows is not None:
                dataset = datasets.Dataset.from_list(rows)
                return dataset.select(range(min(limit, len(dataset)))) if limit else dataset
        builder, kwargs = _builder(path)
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except Exception as exc:  # datasets raises many kinds on malformed files
            raise DataError(f"{what}: cannot read {path}: {_first_line(exc)}") from None
    else:
        try:
            dataset = datasets.load_dataset(ref, subset, split=split)
        except Exception as exc:
            raise DataError(
                f"{what}: cannot load the hub dataset {ref!r}"
                f"{f' ({subset})' if subset else ''} split {split!r}: {_first_line(exc)}"
            ) from None
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise DataError(f"{what}: {ref} has no examples")
    return dataset


def require_columns(dataset: Any, columns: dict[str, str], ref: str, what: str) -> None:
    """Raise :class:`DataError` naming every missing column and the ones that exist."""
    missing = [
        f"{key}: {name!r}" for key, name in columns.items() if name not in dataset.column_names
    ]
    if missing:
        raise DataError(
            f"{what}: {ref} has no column {', '.join(missing)} (its columns: "
            f"{', '.join(dataset.column_names)}); set the data section's *_column keys"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
