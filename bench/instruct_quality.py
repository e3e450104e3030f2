"""Instruction distillation quality: SFT, KD, SeqKD, GKD and MaKD students on the SQuAD
instruction slice, Rouge-L and response perplexity, held-out articles and Self-Instruct.

Teacher: the Qwen2-style 4 x 192 decoder of ``objectives/instruct-*.yaml`` (GQA 6/2 heads,
RoPE, gated MLP; the bundled 4,096-token byte-level BPE), trained by makd from scratch with
CE on the responses of ``data/squad-instruct/train.jsonl`` (``--teacher-steps``; cached in
``$MAKD_CACHE_DIR`` and shared by every run). Students: 2 layers initialised from teacher
layers 1 and 3, trained with the ``objective:`` of ``instruct-sft.yaml`` (CE on the data's
responses, no teacher), ``instruct-kd.yaml`` (forward KL, τ 1), ``instruct-seqkd.yaml`` (CE
on the teacher's greedy answers), ``instruct-gkd.yaml`` (on-policy on half of the steps,
JSD(0.5)) and ``instruct-makd.yaml``; every token-level term on the response tokens. Same
steps, batch, learning rate and data for all; only the seed changes. Metrics: Rouge-L of
greedy answers (up to 32 tokens) and the perplexity of the reference responses on
``data/squad-instruct/dev.jsonl`` (other Wikipedia articles than training's) and on
Self-Instruct's 252 user-oriented instructions (out of domain), teacher beside student.

Finished runs are skipped (``<out>/runs/<objective>/seed<k>`` with ``summary.json``);
``--report`` only writes ``<out>/instruct.json``, ``instruct.md`` and ``instruct.png``.

    python bench/instruct_quality.py                    # about 80 minutes on 2 cores
    python bench/instruct_quality.py --seeds 0 --steps 100 --teacher-steps 200
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


def objective_file(args, name: str) -> dict:
    """instruct-<name>.yaml with absolute paths and the study's budget."""
    spec = study.load_objective(OBJECTIVES / f"instruct-{name}.yaml")
    spec["teacher"]["tokenizer"] = str((OBJECTIVES / spec["teacher"]["tokenizer"]).resolve())
    spec["teacher"]["finetune"]["steps"] = args.teacher_steps
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
        f"Teacher (Qwen2-style 4 x 192, trained {result['teacher_steps']} steps on the "
        f"responses): {first['teacher_non_embedding']:,} non-embedding parameters. Students "
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
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--teacher-steps", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only write the tables")
    args = parser.parse_args()
    args.out = args.out.resolve()
    if not args.report:
        for seed in args.seeds:
            for name in args.objectives:
                spec = args.out / "objectives" / f"instruct-{name}.yaml"
                study.run(
                    objective_file(args, name), spec, run_dir(args, name, seed), seed, args.threads
                )
    report(args)


if __name__ == "__main__":
    main()
