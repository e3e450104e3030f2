"""What the quality studies share: one ``makd run`` per (variant, seed) in a child process,
skipping finished runs, and the aggregation of their ``summary.json`` / ``metrics.jsonl``.

A run directory is finished when it holds ``summary.json``; anything else is run again from
scratch (``--overwrite``), so a study can be stopped at any point and started again.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def load_objective(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def without(tree: dict[str, Any], group: str, term: str | None = None) -> dict[str, Any]:
    """An ablation of an objective tree: its child group ``group`` dropped, or only the
    ``term`` terms (by type) inside that group."""
    tree = copy.deepcopy(tree)
    kept = []
    for child in tree["terms"]:
        if child.get("name") != group:
            kept.append(child)
        elif term is not None:
            child["terms"] = [t for t in child["terms"] if t["type"] != term]
            kept.append(child)
    tree["terms"] = kept
    tree["name"] = tree.get("name", "makd")
    return tree


def run(spec: dict[str, Any], spec_path: Path, run_dir: Path, seed: int, threads: int) -> Path:
    """``makd run spec_path --output run_dir --set training.seed=seed`` unless finished."""
    if (run_dir / "summary.json").exists():
        return run_dir
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    cmd = [
        sys.executable, "-m", "makd_registry.cli", "run", str(spec_path),
        "--output", str(run_dir), "--overwrite", "--set", f"training.seed={seed}",
    ]  # fmt: skip
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {run_dir}", flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}; see {log}")
    return run_dir


def read_run(run_dir: Path, metric: str) -> dict[str, Any]:
    """The student's and teacher's ``metric``, seconds per training step, parameter counts."""
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        train = [r for r in map(json.loads, f) if r.get("kind") == "train"]
    last = max(train, key=lambda r: r["step"])
    return {
        "student": summary["student"][metric],
        "teacher": summary["teacher"][metric],
        # elapsed_s of the last logged step: training only (the final evaluation comes after)
        "seconds_per_step": last["elapsed_s"] / last["step"],
        "parameters": summary["parameters"],
    }


def aggregate(run_dirs: list[Path], metric: str) -> dict[str, Any] | None:
    """Mean, sample standard deviation and per-seed values over the finished runs."""
    runs = [read_run(d, metric) for d in run_dirs if (d / "summary.json").exists()]
    if not runs:
        return None
    values = [r["student"] for r in runs]
    return {
        "seeds": len(runs),
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
        "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs),
        "student_non_embedding": runs[0]["parameters"]["student"]["non_embedding"],
        "teacher_non_embedding": runs[0]["parameters"]["teacher"]["non_embedding"],
        "teacher": runs[0]["teacher"],
    }


def markdown_table(rows: list[dict[str, Any]], columns: list[str], metric: str, digits: int
                   ) -> list[str]:  # fmt: skip
    """A markdown table of aggregated rows: the ``columns`` keys, then the metric's mean ± std,
    the number of seeds, seconds per step and the student's non-embedding parameters."""
    head = [*columns, f"{metric} (mean ± std)", "seeds", "s/step", "non-embedding params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        share = r["student_non_embedding"] / r["teacher_non_embedding"]
        cells = [str(r[c]) for c in columns] + [
            f"{r['mean']:.{digits}f} ± {r['std']:.{digits}f}",
            str(r["seeds"]),
            f"{r['seconds_per_step']:.3f}",
            f"{r['student_non_embedding']:,} ({share:.0%})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def bar_plot(groups: dict[str, list[dict[str, Any]]], path: Path, ylabel: str, title: str,
             highlight: str = "makd", lower_is_better: bool = False, log: bool = False
             ) -> None:  # fmt: skip
    """One panel per group: mean ± std bars, the seeds as dots, the teacher as a dashed line.

    ``log`` puts the metric on a log scale (perplexities that differ by orders of magnitude).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, (group, rows) in zip(axes[0], groups.items(), strict=True):
        xs = list(range(len(rows)))
        ax.bar(
            xs,
            [r["mean"] for r in rows],
            yerr=[r["std"] for r in rows],
            color=["tab:red" if r["objective"] == highlight else "tab:blue" for r in rows],
            capsize=3,
        )
        for x, r in zip(xs, rows, strict=True):
            ax.scatter([x] * len(r["values"]), r["values"], color="k", s=6, zorder=3)
        ax.axhline(rows[0]["teacher"], color="k", ls="--", lw=1, label="teacher")
        ax.set_xticks(xs, [r["objective"] for r in rows], rotation=35, ha="right")
        values = [v for r in rows for v in r["values"]] + [rows[0]["teacher"]]
        if log:
            ax.set_yscale("log")
            ax.set_ylim(min(values) / 1.15, max(values) * 1.15)
        else:
            span = max(values) - min(values) or 1.0
            ax.set_ylim(min(values) - 0.15 * span, max(values) + 0.15 * span)
        ax.set_title(f"{title}, {group}")
        ax.set_ylabel(ylabel + (" (lower is better)" if lower_is_better else ""))
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
