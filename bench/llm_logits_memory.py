"""Peak memory of a large-vocabulary decoder's logits KD: naive, makd from the live teacher,
makd from a top-k teacher cache (issue 15, "Memory").

Case: vocabulary 151,936 (Qwen2's), sequence 512, batch 4, forward KL at temperature 1,
loss and backward given the student's logits (which require a gradient). Each variant runs
alone in a child process; the peak resident memory is measured from just before the logits
are made, so every variant counts the student's logits (1.2 GB) and what it needs besides:

* ``naive``: the teacher's full fp32 logits, then ``log_softmax`` of both, the token KL and
  its autograd backward;
* ``live``: the teacher's full logits (as a live teacher's forward gives them) and
  ``losses.kd_divergence`` (blocked rows, the gradient written into one buffer);
* ``topk``: only the teacher's top-k logits, ids and residual mass, as a top-k teacher cache
  holds them (k = 64), and ``kd_divergence(..., teacher_indices, teacher_log_residual)``.

Printed: peak MB, the ratio to ``naive``, and the same without the student's logits
(``extra``, what the KD itself adds); the cache size per token of the top-k form (values in
fp16, ids in int32, the residual in fp32). Target (issue 15): training from the cache peaks
at ≤ 0.3× the naive computation.

    python bench/llm_logits_memory.py            # about 2 minutes on 2 cores, ~8 GB free
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from rss import reset_peak, run_child, status_mb  # noqa: E402  (bench/ on sys.path)

VOCAB, SEQ, BATCH, TOP_K = 151_936, 512, 4, 64
VARIANTS = ("naive", "live", "topk")


def child(variant: str, threads: int) -> None:
    torch.set_num_threads(threads)
    from makd_registry.losses import kd_divergence

    gen = torch.Generator().manual_seed(0)
    reset_peak()
    before = status_mb("VmRSS")
    student = torch.randn(BATCH, SEQ, VOCAB, generator=gen).requires_grad_(True)
    after_student = status_mb("VmRSS")
    if variant == "topk":
        # what the cache holds per token, made row block by row block (no full table)
        values = torch.empty(BATCH, SEQ, TOP_K)
        ids = torch.empty(BATCH, SEQ, TOP_K, dtype=torch.long)
        residual = torch.empty(BATCH, SEQ)
        for b in range(BATCH):
            full = torch.randn(SEQ, VOCAB, generator=gen) * 3
            v, i = full.topk(TOP_K, dim=-1)
            values[b], ids[b] = v, i
            residual[b] = full.scatter(-1, i, float("-inf")).logsumexp(-1) - full.logsumexp(-1)
            del full, v, i
        loss = kd_divergence(student, values, teacher_indices=ids, teacher_log_residual=residual)
    else:
        teacher = torch.randn(BATCH, SEQ, VOCAB, generator=gen) * 3
        if variant == "naive":
            ls = F.log_softmax(student, dim=-1)
            lt = F.log_softmax(teacher, dim=-1)
            loss = (lt.exp() * (lt - ls)).sum(-1).mean()
        else:
            loss = kd_divergence(student, teacher, chunk_size=512)
    loss.backward()
    peak = status_mb("VmHWM")
    print(
        json.dumps(
            {
                "peak_mb": peak - before,
                "extra_mb": peak - after_student,
                "student_logits_mb": after_student - before,
                "loss": float(loss.detach()),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llm")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads)
        return
    results = {v: run_child(__file__, v, {"threads": args.threads}) for v in VARIANTS}
    naive = results["naive"]
    per_token = TOP_K * (2 + 4) + 4
    lines = [
        f"`python bench/llm_logits_memory.py`: V = {VOCAB:,}, sequence {SEQ}, batch {BATCH}, "
        f"k = {TOP_K}; forward KL, loss and backward, from just before the student's logits.",
        "",
        "| variant | peak (MB) | ÷ naive | extra over the student's logits (MB) | ÷ naive |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['peak_mb']:.0f} | {r['peak_mb'] / naive['peak_mb']:.3f} | "
            f"{r['extra_mb']:.0f} | {r['extra_mb'] / naive['extra_mb']:.3f} |"
        )
    ratio = results["topk"]["peak_mb"] / naive["peak_mb"]
    lines += [
        "",
        f"Top-k cache per token: {per_token} bytes ({TOP_K} fp16 values, {TOP_K} int32 ids, "
        "one fp32 residual).",
        f"Target: the top-k form's peak ≤ 0.3× naive: {ratio:.3f}, "
        + ("met." if ratio <= 0.3 else "**not met**."),
    ]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logits_memory.md").write_text(text + "\n", encoding="utf-8")
    payload = {"results": results, "cache_bytes_per_token": per_token}
    (args.out / "logits_memory.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
