"""What a run leaves behind and shows: ``metrics.jsonl`` and a progress bar on stderr."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

METRICS = "metrics.jsonl"


class MetricsLog:
    """Append-only JSON lines: ``{"kind": "train"|"eval", "step": ..., ...}``."""

    def __init__(self, path: Path, *, keep_until: int | None = None) -> None:
        self.path = path
        if keep_until is not None and path.exists():  # resume: drop what came after
            kept = [
                json.dumps(record)
                for record in _records(path)
                if record.get("step", 0) <= keep_until
            ]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
            os.replace(tmp, path)
        elif keep_until is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a line cut short by a kill (the last one) is dropped."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a record whose write was interrupted
        if isinstance(record, dict):
            out.append(record)
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return _records(path)


class StepProgress:
    """A rich progress bar: steps, steps/s, ETA and the main loss terms."""

    def __init__(
        self, total: int, start: int, console: Console, terms: list[str], label: str = "train"
    ) -> None:
        self.console = console
        self.terms = terms
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} steps/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(label, total=total, completed=start, rate="-", losses="")
        self.start_time = time.perf_counter()
        self.start_step = start

    def __enter__(self) -> StepProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, step: int, loss: float, terms: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self.start_time
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        shown = [f"loss {loss:.4g}"]
        shown += [f"{t.rsplit('/', 1)[-1]} {terms[t]:.3g}" for t in self.terms if t in terms]
        self.progress.update(self.task, completed=step, rate=f"{rate:.2f}", losses="  ".join(shown))

    def note(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)
