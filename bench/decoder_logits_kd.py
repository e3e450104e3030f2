"""The logits_kd term of a decoder, makd vs the naive computation, as ratios from one run.

Case: GPT-2-style teacher 6 x 384 -> student 2 x 384, vocabulary 50257, batch 8, sequence
128 (the last 16 tokens of every other row are padding), torch threads 2. Only the term is
measured (loss + its backward, given the two models' logits), since that is what differs:

* ``naive``: full fp32 ``log_softmax`` of both logits, then the token-level KL, masked mean;
* ``makd``: ``losses.kd_divergence`` with ``chunk_size`` rows per chunk (each chunk
  checkpointed: at most one chunk of fp32 probabilities alive, forward or backward).

Time: interleaved in one process, ``--rounds`` rounds; printed: the ratio makd/naive (min /
median / max). Memory: each variant alone in a child process; printed: the extra peak
resident memory of the term (peak RSS during loss + backward minus RSS before it, with the
logits and their gradient buffer already allocated), and the ratio.
Targets (issue 5): time ratio <= 0.6, extra peak memory ratio <= 0.5.

    python bench/decoder_logits_kd.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from rss import reset_peak, run_child, status_mb  # noqa: E402  (bench/ on sys.path)

from makd_registry.losses import kd_divergence


def inputs(batch: int, seq: int, vocab: int):
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(batch, seq, vocab, generator=gen) * 3).requires_grad_(True)
    teacher = torch.randn(batch, seq, vocab, generator=gen) * 3
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1::2, -16:] = 0
    return student, teacher, mask


def naive(student, teacher, mask, tau: float = 1.0) -> torch.Tensor:
    ls = F.log_softmax(student.float() / tau, dim=-1)
    lt = F.log_softmax(teacher.float() / tau, dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    m = mask.float()
    return (kl * m).sum() / m.sum() * tau * tau


def makd(student, teacher, mask, chunk: int) -> torch.Tensor:
    return kd_divergence(student, teacher, mask=mask, chunk_size=chunk)


def run(variant: str, student, teacher, mask, chunk: int) -> None:
    loss = (
        naive(student, teacher, mask) if variant == "naive" else makd(student, teacher, mask, chunk)
    )
    loss.backward()


def child(args) -> None:
    torch.set_num_threads(args.threads)
    student, teacher, mask = inputs(args.batch, args.seq, args.vocab)
    student.grad = torch.zeros_like(student)  # the gradient buffer exists in training anyway
    reset_peak()
    before = status_mb("VmRSS")
    run(args.child, student, teacher, mask, args.chunk)
    peak = status_mb("VmHWM")
    print(json.dumps({"variant": args.child, "before_mb": before, "peak_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--child", choices=["naive", "makd"], help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    student, teacher, mask = inputs(args.batch, args.seq, args.vocab)
    a = naive(student, teacher, mask)
    b = makd(student, teacher, mask, args.chunk)
    assert torch.allclose(a, b, rtol=1e-4), (float(a), float(b))
    times: dict[str, list[float]] = {"naive": [], "makd": []}
    for variant in times:  # warm-up
        run(variant, student, teacher, mask, args.chunk)
    for i in range(args.rounds):
        order = ["naive", "makd"] if i % 2 == 0 else ["makd", "naive"]
        for variant in order:
            student.grad = None
            start = time.perf_counter()
            run(variant, student, teacher, mask, args.chunk)
            times[variant].append(time.perf_counter() - start)
    ratios = [m / n for m, n in zip(times["makd"], times["naive"], strict=True)]
    extra: dict[str, list[float]] = {"naive": [], "makd": []}
    for variant in ("naive", "makd", "naive", "makd"):
        out = run_child(
            __file__,
            variant,
            {
                "threads": args.threads,
                "batch": args.batch,
                "seq": args.seq,
                "vocab": args.vocab,
                "chunk": args.chunk,
            },
        )
        extra[variant].append(out["peak_mb"] - out["before_mb"])
    result = {
        "case": f"decoder logits_kd, B={args.batch} T={args.seq} V={args.vocab}",
        "chunk_size": args.chunk,
        "logits_mb": args.batch * args.seq * args.vocab * 4 / 2**20,
        "naive_s_median": statistics.median(times["naive"]),
        "makd_s_median": statistics.median(times["makd"]),
        "time_ratio": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)},
        "extra_peak_mb": {k: min(v) for k, v in extra.items()},
    }
    result["memory_ratio"] = result["extra_peak_mb"]["makd"] / result["extra_peak_mb"]["naive"]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    t = result["time_ratio"]
    print(
        f"{result['case']}, chunk {args.chunk} rows, {args.threads} threads, "
        f"{args.rounds} interleaved rounds; one logits tensor is {result['logits_mb']:.0f} MB"
    )
    print(
        f"  loss + backward: naive {result['naive_s_median'] * 1e3:.0f} ms, makd "
        f"{result['makd_s_median'] * 1e3:.0f} ms; ratio median {t['median']:.3f} "
        f"(min {t['min']:.3f}, max {t['max']:.3f}); target <= 0.6 "
        f"{'met' if t['median'] <= 0.6 else 'NOT met'}"
    )
    print(
        f"  extra peak memory: naive {result['extra_peak_mb']['naive']:.0f} MB, makd "
        f"{result['extra_peak_mb']['makd']:.0f} MB; ratio {result['memory_ratio']:.3f}; "
        f"target <= 0.5 {'met' if result['memory_ratio'] <= 0.5 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
