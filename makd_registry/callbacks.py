"""The training loop as a host: lifecycle hooks that callbacks implement.

``makd run`` trains through one loop (:func:`makd_registry.engine.loop.fit`), for the
student and for a teacher that makd trains itself. Everything that happens around the
optimisation steps is a :class:`Callback`: the built-in progress bar, metrics log,
evaluation and checkpoint schedules, finite-loss guard, stop requests (Ctrl-C, SIGTERM)
and fault injection, and any callback a plugin registers through
``makd_register_callbacks`` and an objective file lists under ``training.callbacks``.

Per step the loop calls, in the callbacks' order:

1. ``on_step_begin(state, control)``;
2. the optimisation step, then ``on_step_end(state, control, result)``: decide (set
   ``control.should_evaluate`` / ``should_checkpoint`` / ``should_stop``), log, check;
3. if asked, the evaluation, then ``on_evaluate(state, control, scores)``;
4. if asked (and the loop checkpoints), the checkpoint, then ``on_checkpoint(state,
   control, path)``;
5. ``on_step_complete(state, control)``: after the step's evaluation and checkpoint.

``on_run_start`` and ``on_run_end`` frame the loop. ``control.should_stop`` ends training
after the current step as if it were the last one (evaluated, checkpointed when the run
checkpoints, the student saved); ``control.interrupt(reason)`` stops it as an interruption
(a checkpoint to resume from, exit status 130). The flags are reset before each step.

This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import ValidationInfo, WrapValidator

from .strict import StrictModel, raise_at, suggest


class CallbackConfig(StrictModel):
    """Options of a callback listed under ``training.callbacks`` (``type`` selects it)."""

    type: str


@dataclass
class LoopState:
    """What the loop knows, for callbacks to read (they must not change it)."""

    #: ``student`` (distillation) or ``teacher`` (a teacher makd trains itself)
    role: str
    #: optimisation steps done, and the total the loop trains for
    step: int
    max_steps: int
    #: the run directory (None for the teacher's own training)
    run_dir: Path | None = None
    #: the last step's total loss, per-term losses, learning rate and gradient norm
    loss: float | None = None
    terms: dict[str, float] = field(default_factory=dict)
    lr: float | None = None
    grad_norm: float | None = None
    #: seconds since the loop started
    elapsed_s: float = 0.0
    #: the last evaluation's scores and the step they were taken at
    scores: dict[str, float] = field(default_factory=dict)
    evaluated_at: int | None = None
    #: the name of the main metric of the task (``accuracy``, ``perplexity``, …)
    main_metric: str | None = None
    #: whether this process is the main one (write files and print only there)
    main: bool = True


@dataclass
class Control:
    """What callbacks ask the loop to do after the current step."""

    should_evaluate: bool = False
    should_checkpoint: bool = False
    #: end training after this step, as if it were the last
    should_stop: bool = False
    stop_reason: str | None = None
    #: set by :meth:`interrupt`: stop as an interruption (checkpoint, exit status 130)
    interrupted: str | None = None

    def stop(self, reason: str) -> None:
        """End training after this step, normally (the run finishes and saves)."""
        self.should_stop = True
        self.stop_reason = self.stop_reason or reason

    def interrupt(self, reason: str) -> None:
        """Stop as an interruption: a checkpoint to resume from, exit status 130."""
        self.interrupted = self.interrupted or reason

    def reset(self) -> None:
        self.should_evaluate = self.should_checkpoint = False


class Callback:
    """Base class of callbacks: override the hooks you need (every one is a no-op here).

    A plugin callback has a ``name`` (the ``type:`` under ``training.callbacks``) and a
    ``Config`` (a :class:`CallbackConfig` subclass); makd builds it as ``Cls(config)``.
    Built-in callbacks are built by the engine directly.
    """

    #: the ``type:`` users write under ``training.callbacks``
    name: ClassVar[str] = ""
    Config: ClassVar[type[CallbackConfig]] = CallbackConfig
    #: which loops it joins: ``student``, ``teacher`` or both
    roles: ClassVar[tuple[str, ...]] = ("student",)

    def __init__(self, config: CallbackConfig | None = None) -> None:
        self.config = config

    def on_run_start(self, state: LoopState, control: Control) -> None:
        """Before the first step of the loop (also when a resumed run has none left)."""

    def on_step_begin(self, state: LoopState, control: Control) -> None:
        """Before an optimisation step."""

    def on_step_end(self, state: LoopState, control: Control, result: Any) -> None:
        """After an optimisation step (``result``: step, loss, terms, lr, grad_norm)."""

    def on_evaluate(self, state: LoopState, control: Control, scores: dict[str, float]) -> None:
        """After an evaluation of the model being trained."""

    def on_checkpoint(self, state: LoopState, control: Control, path: Path) -> None:
        """After a checkpoint was written (``path``: its directory)."""

    def on_step_complete(self, state: LoopState, control: Control) -> None:
        """After the step's evaluation and checkpoint, if any."""

    def on_run_end(self, state: LoopState, control: Control) -> None:
        """After the loop ended (last step, stop, or interruption), before outputs."""


def check_callback_class(cls: Any) -> None:
    """Raise ``TypeError`` explaining what is wrong with a class offered as a callback."""
    import re

    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise TypeError(f"{cls!r} is not a subclass of makd_registry.callbacks.Callback")
    if not isinstance(cls.name, str) or not re.match(r"^[a-z][a-z0-9_]*$", cls.name or ""):
        raise TypeError(f"callback {cls.__qualname__} needs a lower_snake_case 'name'")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, CallbackConfig)):
        raise TypeError(f"callback {cls.name!r}: Config must subclass CallbackConfig")
    if not set(cls.roles) <= {"student", "teacher"} or not cls.roles:
        raise TypeError(f"callback {cls.name!r}: roles must be 'student' and/or 'teacher'")


def _validate_callback(value: Any, handler: Any, info: ValidationInfo) -> CallbackConfig:
    """One entry of ``training.callbacks``: its ``type`` looked up in the registry."""
    if isinstance(value, CallbackConfig):
        return value
    if not isinstance(value, dict):
        raise_at((), "callback_type", "a callback must be a mapping with a 'type' key", value)
    registry = (info.context or {}).get("registry")
    if registry is None:
        raise RuntimeError("callbacks need a registry in the validation context")
    kind = value.get("type")
    known = ", ".join(sorted(registry.callbacks)) or "none installed"
    if not isinstance(kind, str):
        raise_at(
            ("type",), "callback_type", "missing 'type' (registered callbacks: {k})", kind, k=known
        )
    cls = registry.callback(kind)
    if cls is None:
        raise_at(
            ("type",),
            "unknown_callback",
            "unknown callback type '{kind}'{hint} (registered callbacks: {known})",
            kind,
            kind=kind,
            hint=suggest(kind, sorted(registry.callbacks)),
            known=known,
        )
    return cls.Config.model_validate(value, context=info.context)


#: The annotated type of an entry of ``training.callbacks``.
CallbackNode = Annotated[Any, WrapValidator(_validate_callback)]
