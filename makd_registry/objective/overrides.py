"""Command-line overrides of an objective file: ``--set training.steps=200``.

``KEY`` is a dotted path into the file (list items by index: ``objective.terms.0.weight``);
``VALUE`` is read as YAML (``3``, ``1.0e-4``, ``true``, ``[2, 5]``, ``{budget: 0.3}``). The
result is validated like the file itself, so a bad value gets the usual located error.
"""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import Diagnostic, ObjectiveError

SOURCE = "<--set>"


def _error(item: str, message: str) -> ObjectiveError:
    return ObjectiveError([Diagnostic(1, 1, item, message, SOURCE)])


def apply_overrides(data: Any, overrides: list[str], smap: Any = None) -> Any:
    """``data`` (the file's plain data) with every ``KEY=VALUE`` of ``overrides`` set."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise _error(item, "expected KEY=VALUE, e.g. training.steps=200")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise _error(item, f"the value is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise _error(item, "the objective file is not a mapping")
        node: Any = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    where = ".".join(parts[:depth]) or "<root>"
                    raise _error(item, f"{where} is a list of {len(node)}: '{part}' is no index")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                where = ".".join(parts[:depth])
                raise _error(item, f"{where} is a value, not a mapping or a list")
    return data
