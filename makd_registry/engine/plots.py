"""PNG plots of a run: loss terms and evaluation metrics over steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_run(records: list[dict[str, Any]], directory: Path) -> list[Path]:
    """Write ``loss.png`` (every objective term) and ``eval.png`` (student metrics, teacher
    as dashed lines) from ``metrics.jsonl`` records; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    train = [r for r in records if r.get("kind") == "train"]
    if train:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        names = sorted({t for r in train for t in r["terms"]}, key=lambda t: (t.count("/"), t))
        for name in names:
            points = [(r["step"], r["terms"][name]) for r in train if name in r["terms"]]
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=name, linewidth=2.2 if "/" not in name else 1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (unweighted, per term)")
        if all(y > 0 for r in train for y in r["terms"].values()):
            ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(directory / "loss.png", dpi=110)
        plt.close(fig)
        written.append(directory / "loss.png")
    evals = [r for r in records if r.get("kind") == "eval" and r.get("student")]
    if evals:
        metrics = sorted({m for r in evals for m in r["student"]})
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
        teacher = next((r["teacher"] for r in reversed(evals) if r.get("teacher")), {})
        for ax, metric in zip(axes[0], metrics, strict=True):
            xs = [r["step"] for r in evals if metric in r["student"]]
            ys = [r["student"][metric] for r in evals if metric in r["student"]]
            ax.plot(xs, ys, marker="o", label="student")
            if metric in teacher:
                ax.axhline(teacher[metric], linestyle="--", color="gray", label="teacher")
            ax.set_title(metric)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(directory / "eval.png", dpi=110)
        plt.close(fig)
        written.append(directory / "eval.png")
    return written
