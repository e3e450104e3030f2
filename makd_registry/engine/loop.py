"""The one training loop: optimisation steps, and callbacks around them.

:func:`fit` runs a :class:`~makd_registry.engine.trainer.Trainer` for the student's
distillation and for a teacher's own training alike; the order of the hooks is in
:mod:`makd_registry.callbacks`. The host (``makd run``) says how to evaluate, how to
checkpoint, and what an interruption is; the built-in behaviour around the steps is in
:mod:`makd_registry.engine.callbacks`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..callbacks import Callback, Control, LoopState


@dataclass
class LoopHost:
    """What the loop needs from whoever runs it."""

    #: the scores of the model being trained (``{}`` when there is nothing to evaluate)
    evaluate: Callable[[], dict[str, float]]
    #: write a checkpoint and return its directory; None: this loop does not checkpoint
    checkpoint: Callable[[], Path | None] | None
    #: the exception that ends an interrupted loop (``reason``: e.g. ``SIGINT``)
    interrupted: Callable[[LoopState, str], BaseException]
    #: whether a loop that stops early (``control.should_stop``) checkpoints its last step
    checkpoint_at_end: bool = False
    #: whether a loop that stops early evaluates its last step (as after the last step)
    evaluate_at_end: bool = True


def _dispatch(callbacks: Sequence[Callback], hook: str, *args: Any) -> None:
    for callback in callbacks:
        getattr(callback, hook)(*args)


def _dispatch_all(callbacks: Sequence[Callback], hook: str, *args: Any) -> None:
    """Every callback's ``hook``, also after one raised (the first error is re-raised): for
    ``on_run_end``, where callbacks release what they hold (signal handlers, bars)."""
    first: BaseException | None = None
    for callback in callbacks:
        try:
            getattr(callback, hook)(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            first = first or exc
    if first is not None:
        raise first


def fit(trainer: Any, callbacks: Sequence[Callback], state: LoopState, host: LoopHost) -> Control:
    """Train until ``state.max_steps`` (or until a callback stops the loop); returns the
    final :class:`Control`. ``trainer.finish()`` runs however the loop ends."""
    control = Control()
    start = time.perf_counter()
    try:
        _dispatch(callbacks, "on_run_start", state, control)
        while state.step < state.max_steps:
            control.reset()
            _dispatch(callbacks, "on_step_begin", state, control)
            result = trainer.train_step()
            state.step = result.step
            state.loss, state.terms = result.loss, dict(result.terms)
            state.lr, state.grad_norm = result.lr, result.grad_norm
            state.elapsed_s = time.perf_counter() - start
            _dispatch(callbacks, "on_step_end", state, control, result)
            checkpointed = _after_step(callbacks, state, control, host)
            _dispatch(callbacks, "on_step_complete", state, control)
            if control.should_stop:  # asked for in on_step_complete: the same treatment
                _after_step(callbacks, state, control, host, checkpointed)
            if control.interrupted:
                if host.checkpoint is not None:
                    _checkpointed(callbacks, state, control, host)
                raise host.interrupted(state, control.interrupted)
            if control.should_stop:
                break
    finally:
        try:
            _dispatch_all(callbacks, "on_run_end", state, control)
        finally:
            trainer.finish()
    return control


def _after_step(
    callbacks: Sequence[Callback],
    state: LoopState,
    control: Control,
    host: LoopHost,
    checkpointed: bool = False,
) -> bool:
    """The step's evaluation and checkpoint, as asked (a stopped step is treated as the
    last: evaluated, and checkpointed when the run checkpoints at its end); each done at
    most once per step. Returns whether a checkpoint was written."""
    if control.should_stop and host.evaluate_at_end:
        control.should_evaluate = True
    if control.should_evaluate and state.evaluated_at != state.step:
        state.scores, state.evaluated_at = host.evaluate(), state.step
        _dispatch(callbacks, "on_evaluate", state, control, state.scores)
    if control.should_stop and host.checkpoint_at_end:
        control.should_checkpoint = True
    if control.should_checkpoint and not checkpointed and host.checkpoint is not None:
        _checkpointed(callbacks, state, control, host)
        return True
    return checkpointed


def _checkpointed(
    callbacks: Sequence[Callback], state: LoopState, control: Control, host: LoopHost
) -> None:
    path = host.checkpoint()
    if path is not None:
        _dispatch(callbacks, "on_checkpoint", state, control, path)
