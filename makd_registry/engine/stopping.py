"""Stop requests: SIGINT (Ctrl-C) and SIGTERM end a training loop at a step boundary.

Inside :class:`StopRequests`, the first SIGINT or SIGTERM only records the request; the
loop finishes the step it is in, saves a checkpoint and stops (exit code 130, with the
``--resume`` command in the message). A second signal stops at once (KeyboardInterrupt),
for a user who does not want to wait for the checkpoint.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from ..errors import ExitCode, MakdError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(MakdError):
    """The run was stopped by a signal; the message says what was saved and how to resume."""

    exit_code = ExitCode.INTERRUPTED


class StopRequests:
    """Record SIGINT/SIGTERM instead of raising, while the block runs (main thread only)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # the second one: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""
