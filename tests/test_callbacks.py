"""The training loop as a host: the lifecycle hooks, their order, and what ``control``
does; plugin callbacks from ``training.callbacks`` in the student's and teacher's loops."""

from __future__ import annotations

import json

import pytest
from test_engine import write_objective

from makd_registry import hookimpl
from makd_registry.callbacks import Callback, CallbackConfig, Control, LoopState
from makd_registry.cli import main
from makd_registry.engine.loop import LoopHost, fit

EVENTS: list[tuple] = []


class Recorder(Callback):
    name = "recorder"
    roles = ("student", "teacher")

    class Config(CallbackConfig):
        stop_at: int | None = None
        interrupt_at: int | None = None

    def on_run_start(self, state, control):
        EVENTS.append((state.role, "run_start", state.step))

    def on_step_begin(self, state, control):
        EVENTS.append((state.role, "step_begin", state.step))

    def on_step_end(self, state, control, result):
        EVENTS.append((state.role, "step_end", result.step))
        if state.role == "student" and self.config.stop_at == state.step:
            control.stop("asked to")

    def on_evaluate(self, state, control, scores):
        EVENTS.append((state.role, "evaluate", state.step, sorted(scores)))

    def on_checkpoint(self, state, control, path):
        EVENTS.append((state.role, "checkpoint", state.step, path.name))

    def on_step_complete(self, state, control):
        EVENTS.append((state.role, "step_complete", state.step))
        if state.role == "student" and self.config.interrupt_at == state.step:
            control.interrupt("a test")

    def on_run_end(self, state, control):
        EVENTS.append((state.role, "run_end", state.step))


class Plugin:
    @staticmethod
    @hookimpl
    def makd_register_callbacks(register):
        register(Recorder)


@pytest.fixture(autouse=True)
def _plugin(monkeypatch, tmp_path_factory):
    import makd_registry.plugins as plugins

    real = plugins.make_plugin_manager
    monkeypatch.setattr(
        plugins, "make_plugin_manager", lambda *a, **k: real([Plugin], entrypoints=False)
    )
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "makd-cache"))
    EVENTS.clear()


def objective(tmp_path, callbacks: str, steps: int = 4):
    path = write_objective(tmp_path, steps=steps)
    text = path.read_text().replace(
        "  eval_every: 3\n", f"  eval_every: 3\n  callbacks: {callbacks}\n"
    )
    path.write_text(text)
    return path


def test_hooks_run_in_order_in_the_teachers_and_the_students_loop(tmp_path):
    path = objective(tmp_path, "[{type: recorder}]")
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 0
    teacher = [e[1:] for e in EVENTS if e[0] == "teacher"]
    assert teacher[0] == ("run_start", 0) and teacher[-1] == ("run_end", 4)
    assert [e for e in teacher if e[0] == "step_end"] == [("step_end", s) for s in (1, 2, 3, 4)]
    student = [e[1:] for e in EVENTS if e[0] == "student"]
    assert student[:4] == [
        ("run_start", 0),
        ("step_begin", 0),
        ("step_end", 1),
        ("step_complete", 1),
    ]
    step2 = student[student.index(("step_end", 2)) :][:3]
    assert step2 == [("step_end", 2), ("checkpoint", 2, "checkpoint"), ("step_complete", 2)]
    step3 = student[student.index(("step_end", 3)) :][:3]
    assert step3[0] == ("step_end", 3) and step3[1][:2] == ("evaluate", 3)
    assert step3[2] == ("step_complete", 3)
    assert student[-1] == ("run_end", 4)


def test_should_stop_ends_training_normally_after_that_step(tmp_path):
    path = objective(tmp_path, "[{type: recorder, stop_at: 1}]")
    run = tmp_path / "run"
    assert main(["run", str(path), "--output", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_at"] == 1 and summary["stop_reason"] == "asked to"
    student = [e[1:] for e in EVENTS if e[0] == "student"]
    # the step it stopped at is treated as the last: evaluated and checkpointed
    assert ("evaluate", 1, sorted(summary["student"])) in student
    assert ("checkpoint", 1, "checkpoint") in student
    assert student[-1] == ("run_end", 1)


def test_interrupt_checkpoints_and_exits_130_then_resumes(tmp_path, capsys):
    path = objective(tmp_path, "[{type: recorder, interrupt_at: 1}]")
    run = tmp_path / "run"
    assert main(["run", str(path), "--output", str(run)]) == 130
    assert "interrupted by a test at step 1 of 4" in " ".join(capsys.readouterr().err.split())
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 1


def test_an_unknown_callback_type_is_located(tmp_path, capsys):
    path = objective(tmp_path, "[{type: recorder}, {type: recordr}]")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "training.callbacks[1].type" in err and "did you mean 'recorder'" in err


def test_fit_runs_run_end_and_finish_when_a_callback_raises():
    class Boom(Callback):
        def on_step_end(self, state, control, result):
            raise RuntimeError("boom")

    class Ended(Callback):
        ended = False

        def on_run_end(self, state, control):
            Ended.ended = True

    class Trainer:
        finished = False

        def train_step(self):
            from makd_registry.engine.trainer import StepResult

            return StepResult(1, 0.5, {}, 1e-3)

        def finish(self):
            Trainer.finished = True

    host = LoopHost(evaluate=dict, checkpoint=None, interrupted=lambda s, r: RuntimeError(r))
    with pytest.raises(RuntimeError, match="boom"):
        fit(Trainer(), [Boom(), Ended()], LoopState("student", 0, 3), host)
    assert Ended.ended and Trainer.finished
    control = fit(Trainer(), [], LoopState("student", 0, 1), host)
    assert isinstance(control, Control) and not control.should_stop


class _Steps:
    """A trainer stand-in: constant steps, records finish()."""

    finished = False

    def __init__(self):
        self.step = 0

    def train_step(self):
        from makd_registry.engine.trainer import StepResult

        self.step += 1
        return StepResult(self.step, 0.5, {}, 1e-3)

    def finish(self):
        self.finished = True


def test_every_callback_ends_even_when_one_raises_in_on_run_end():
    """A plugin's failing on_run_end must not leave makd's SIGINT handler installed."""
    import signal

    from makd_registry.engine.callbacks import StopOnSignal

    class BadEnd(Callback):
        def on_run_end(self, state, control):
            raise RuntimeError("bad end")

    before = signal.getsignal(signal.SIGINT)
    trainer = _Steps()
    host = LoopHost(evaluate=dict, checkpoint=None, interrupted=lambda s, r: RuntimeError(r))
    callbacks = [BadEnd(), StopOnSignal(lambda stop: stop.requested)]
    with pytest.raises(RuntimeError, match="bad end"):
        fit(trainer, callbacks, LoopState("student", 0, 2), host)
    assert signal.getsignal(signal.SIGINT) == before and trainer.finished


@pytest.mark.parametrize(
    "hook", ["on_step_end", "on_evaluate", "on_checkpoint", "on_step_complete"]
)
def test_a_stop_from_any_hook_evaluates_and_checkpoints_that_step_once(hook, tmp_path):
    actions = []

    class StopAt2(Callback):
        def _maybe(self, state, control, *rest):
            if state.step == 2:
                control.stop("enough")

        def on_step_end(self, state, control, result):
            if hook == "on_step_end":
                self._maybe(state, control)
            if hook in ("on_evaluate", "on_checkpoint") and state.step == 2:
                control.should_evaluate = control.should_checkpoint = True

        def on_evaluate(self, state, control, scores):
            actions.append(("evaluate", state.step))
            if hook == "on_evaluate":
                self._maybe(state, control)

        def on_checkpoint(self, state, control, path):
            actions.append(("checkpoint", state.step))
            if hook == "on_checkpoint":
                self._maybe(state, control)

        def on_step_complete(self, state, control):
            if hook == "on_step_complete":
                self._maybe(state, control)

    host = LoopHost(
        evaluate=lambda: {"accuracy": 1.0},
        checkpoint=lambda: tmp_path,
        interrupted=lambda s, r: RuntimeError(r),
        checkpoint_at_end=True,
    )
    state = LoopState("student", 0, 5)
    control = fit(_Steps(), [StopAt2()], state, host)
    assert control.should_stop and state.step == 2
    assert actions.count(("evaluate", 2)) == 1 and actions.count(("checkpoint", 2)) == 1
