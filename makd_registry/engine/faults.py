"""Fault injection for tests: a run kills or interrupts itself at a named point.

``MAKD_FAULT=POINT:STEP[,POINT:STEP...]`` (never set it for real runs). Points:

``after_step``
    SIGKILL right after optimisation step STEP (and its logging, evaluation, checkpoint).
``before_checkpoint_switch``
    SIGKILL while saving the checkpoint of step STEP: its files are complete on disk but the
    ``checkpoint`` link still names the previous one.
``sigint_after_step`` / ``sigterm_after_step``
    Send SIGINT / SIGTERM to this process after step STEP, as a user's Ctrl-C or a
    scheduler's termination would.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "MAKD_FAULT"

_ACTIONS = {
    "after_step": signal.SIGKILL,
    "before_checkpoint_switch": signal.SIGKILL,
    "sigint_after_step": signal.SIGINT,
    "sigterm_after_step": signal.SIGTERM,
}


def _faults() -> dict[str, int]:
    out: dict[str, int] = {}
    for item in os.environ.get(FAULT_ENV, "").split(","):
        point, _, step = item.strip().partition(":")
        if point in _ACTIONS and step.strip().isdigit():
            out[point] = int(step)
    return out


def fault_point(point: str, step: int) -> None:
    """Raise the signal ``MAKD_FAULT`` asks for at ``point`` and ``step``, if any."""
    if _faults().get(point) == step:
        os.kill(os.getpid(), _ACTIONS[point])
