"""makd-earlystop: ``early_stopping``, an example third-party training-loop callback.

After each evaluation it compares the metric with the best seen so far; after
``patience`` evaluations without an improvement of more than ``min_delta`` it ends
training (``control.stop``): the run finishes as if that step were the last, with the
student, its final evaluation and the summary saved (``summary.json`` records
``stopped_at`` and ``stop_reason``).

    training:
      eval_every: 100
      callbacks:
        - {type: early_stopping, metric: accuracy, patience: 3}

It uses only the public API: ``makd_registry.callbacks`` and ``hookimpl``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from makd_registry import hookimpl
from makd_registry.callbacks import Callback, CallbackConfig

#: metrics where lower is better (the rest: higher is better)
LOWER_IS_BETTER = ("perplexity", "loss")


class EarlyStopping(Callback):
    """Stop when an evaluation metric has not improved for ``patience`` evaluations."""

    name = "early_stopping"

    class Config(CallbackConfig):
        metric: str | None = Field(
            default=None, description="The score to watch; default: the task's main metric."
        )
        patience: int = Field(default=3, ge=1, le=1000, description="Evaluations to wait.")
        min_delta: float = Field(default=0.0, ge=0, description="Smallest improvement counted.")
        mode: Literal["auto", "max", "min"] = Field(
            default="auto", description="auto: min for perplexity and losses, else max."
        )

    def __init__(self, config=None) -> None:
        super().__init__(config or self.Config(type=self.name))
        self.best: float | None = None
        self.best_step: int | None = None
        self.waited = 0

    def on_evaluate(self, state, control, scores) -> None:
        c = self.config
        metric = c.metric or state.main_metric
        if metric not in scores:
            raise ValueError(
                f"early_stopping watches {metric!r}, but the evaluation gives "
                f"{', '.join(sorted(scores)) or 'no scores'}"
            )
        value = float(scores[metric])
        lower = c.mode == "min" or (c.mode == "auto" and metric in LOWER_IS_BETTER)
        if self.best is None or (self.best - value if lower else value - self.best) > c.min_delta:
            self.best, self.best_step, self.waited = value, state.step, 0
            return
        self.waited += 1
        if self.waited >= c.patience:
            control.stop(
                f"{metric} did not improve by more than {c.min_delta:g} for {c.patience} "
                f"evaluation(s) (best {self.best:.4f} at step {self.best_step})"
            )


@hookimpl
def makd_register_callbacks(register):
    register(EarlyStopping)
