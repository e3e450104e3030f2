"""Instruction distillation quality: SFT, KD, SeqKD, GKD and MaKD students on the SQuAD
instruction slice, Rouge-L and response perplexity, held-out articles and Self-Instruct.

Teacher: the Qwen2-style 4 x 192 decoder of ``objectives/instruct-*.yaml`` (GQA 6/2 heads,
RoPE, gated MLP; the bundled 4,096-token byte-level BPE), trained by makd from scratch. The
shipped objectives train it on the 989 responses of the bundled slice (``teacher.finetune``),
which a model trained from scratch memorises; this study trains it instead, in its own
``makd run`` (CE on every token: ``loss_on: all``), on the other 41 articles of the SQuAD
v1.1 file the slice was cut from (``../shared/data/SQuAD-v1.1/dev-v1.1.json``, 9,367
questions; no article of the bundled train or dev slice), for ``--teacher-steps``, and hands
it to every student as ``teacher.model``. Students: 2 layers initialised from teacher layers
1 and 3, trained on the bundled train slice with the ``objective:`` of ``instruct-sft.yaml``
(CE on the data's responses, no teacher), ``instruct-kd.yaml`` (forward KL, τ 1),
``instruct-seqkd.yaml`` (CE on the teacher's greedy answers), ``instruct-gkd.yaml``
(on-policy on half of the steps, JSD(0.5)) and ``instruct-makd.yaml``; every token-level
term on the response tokens. Same steps, batch, learning rate and data for all; only the
seed changes. Metrics: Rouge-L of greedy answers (up to 32 tokens) and the perplexity of the
reference responses on ``data/squad-instruct/dev.jsonl`` (two more articles) and on
Self-Instruct's 252 user-oriented instructions (out of domain), teacher beside student.

Finished runs are skipped (``<out>/runs/<objective>/seed<k>`` and ``<out>/teacher`` with
``summary.json``); ``--report`` only writes ``<out>/instruct.json``, ``instruct.md`` and
``instruct.png``.

    python bench/instruct_quality.py                    # about 70 minutes on 2 cores
    python bench/instruct_quality.py --seeds 0 --steps 50 --teacher-steps 50
    python bench/instruct_quality.py --report
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import study  # noqa: E402  (bench/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ROOT / "objectives"
NAMES = ["sft", "kd", "seqkd", "gkd", "makd"]
#: (summary key, label, lower is better)
METRICS = [
    ("rouge_l", "Rouge-L, held-out articles", False),
    ("perplexity", "response perplexity, held-out articles", True),
    ("self_instruct.rouge_l", "Rouge-L, Self-Instruct", False),
    ("self_instruct.perplexity", "response perplexity, Self-Instruct", True),
]


SQUAD = ROOT.parent / "shared" / "data" / "SQuAD-v1.1" / "dev-v1.1.json"
#: the articles of the bundled slice (data/squad): the teacher's data leaves them out
BUNDLED = {
    "Southern_California", "Amazon_rainforest", "Ctenophora", "Prime_number", "Rhine",
    "Packet_switching", "Black_Death",
}  # fmt: skip


def teacher_data(args) -> Path:
    """The teacher's training rows: SQuAD v1.1's other articles, recast like the slice."""
    import importlib.util
    import json as _json

    path = args.out / "data" / "teacher-train.jsonl"
    if path.exists():
        return path
    if not SQUAD.is_file():
        raise SystemExit(f"{SQUAD} is missing: the teacher's data is cut from it")
    make = ROOT / "data" / "squad-instruct" / "make_instruction.py"
    spec = importlib.util.spec_from_file_location("make_instruction", make)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [r for r in module.rows(SQUAD) if r["title"] not in BUNDLED]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def teacher_file(args) -> dict:
    """The teacher's own run: its config as a student trained by CE on every token."""
    base = study.load_objective(OBJECTIVES / "instruct-sft.yaml")
    data = base["data"]
    data["train"] = str(teacher_data(args))
    data["validation"] = str((OBJECTIVES / data["validation"]).resolve())
    data["extra_validation"] = {
        k: str((OBJECTIVES / v).resolve()) for k, v in data["extra_validation"].items()
    }
    data["loss_on"] = "all"
    teacher = base["teacher"]
    return {
        "student": {
            "config": teacher["config"],
            "tokenizer": str((OBJECTIVES / teacher["tokenizer"]).resolve()),
        },
        "data": data,
        "training": {
            "steps": args.teacher_steps,
            "batch_size": args.batch_size,
            "learning_rate": 1.0e-3,
            "warmup_steps": max(1, args.teacher_steps // 12),
        },
        "objective": {"type": "ce"},
    }


def objective_file(args, name: str) -> dict:
    """instruct-<name>.yaml with absolute paths, the study's teacher and budget."""
    spec = study.load_objective(OBJECTIVES / f"instruct-{name}.yaml")
    spec["teacher"] = {"model": str(args.out / "teacher" / "student")}
    data = spec["data"]
    for key in ("train", "validation"):
        data[key] = str((OBJECTIVES / data[key]).resolve())
    data["extra_validation"] = {
        k: str((OBJECTIVES / v).resolve()) for k, v in data["extra_validation"].items()
    }
    spec["training"].update(
        steps=args.steps,
        batch_size=args.batch_size,
        warmup_steps=max(1, args.steps // 20),
        eval_every=None,
        checkpoint_every=None,
    )
    return spec


def run_dir(args, name: str, seed: int) -> Path:
    return args.out / "runs" / name / f"seed{seed}"


def report(args) -> dict:
    tables: dict[str, list[dict]] = {}
    for key, _, _ in METRICS:
        rows = []
        for name in args.objectives:
            agg = study.aggregate([run_dir(args, name, s) for s in args.seeds], key)
            if agg is not None:
                rows.append({"objective": name, **agg})
        tables[key] = rows
    result = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "teacher_steps": args.teacher_steps,
        "tables": tables,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "instruct.json").write_text(json.dumps(result, indent=2))
    (args.out / "instruct.md").write_text(markdown(result))
    if tables["rouge_l"]:
        study.bar_plot(
            {label: tables[key] for key, label, _ in METRICS[:1] + METRICS[2:3]},
            args.out / "instruct.png",
            "Rouge-L",
            "SQuAD instruction slice",
        )
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    tables = result["tables"]
    if not tables["rouge_l"]:
        return "no finished runs yet\n"
    first = tables["rouge_l"][0]
    lines = [
        f"Teacher (Qwen2-style 4 x 192, trained {result['teacher_steps']} steps on 41 other "
        f"SQuAD articles): {first['teacher_non_embedding']:,} non-embedding parameters. Students "
        f"(2 layers): {result['steps']} steps, batch {result['batch_size']}, up to 384 tokens.",
        "",
    ]
    for key, label, lower in METRICS:
        rows = tables[key]
        if not rows:
            continue
        teacher = rows[0]["teacher"]
        better = "lower" if lower else "higher"
        lines += [f"**{label}** ({better} is better; teacher {teacher:.2f})", ""]
        lines += study.markdown_table(rows, ["objective"], key, 2)
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "instruct")
    parser.add_argument("--objectives", nargs="+", choices=NAMES, default=NAMES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only write the tables")
    args = parser.parse_args()
    args.out = args.out.resolve()
    if not args.report:
        study.run(teacher_file(args), args.out / "objectives" / "teacher.yaml",
                  args.out / "teacher", 0, args.threads)  # fmt: skip
        for seed in args.seeds:
            for name in args.objectives:
                spec = args.out / "objectives" / f"instruct-{name}.yaml"
                study.run(
                    objective_file(args, name), spec, run_dir(args, name, seed), seed, args.threads
                )
    report(args)


if __name__ == "__main__":
    main()
