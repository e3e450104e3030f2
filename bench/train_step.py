"""makd's training step vs a hand-written PyTorch loop on the same work, enc384 case.

Case enc384: teacher BERT 6 x 384 x 12 heads (FFN 1536), student 2 x 384 (teacher layers
2 and 5), batch 16, sequence length 128 (rows padded to 64..128 tokens), torch threads 2.
Objective (TinyBERT-style): hidden MSE + attention KL on the mapped layers (student 0 <-> 2,
1 <-> 5) + logits KD (tau = 2), AdamW, gradient clipping at 1.0.

* ``makd``: ``Trainer.train_step`` of the engine (hooks, attention from Q/K, SDPA);
* ``loop``: what one would write by hand: eager attention with ``output_hidden_states`` and
  ``output_attentions``, the three losses in plain torch, AdamW, clipping.

Speed: the two run interleaved in one process, one step each in turn for ``--rounds``
rounds; printed: steps/s of each and the ratio makd/loop (min/median/max over rounds).
Memory: each variant runs alone in a child process; after a warm-up step the peak resident
size is reset, and printed are the peak during the training steps and its growth over the
resident size before them, and the ratio of the peaks.
Targets (issue 5): steps/s ratio >= 0.97, peak memory ratio <= 1.05.

    python bench/train_step.py                 # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from enc384 import PAIRS, TEACHER, padded_batch  # noqa: E402  (bench/ on sys.path)
from rss import reset_peak, run_child, status_mb  # noqa: E402

CONFIG = TEACHER


def batch_of(size: int, seq: int, step: int) -> dict[str, torch.Tensor]:
    return padded_batch(size, seq, seed=step)


def models(attn: str):
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(
        transformers.BertConfig(**CONFIG, attn_implementation=attn)
    ).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    from makd_registry.models import make_architecture_registry
    from makd_registry.models.students import select_layers

    adapter = make_architecture_registry().for_model(teacher)
    student = select_layers(teacher, adapter, [2, 5]).train()
    for p in student.parameters():
        p.requires_grad_(True)
    return teacher, student, adapter


class HandLoop:
    """The hand-written loop."""

    def __init__(self, args) -> None:
        self.teacher, self.student, _ = models("eager")
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-4, weight_decay=0.01)
        self.args = args

    def step(self, batch) -> float:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        mask = batch["attention_mask"].float()
        with torch.no_grad():
            t = self.teacher(**inputs, output_hidden_states=True, output_attentions=True)
        s = self.student(**inputs, output_hidden_states=True, output_attentions=True)
        loss = 0.0
        tokens = mask.sum()
        for sl, tl in PAIRS:
            diff = (s.hidden_states[sl + 1] - t.hidden_states[tl + 1]).pow(2).mean(-1)
            loss = loss + (diff * mask).sum() / tokens / len(PAIRS)
            a_t, a_s = t.attentions[tl], s.attentions[sl]
            kl = (a_t * (a_t.clamp_min(1e-12).log() - a_s.clamp_min(1e-12).log())).sum(-1)
            rows = mask[:, None, :].expand_as(kl)
            loss = loss + (kl * rows).sum() / rows.sum() / len(PAIRS)
        tau = 2.0
        kd = (
            F.kl_div(
                F.log_softmax(s.logits / tau, -1),
                F.log_softmax(t.logits / tau, -1),
                log_target=True,
                reduction="batchmean",
            )
            * tau
            * tau
        )
        loss = loss + kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


class Makd:
    """makd's engine: the same objective as an objective tree, Trainer.train_step."""

    OBJECTIVE = """
teacher: {config: {model_type: bert, num_hidden_layers: 6}}
student: {teacher_layers: [2, 5]}
objective:
  type: sum
  terms:
    - type: sum
      layers: uniform
      terms: [{type: attention_kl}, {type: hidden_mse}]
    - {type: logits_kd, temperature: 2.0}
"""

    def __init__(self, args) -> None:
        self.trainer = tinybert_trainer(args.batch, _Data(args.batch, args.seq))

    def step(self, batch) -> float:
        self.trainer.data.next = batch
        return self.trainer.train_step().loss


def tinybert_trainer(
    batch: int, data, *, teacher_cache: bool = False, cache_dir=None, attn: str = "sdpa"
):
    """An engine ``Trainer`` for the enc384 case and :attr:`Makd.OBJECTIVE` (models running
    ``attn`` attention: makd's capture does not depend on it)."""
    from makd_registry.engine.trainer import Trainer
    from makd_registry.objective.sections import TeacherCacheSection, TrainingSection
    from makd_registry.testing import registry_with, resolve

    teacher, student, adapter = models(attn)
    root = resolve(Makd.OBJECTIVE, registry_with()).root
    training = TrainingSection(
        steps=10**6,
        batch_size=batch,
        learning_rate=1e-4,
        teacher_cache=TeacherCacheSection() if teacher_cache else None,
    )
    return Trainer(
        student=student,
        student_adapter=adapter,
        root=root,
        data=data,
        training=training,
        pad_id=0,
        device=torch.device("cpu"),
        teacher=teacher,
        teacher_adapter=adapter,
        cache_dir=cache_dir,
    )


class _Data:
    """Feeds the trainer the same batches as the loop (bypassing the dataset order)."""

    task = "classification"

    def __init__(self, batch: int, seq: int) -> None:
        self.next = None
        self.train = self

    def __len__(self) -> int:
        return 10**9


def _patch_trainer_batches() -> None:
    from makd_registry.engine import trainer as module

    def micro_batches(self):
        yield self.data.next

    module.Trainer.micro_batches = micro_batches


def peak_memory(variant: str, args) -> None:
    torch.set_num_threads(args.threads)
    _patch_trainer_batches()
    runner = (Makd if variant == "makd" else HandLoop)(args)
    runner.step(batch_of(args.batch, args.seq, 0))  # allocator warm-up, optimizer state
    batches = [batch_of(args.batch, args.seq, i + 1) for i in range(args.memory_steps)]
    reset_peak()  # forget the peak of building the models
    before = status_mb("VmRSS") * 1024
    for batch in batches:
        runner.step(batch)
    after = status_mb("VmHWM") * 1024
    print(json.dumps({"variant": variant, "before_kb": before, "after_kb": after}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--child", choices=["makd", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.child:
        peak_memory(args.child, args)
        return
    torch.set_num_threads(args.threads)
    _patch_trainer_batches()
    runners = {"makd": Makd(args), "loop": HandLoop(args)}
    for r in runners.values():
        r.step(batch_of(args.batch, args.seq, 0))
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(args.rounds):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        batch = batch_of(args.batch, args.seq, i + 1)
        for name in order:
            start = time.perf_counter()
            runners[name].step(batch)
            times[name].append(time.perf_counter() - start)
    speed = [b / a for a, b in zip(times["makd"], times["loop"], strict=True)]  # steps/s ratio
    memory = {}
    for variant in ("makd", "loop", "makd", "loop"):
        out = run_child(
            __file__,
            variant,
            {
                "threads": args.threads,
                "batch": args.batch,
                "seq": args.seq,
                "memory_steps": args.memory_steps,
            },
        )
        growth = (out["after_kb"] - out["before_kb"]) / 1024
        peak = out["after_kb"] / 1024
        memory.setdefault(variant, []).append((growth, peak))
    result = {
        "case": "enc384",
        "rounds": args.rounds,
        "threads": args.threads,
        "makd_steps_per_s": 1 / statistics.median(times["makd"]),
        "loop_steps_per_s": 1 / statistics.median(times["loop"]),
        "speed_ratio": {"min": min(speed), "median": statistics.median(speed), "max": max(speed)},
        "peak_rss_mb": {k: max(p for _, p in v) for k, v in memory.items()},
        "peak_growth_mb": {k: max(g for g, _ in v) for k, v in memory.items()},
    }
    result["memory_ratio_peak_rss"] = result["peak_rss_mb"]["makd"] / result["peak_rss_mb"]["loop"]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"enc384 training step, {args.threads} threads, batch {args.batch} x {args.seq}, "
        f"{args.rounds} interleaved rounds"
    )
    print(f"  makd engine      {result['makd_steps_per_s']:.3f} steps/s")
    print(f"  hand-written     {result['loop_steps_per_s']:.3f} steps/s")
    s = result["speed_ratio"]
    print(
        f"  steps/s ratio makd/loop: median {s['median']:.3f} (min {s['min']:.3f}, max "
        f"{s['max']:.3f}); target >= 0.97 {'met' if s['median'] >= 0.97 else 'NOT met'}"
    )
    print(
        f"  peak RSS (MB): makd {result['peak_rss_mb']['makd']:.0f}, loop "
        f"{result['peak_rss_mb']['loop']:.0f}; ratio {result['memory_ratio_peak_rss']:.3f}; "
        f"target <= 1.05 {'met' if result['memory_ratio_peak_rss'] <= 1.05 else 'NOT met'}"
    )
    print(
        f"  growth during training steps (MB): makd {result['peak_growth_mb']['makd']:.0f}, "
        f"loop {result['peak_growth_mb']['loop']:.0f}"
    )


if __name__ == "__main__":
    main()
