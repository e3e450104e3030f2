"""Building the objective tree for a teacher and a student, with located errors.

``Aspect.build(teacher_info, student_info)`` creates each node's trainable modules once the
models' shapes are known, and is where an aspect rejects models it cannot compare (widths
that ``align: identity`` cannot map, head counts, ranks). :func:`build_objective` runs it
and turns such a rejection into a ``file:line:col`` diagnostic at the node that raised it.
``makd validate`` runs it on the meta device with the shapes read from the model configs, so
these errors show before any weights are loaded; ``makd run`` runs it for real.
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import Diagnostic, ObjectiveError, PluginError
from ..features import ModelInfo

#: attribute the resolver sets on every aspect: the YAML path of its node
SOURCE_PATH = "_makd_source_path"


def failing_node(root: Any, tb: Any) -> Any:
    """The innermost node of ``root``'s tree whose own method is on the traceback ``tb``
    (``root`` when none is)."""
    nodes = {id(n): n for n in root.walk()}
    found = root
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in nodes:
            found = nodes[id(owner)]
        tb = tb.tb_next
    return found


def third_party_failure(root: Any, exc: BaseException, when: str) -> PluginError | None:
    """A :class:`PluginError` naming the aspect, its module and the failing line when
    ``exc`` was raised inside a third-party aspect's code; None when the innermost node on
    the traceback is one of makd's own (a bug in makd, reported as such)."""
    node = failing_node(root, exc.__traceback__)
    module = type(node).__module__
    if module.split(".")[0] in ("makd_plugins", "makd_registry"):
        return None
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    at = f" (at {last.tb_frame.f_code.co_filename}:{last.tb_lineno})" if last else ""
    return PluginError(
        f"aspect '{node.name}' from {module} failed {when} in {node.path}: "
        f"{type(exc).__name__}: {exc}{at}"
    )


def build_objective(
    root: Any,
    teacher: ModelInfo,
    student: ModelInfo,
    source: Any = None,
    *,
    meta: bool = False,
) -> None:
    """``root.build(teacher, student)``; a ``ValueError``/``TypeError`` becomes an
    :class:`ObjectiveError` located at the node that raised it (``source`` is the file's
    :class:`~makd_registry.objective.source.SourceMap`), anything else a
    :class:`PluginError`. With ``meta``, modules are created on the meta device (no memory)."""
    import contextlib

    import torch

    where = torch.device("meta") if meta else contextlib.nullcontext()
    try:
        with where:
            root.build(teacher, student)
    except (ValueError, TypeError) as exc:
        node = failing_node(root, sys.exc_info()[2])
        path = getattr(node, SOURCE_PATH, ("objective",))
        message = f"'{node.name}' cannot compare these models: {exc}"
        if source is None:
            raise ObjectiveError([Diagnostic(1, 1, node.path, message, "<objective>")]) from None
        raise ObjectiveError([source.diagnostic(path, message)]) from None
    except Exception as exc:
        node = failing_node(root, sys.exc_info()[2])
        raise PluginError(
            f"aspect '{node.name}' failed while building {node.path}: {type(exc).__name__}: {exc}"
        ) from exc
