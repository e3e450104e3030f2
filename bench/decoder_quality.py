"""Decoder quality on Tiny Shakespeare: MaKD against KD and SeqKD (and no KD), perplexity.

Teacher: the GPT-2-style 6 x 384 model of ``objectives/decoder-*.yaml`` (byte-level BPE of
4,096 tokens), trained by makd with CE on the bundled Tiny Shakespeare train split
(``--teacher-steps``; cached in ``$MAKD_CACHE_DIR`` and shared by every run). Students:
2 layers initialised from teacher layers 2 and 5 (a third of the non-embedding parameters),
trained with the ``objective:`` of ``decoder-kd.yaml`` (word-level logits KD),
``decoder-seqkd.yaml`` (CE on the teacher's greedy continuations), the same with sampled
continuations (``seqkd-sample``: greedy text from a small teacher degenerates into loops),
``decoder-makd.yaml``, MaKD without its matrix group (``makd-no-matrix``), and ``ce`` (no
KD, the reference). Same steps, batch, learning rate and data for all; only the seed
changes. Metric: perplexity on the held-out split (``data/tinyshakespeare/valid.txt``),
teacher beside student.

Rouge-L on Self-Instruct is not measured: the teacher is a Shakespeare language model, not
an instruction follower, so its generations for instructions would score noise.

Finished runs are skipped (``<out>/runs/<objective>/seed<k>`` with ``summary.json``);
``--report`` only writes ``<out>/decoder.json``, ``decoder.md`` and ``decoder.png``.

    python bench/decoder_quality.py                    # about 2 hours on 2 cores
    python bench/decoder_quality.py --seeds 0 --steps 300
    python bench/decoder_quality.py --report
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import study  # noqa: E402  (bench/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ROOT / "objectives"
NAMES = ["ce", "kd", "seqkd", "seqkd-sample", "makd", "makd-no-matrix"]


def objective_file(args, name: str) -> dict:
    """decoder-<name>.yaml with absolute paths, the study's budget, and its objective."""
    base = study.load_objective(OBJECTIVES / "decoder-makd.yaml")
    base["teacher"]["tokenizer"] = str((OBJECTIVES / base["teacher"]["tokenizer"]).resolve())
    base["teacher"]["finetune"]["steps"] = args.teacher_steps
    for key in ("train", "validation"):
        base["data"][key] = str((OBJECTIVES / base["data"][key]).resolve())
    base["training"].update(
        steps=args.steps,
        batch_size=args.batch_size,
        warmup_steps=max(1, args.steps // 20),
        eval_every=None,
        checkpoint_every=None,
    )
    if name == "ce":
        base["objective"] = {"type": "ce", "name": "ce"}
    elif name == "seqkd-sample":  # the teacher samples its continuations instead of greedy
        objective = study.load_objective(OBJECTIVES / "decoder-seqkd.yaml")["objective"]
        base["objective"] = {**objective, "decoding": "sample", "temperature": 1.0}
    elif name == "makd-no-matrix":  # the ablation: layer-wise and logits terms only
        objective = study.load_objective(OBJECTIVES / "decoder-makd.yaml")["objective"]
        base["objective"] = study.without(objective, "matrix")
    else:
        base["objective"] = study.load_objective(OBJECTIVES / f"decoder-{name}.yaml")["objective"]
    return base


def run_dir(args, name: str, seed: int) -> Path:
    return args.out / "runs" / name / f"seed{seed}"


def report(args) -> dict:
    rows = []
    for name in args.objectives:
        agg = study.aggregate([run_dir(args, name, s) for s in args.seeds], "perplexity")
        if agg is not None:
            rows.append({"objective": name, **agg})
    result = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "teacher_steps": args.teacher_steps,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decoder.json").write_text(json.dumps(result, indent=2))
    (args.out / "decoder.md").write_text(markdown(result))
    if rows:
        study.bar_plot(
            {"2-layer student": rows},
            args.out / "decoder.png",
            "validation perplexity",
            "Tiny Shakespeare",
            lower_is_better=True,
            log=True,
        )
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    rows = result["rows"]
    if not rows:
        return "no finished runs yet\n"
    first = rows[0]
    lines = [
        f"Teacher (GPT-2-style 6 x 384, trained {result['teacher_steps']} steps): validation "
        f"perplexity {first['teacher']:.2f}, {first['teacher_non_embedding']:,} non-embedding "
        f"parameters. Students (2 layers): {result['steps']} steps, batch "
        f"{result['batch_size']} x 128 tokens.",
        "",
        *study.markdown_table(rows, ["objective"], "validation perplexity", 2),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decoder")
    parser.add_argument("--objectives", nargs="+", choices=NAMES, default=NAMES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only write the tables")
    args = parser.parse_args()
    args.out = args.out.resolve()
    if not args.report:
        for seed in args.seeds:
            for name in args.objectives:
                spec = args.out / "objectives" / f"decoder-{name}.yaml"
                study.run(
                    objective_file(args, name), spec, run_dir(args, name, seed), seed, args.threads
                )
    report(args)


if __name__ == "__main__":
    main()
