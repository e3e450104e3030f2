"""Raw examples from local files or the hub, through ``datasets``, with clear errors.

Local files: ``.csv``, ``.tsv`` (tab-separated with a header), ``.json`` / ``.jsonl``
(records; a SQuAD-format ``{"data": [...]}`` file is flattened to one row per question),
``.txt`` / ``.raw`` (one row per line, column ``text``) and ``.parquet``. Anything else is a
hub dataset name (``subset`` and the split name apply).

Every problem found here or in :mod:`.tasks` is a :class:`DataError` that names the file
(or hub dataset), the column and the rows (1-based data rows: a CSV/TSV header is not
counted) or, for SQuAD data, the question ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ExitCode, MakdError
from ..objective.depths import is_local_data

#: how many offending rows (or ids) a message lists before "and N more"
SHOWN = 5


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


def source_name(ref: str, base_dir: Path) -> str:
    """How messages name a data reference: the resolved path of a local file, else the hub
    dataset's name."""
    if is_local_data(ref):
        return str((base_dir / Path(ref).expanduser()).resolve())
    return f"the hub dataset {ref!r}"


def row_list(indices: Sequence[int], ids: Sequence[Any] | None = None) -> str:
    """``rows 2, 5, 9`` (1-based) or ``questions 'a1' (row 2), ...``, at most :data:`SHOWN`
    of them, with how many more there are."""
    shown = list(indices[:SHOWN])
    if ids is not None:
        words = ", ".join(f"{ids[i]!r} (row {i + 1})" for i in shown)
        head = f"id{'s' if len(indices) > 1 else ''} {words}"
    else:
        head = f"row{'s' if len(indices) > 1 else ''} {', '.join(str(i + 1) for i in shown)}"
    more = len(indices) - len(shown)
    return head + (f" and {more} more" if more else "")


def check_text_column(
    dataset: Any,
    column: str,
    *,
    where: str,
    ids: Sequence[Any] | None = None,
    skip_missing: bool = False,
    allow_blank: bool = False,
) -> None:
    """Every value of ``column`` must be a non-blank string.

    ``skip_missing``: missing cells (None) are allowed (the caller skips them);
    ``allow_blank``: empty and whitespace-only strings are allowed (raw text's blank lines).
    Otherwise the first offending rows and their number are reported."""
    values = dataset[column]
    wrong_type = [i for i, v in enumerate(values) if v is not None and not isinstance(v, str)]
    if wrong_type:
        first = values[wrong_type[0]]
        raise DataError(
            f"{where}: column {column!r} must hold text, but {len(wrong_type)} of "
            f"{len(values)} rows hold other values ({row_list(wrong_type, ids)}; the first "
            f"is {first!r}, a {type(first).__name__})"
        )
    empty = [
        i
        for i, v in enumerate(values)
        if (v is None and not skip_missing) or (v is not None and not allow_blank and not v.strip())
    ]
    if empty:
        raise DataError(
            f"{where}: column {column!r} is empty or whitespace-only in {len(empty)} of "
            f"{len(values)} rows ({row_list(empty, ids)}; rows count from 1, a header not "
            "counted): fill them in or remove those rows"
        )


def _squad_rows(path: Path, what: str) -> list[dict[str, Any]] | None:
    """One row per question of a SQuAD-format file, or None if it is not one.

    A file whose top level is an object with a ``data`` list is SQuAD data: a malformed
    article, paragraph, question or answer (a missing key, a value of the wrong type) is
    a :class:`DataError` naming the question id (or its position) and how many are bad."""
    try:
        with path.open(encoding="utf-8") as handle:
            head = handle.read(1)
            if head != "{":
                return None
            handle.seek(0)
            document = json.load(handle)
    except (OSError, ValueError):
        return None  # not one JSON document: datasets reads it (or says why it cannot)
    if not (isinstance(document, dict) and isinstance(document.get("data"), list)):
        return None
    rows: list[dict[str, Any]] = []
    problems: list[str] = []

    def bad(place: str, problem: str) -> None:
        problems.append(f"{place}: {problem}")

    for a, article in enumerate(document["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            bad(f"data[{a}]", "an article must be an object with a 'paragraphs' list")
            continue
        for p, paragraph in enumerate(article["paragraphs"]):
            place = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict):
                bad(place, "a paragraph must be an object with 'context' and 'qas'")
                continue
            context = paragraph.get("context")
            qas = paragraph.get("qas")
            if not isinstance(context, str) or not isinstance(qas, list):
                missing = [k for k in ("context", "qas") if k not in paragraph]
                bad(
                    place,
                    f"no {' and no '.join(map(repr, missing))}"
                    if missing
                    else "'context' must be a string and 'qas' a list",
                )
                continue
            for q, qa in enumerate(qas):
                qplace = f"{place}.qas[{q}]"
                if not isinstance(qa, dict):
                    bad(qplace, "a question must be an object")
                    continue
                if "id" in qa:
                    qplace = f"question id {qa['id']!r}"
                missing = [k for k in ("id", "question", "answers") if k not in qa]
                if missing:
                    bad(qplace, f"no {', '.join(map(repr, missing))}")
                    continue
                answers = qa["answers"]
                if not isinstance(answers, list) or not all(
                    isinstance(x, dict) and "text" in x and "answer_start" in x for x in answers
                ):
                    bad(qplace, "'answers' must be a list of {text, answer_start} objects")
                    continue
                rows.append(
                    {
                        "id": str(qa["id"]),
                        "title": str(article.get("title", "")),
                        "context": context,
                        "question": qa["question"],
                        "answers": {
                            "text": [x["text"] for x in answers],
                            "answer_start": [x["answer_start"] for x in answers],
                        },
                    }
                )
    if problems:
        listed = "; ".join(problems[:SHOWN])
        more = len(problems) - SHOWN
        raise DataError(
            f"{what}: {path}: {len(problems)} malformed SQuAD record"
            f"{'s' if len(problems) > 1 else ''}: {listed}"
            + (f"; and {more} more" if more > 0 else "")
        )
    if not rows:
        raise DataError(
            f"{what}: {path} has no examples (a SQuAD file whose 'data' holds no questions)"
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

    # failures are reported as one DataError below, not also as datasets' logged errors
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    if is_local_data(ref):
        path = (base_dir / Path(ref).expanduser()).resolve()
        if path.is_dir():
            raise DataError(f"{what}: {path} is a directory, not a data file")
        if not path.is_file():
            raise DataError(f"{what}: data file {path} does not exist")
        rows = _squad_rows(path, what) if path.suffix.lower() == ".json" else None
        if rows is not None:
            dataset = datasets.Dataset.from_list(rows)
        else:
            builder, kwargs = _builder(path)
            try:
                dataset = datasets.load_dataset(
                    builder, data_files=str(path), split="train", **kwargs
                )
            except Exception as exc:  # datasets raises many kinds on malformed files
                raise DataError(f"{what}: cannot read {path}: {_diagnose(path, exc)}") from None
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
        raise DataError(f"{what}: {source_name(ref, base_dir)} has no examples")
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


def _diagnose(path: Path, exc: BaseException) -> str:
    """Why ``path`` could not be read, as precisely as we can tell: binary or non-UTF-8
    content, the line and column of a JSON syntax error, else the underlying cause."""
    suffix = path.suffix.lower()
    if suffix != ".parquet":
        try:
            data = path.read_bytes()
        except OSError as err:
            return _first_line(err)
        if b"\x00" in data[:65536]:
            return "it is a binary file, not text"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            return f"it is not UTF-8 text (byte {err.start}: {data[err.start : err.start + 1]!r})"
        if suffix in (".json", ".jsonl"):
            found = _json_problem(text, lines=suffix == ".jsonl")
            if found:
                return found
    return _first_line(_root_cause(exc))


def _json_problem(text: str, *, lines: bool) -> str | None:
    """The first JSON syntax error of ``text`` (one document, or one per line)."""
    if not lines:
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":
                return f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
            # several documents: JSON lines in a .json file; check each line
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"invalid JSON at line {number}, column {err.colno}: {err.msg}"
    return None


def _root_cause(exc: BaseException) -> BaseException:
    seen: set[int] = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
