"""The built-in callbacks of ``makd run``: everything around the optimisation steps.

They implement the same hooks as plugin callbacks (:mod:`makd_registry.callbacks`); the
engine builds them directly (they use its internals) and puts them around the plugins'
ones: guard, progress, metrics, evaluation and checkpoint schedules, then the plugins'
callbacks, then fault injection and stop requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..callbacks import Callback, Control, LoopState
from ..errors import RuntimeFailure
from .faults import fault_point
from .stopping import StopRequests


def fmt_scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) or "no validation data"


class FiniteLossGuard(Callback):
    """A non-finite loss stops the run before anything of that step is saved or cached."""

    roles = ("student", "teacher")

    def __init__(self, whose: str) -> None:
        super().__init__()
        self.whose = whose

    def on_step_end(self, state: LoopState, control: Control, result: Any) -> None:
        if not math.isfinite(result.loss):
            raise RuntimeFailure(
                f"{self.whose} loss is {result.loss} at step {result.step}: lower the learning "
                "rate, check the data, or use fp32 (training.precision)"
            )


class ProgressBar(Callback):
    """The progress bar: loss and the top terms per step, evaluation scores as notes."""

    roles = ("student", "teacher")

    def __init__(self, make: Callable[[], Any], show_terms: bool = True) -> None:
        super().__init__()
        self.make, self.show_terms, self.bar = make, show_terms, None

    def on_run_start(self, state: LoopState, control: Control) -> None:
        self.bar = self.make().__enter__()

    def on_step_end(self, state: LoopState, control: Control, result: Any) -> None:
        if state.main:
            self.bar.update(result.step, result.loss, result.terms if self.show_terms else {})

    def on_evaluate(self, state: LoopState, control: Control, scores: dict[str, float]) -> None:
        if state.main and scores:
            self.bar.note(f"step {state.step}: student {fmt_scores(scores)}")

    def on_run_end(self, state: LoopState, control: Control) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class MetricsLogger(Callback):
    """``metrics.jsonl``: a train record every ``log_every`` steps and at the last, an eval
    record after each evaluation (main process only)."""

    def __init__(self, metrics: Any, log_every: int, teacher_eval: dict[str, float]) -> None:
        super().__init__()
        self.metrics, self.log_every, self.teacher_eval = metrics, log_every, teacher_eval

    def on_step_end(self, state: LoopState, control: Control, result: Any) -> None:
        if self.metrics is None:
            return
        if result.step % self.log_every == 0 or result.step == state.max_steps:
            self.metrics.write(
                {
                    "kind": "train",
                    "step": result.step,
                    "loss": result.loss,
                    "lr": result.lr,
                    "grad_norm": result.grad_norm,
                    "terms": result.terms,
                    "elapsed_s": state.elapsed_s,
                }
            )

    def on_evaluate(self, state: LoopState, control: Control, scores: dict[str, float]) -> None:
        if self.metrics is not None and scores:
            record = {"kind": "eval", "step": state.step, "student": scores}
            self.metrics.write({**record, "teacher": self.teacher_eval})


class EvaluationSchedule(Callback):
    """Evaluate every ``eval_every`` steps and after the last step."""

    def __init__(self, eval_every: int | None) -> None:
        super().__init__()
        self.eval_every = eval_every

    def on_step_end(self, state: LoopState, control: Control, result: Any) -> None:
        every = self.eval_every
        if (every and state.step % every == 0) or state.step == state.max_steps:
            control.should_evaluate = True


class CheckpointSchedule(Callback):
    """Checkpoint every ``checkpoint_every`` steps and after the last step (when set)."""

    def __init__(self, every: int | None) -> None:
        super().__init__()
        self.every = every

    def on_step_end(self, state: LoopState, control: Control, result: Any) -> None:
        if self.every and (state.step % self.every == 0 or state.step == state.max_steps):
            control.should_checkpoint = True


class FaultInjection(Callback):
    """``MAKD_FAULT`` (tests): a signal after a given step, once its checkpoint is written."""

    def on_step_complete(self, state: LoopState, control: Control) -> None:
        for point in ("after_step", "sigint_after_step", "sigterm_after_step"):
            fault_point(point, state.step)


class StopOnSignal(Callback):
    """SIGINT/SIGTERM become stop requests; every process agrees on the step
    (``agree(stop)``), and the loop stops as an interruption. ``before_end``: only while
    steps remain (a request during the last step lets it finish normally)."""

    roles = ("student", "teacher")

    def __init__(self, agree: Callable[[StopRequests], bool], before_end: bool = True) -> None:
        super().__init__()
        self.agree, self.before_end, self.stop = agree, before_end, None

    def on_run_start(self, state: LoopState, control: Control) -> None:
        self.stop = StopRequests().__enter__()

    def on_step_complete(self, state: LoopState, control: Control) -> None:
        if self.agree(self.stop) and (not self.before_end or state.step < state.max_steps):
            control.interrupt(self.stop.name())

    def on_run_end(self, state: LoopState, control: Control) -> None:
        if self.stop is not None:
            self.stop.__exit__(None, None, None)
            self.stop = None
