"""Command-line overrides of an objective file: ``--set training.steps=200``.

``KEY`` is a dotted path into the file (list items by index: ``objective.terms.0.weight``);
``VALUE`` is read as YAML (``3``, ``1.0e-4``, ``true``, ``[2, 5]``, ``{budget: 0.3}``), with
the same safe, bounded loader as the file. The result is validated like the file itself;
a problem at or below a key an override set is located at that override, as
``<--set>:N:COL: path: message (from --set KEY=VALUE)`` (``N``: the override's 1-based
position among the overrides, ``COL``: the column where its VALUE starts).
"""

from __future__ import annotations

from typing import Any

from ..errors import Diagnostic, ObjectiveError
from .source import Override, SourceMap, load_yaml_value

SOURCE = Override.FILE


def _error(index: int, item: str, message: str, column: int = 1) -> ObjectiveError:
    return ObjectiveError([Diagnostic(index, column, item, message, SOURCE)])


def _parse_value(index: int, item: str, raw: str, column: int) -> tuple[Any, SourceMap]:
    try:
        return load_yaml_value(raw, SOURCE)
    except ObjectiveError as exc:
        first = exc.diagnostics[0]
        # a position inside VALUE, made a column of the KEY=VALUE text (VALUE is one line)
        col = column + first.column - 1 if first.line == 1 else column
        if first.message.startswith("syntax error"):
            message = f"the value is not valid YAML: {first.message}"
        elif first.path in ("<yaml>", "<root>", "<file>"):
            message = f"the value cannot be used: {first.message}"
        else:
            message = f"the value cannot be used: {first.path}: {first.message}"
        raise _error(index, item, message, col) from None


def apply_overrides(data: Any, overrides: list[str], smap: SourceMap | None = None) -> Any:
    """``data`` (the file's plain data) with every ``KEY=VALUE`` of ``overrides`` set. With
    ``smap`` (the file's :class:`SourceMap`), each overridden path is recorded there, so that
    problems found later in it are located at the override."""
    for index, item in enumerate(overrides, start=1):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise _error(index, item, "expected KEY=VALUE, e.g. training.steps=200")
        column = len(key) + 2  # 1-based column of VALUE's first character
        value, value_map = _parse_value(index, item, raw, column)
        if not isinstance(data, dict):
            raise _error(index, item, "the objective file is not a mapping")
        node: Any = data
        parts = key.strip().split(".")
        path: list[str | int] = []
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    where = ".".join(parts[:depth]) or "<root>"
                    raise _error(
                        index, item, f"{where} is a list of {len(node)}: '{part}' is no index"
                    )
                path.append(int(part))
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                path.append(part)
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                where = ".".join(parts[:depth])
                raise _error(index, item, f"{where} is a value, not a mapping or a list")
        if smap is not None:
            smap.record_override(tuple(path), Override(index, column, item), value_map)
    return data
