"""Epochs after the first with and without the teacher-output cache, enc384 case, as a ratio.

Case enc384 (see enc384.py): teacher BERT 6 x 384, student 2 x 384 (teacher layers 2 and
5), batch 16, sequence length 128 (padded rows), 2 threads, TinyBERT-style objective (hidden
MSE + attention KL on the mapped layers + logits KD). The training set has ``--rows`` rows
(one epoch = rows / 16 steps).

Two trainers (``Trainer`` of the engine, same seed) run the first epoch, then later-epoch
steps alternate between them, one each in turn; printed: the time per later-epoch step of
each and the speed-up without/with (min / median / max over rounds). Target (issue 5):
epochs after the first at least 1.3x faster with the cache.

    python bench/teacher_cache.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
from enc384 import padded_batch  # noqa: E402  (bench/ on sys.path)
from train_step import tinybert_trainer  # noqa: E402


class Data:
    task = "classification"

    def __init__(self, rows: int, seq: int) -> None:
        b = padded_batch(rows, seq, seed=1)
        lengths = b["attention_mask"].sum(-1).tolist()
        self.train = datasets.Dataset.from_dict(
            {
                "input_ids": [r[:n] for r, n in zip(b["input_ids"].tolist(), lengths, strict=True)],
                "attention_mask": [[1] * n for n in lengths],
                "labels": b["labels"].tolist(),
            }
        )
        self.validation = None


def trainer(args, data, cache_dir: Path | None):
    return tinybert_trainer(
        args.batch, data, teacher_cache=cache_dir is not None, cache_dir=cache_dir
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12, help="later-epoch steps per variant")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Data(args.rows, args.seq)
    steps_per_epoch = args.rows // args.batch
    with tempfile.TemporaryDirectory() as tmp:
        plain = trainer(args, data, None)
        cached = trainer(args, data, Path(tmp))
        first = {}
        for name, t in (("plain", plain), ("cached", cached)):
            start = time.perf_counter()
            for _ in range(steps_per_epoch):
                t.train_step()
            first[name] = (time.perf_counter() - start) / steps_per_epoch
        assert cached.teacher_cache.complete, "the cache should be complete after one epoch"
        times: dict[str, list[float]] = {"plain": [], "cached": []}
        for i in range(args.rounds):
            order = [("plain", plain), ("cached", cached)]
            if i % 2:
                order.reverse()
            for name, t in order:
                start = time.perf_counter()
                t.train_step()
                times[name].append(time.perf_counter() - start)
        size_mb = cached.teacher_cache.path.stat().st_size / 2**20
    speedup = [p / c for p, c in zip(times["plain"], times["cached"], strict=True)]
    result = {
        "rows": args.rows,
        "first_epoch_s_per_step": first,
        "later_s_per_step_median": {k: statistics.median(v) for k, v in times.items()},
        "speedup": {"min": min(speedup), "median": statistics.median(speedup), "max": max(speedup)},
        "cache_file_mb": size_mb,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    s = result["speedup"]
    later = result["later_s_per_step_median"]
    print(f"teacher cache, enc384, {args.rows} rows, batch {args.batch}, {args.threads} threads")
    print(
        f"  first epoch: {first['plain'] * 1e3:.0f} ms/step without, "
        f"{first['cached'] * 1e3:.0f} ms/step with (filling the cache, {size_mb:.0f} MB)"
    )
    print(
        f"  later epochs: {later['plain'] * 1e3:.0f} ms/step without, "
        f"{later['cached'] * 1e3:.0f} ms/step with"
    )
    print(
        f"  speed-up median {s['median']:.2f}x (min {s['min']:.2f}, max {s['max']:.2f}); "
        f"target >= 1.3x {'met' if s['median'] >= 1.3 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
