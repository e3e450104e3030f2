"""Exceptions and the process exit codes they map to.

Every failure makd reports on purpose is one of these; anything else is a bug and exits
with :data:`ExitCode.INTERNAL` and a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class ExitCode(IntEnum):
    """Distinct process exit codes of the ``makd`` command."""

    OK = 0
    INTERNAL = 1  #: an unexpected exception: a bug in makd or a plugin's aspect code
    INVALID_INPUT = 2  #: the objective file, the command line or the run directory is wrong
    PLUGIN = 3  #: a plugin failed to load or registered something invalid
    RUNTIME = 4  #: the run itself failed (training, device)
    MODEL = 5  #: a model, tokenizer or student cannot be loaded, built, captured or saved
    DATA = 6  #: a data file, dataset or column cannot be used
    INTERRUPTED = 130  #: stopped by SIGINT/SIGTERM (a checkpoint was saved when training)


#: what each exit code means, as ``makd --help``, the README and docs/running.md list it
EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "ok",
    ExitCode.INTERNAL: "internal error (a bug)",
    ExitCode.INVALID_INPUT: "invalid objective, command line or run directory",
    ExitCode.PLUGIN: "plugin failure (a plugin fails to load, or its aspect code raises)",
    ExitCode.RUNTIME: "runtime failure (non-finite loss)",
    ExitCode.MODEL: "model, tokenizer or student problem",
    ExitCode.DATA: "data problem",
    ExitCode.INTERRUPTED: "interrupted (SIGINT/SIGTERM; resumable when training)",
}


def exit_code_summary() -> str:
    """``0 ok; 1 internal error (a bug); ...``: the one list of exit codes."""
    return "; ".join(f"{int(code)} {text}" for code, text in EXIT_CODE_MEANINGS.items())


class MakdError(Exception):
    """Base class of the errors makd reports without a traceback."""

    exit_code: ExitCode = ExitCode.INTERNAL


class PluginError(MakdError):
    """A plugin could not be loaded, or registered something invalid."""

    exit_code = ExitCode.PLUGIN


class PluginConflictError(PluginError):
    """Two plugins registered the same name (an aspect, a ``model_type``, a provider kind)."""


class RuntimeFailure(MakdError):
    """A run failed for a reason outside the objective file (model, data, device)."""

    exit_code = ExitCode.RUNTIME


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One located problem in an objective file.

    ``line`` and ``column`` are 1-based. ``path`` is the dotted path of the offending
    YAML node (``objective.terms[1].temperature``), or ``<yaml>`` for syntax errors.
    ``code`` is the failure class the problem belongs to: the file itself is wrong
    (``INVALID_INPUT``), or it names a model (``MODEL``), data (``DATA``) or plugin
    (``PLUGIN``) that cannot be used.
    """

    line: int
    column: int
    path: str
    message: str
    file: str = ""
    code: ExitCode = field(default=ExitCode.INVALID_INPUT, compare=False)

    def format(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.path}: {self.message}"


class ObjectiveError(MakdError):
    """The objective file is invalid; carries one or more located diagnostics.

    Its exit code is ``INVALID_INPUT`` when any diagnostic says the file itself is wrong,
    else the code of the first diagnostic (a missing data file: ``DATA``)."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.line, d.column, d.path))
        super().__init__("\n".join(d.format() for d in self.diagnostics))

    @property
    def exit_code(self) -> ExitCode:  # type: ignore[override]
        codes = [d.code for d in self.diagnostics]
        if not codes or ExitCode.INVALID_INPUT in codes:
            return ExitCode.INVALID_INPUT
        return codes[0]
