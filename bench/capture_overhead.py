"""Feature capture vs transformers' output flags, enc384 case, as ratios from one run.

Case enc384: teacher BERT 6 layers x 384 hidden x 12 heads (FFN 1536), student 2 layers x
384, batch 16, sequence length 128 (rows padded to lengths between 64 and 128), torch
threads 2. The objective is TinyBERT-style: hidden MSE and attention KL on the uniformly
mapped layers (student 0 <-> teacher 2, 1 <-> 5) plus logits KD.

Each step is a teacher forward without gradients and a student forward with them (the
student in training mode), as in training. Variants:

* ``makd_sdpa``: models on SDPA attention (transformers' default); makd's hooks capture
  hidden states, Q and K at the mapped layers and the logits, and the log attention
  distributions of the mapped layers are computed from Q and K (what attention_kl does);
* ``makd_eager``: the same capture with eager attention;
* ``flags``: eager attention with ``output_hidden_states=True, output_attentions=True``
  (every layer), and the log of the mapped layers' probabilities (what a loss on the
  returned probabilities must do);
* ``capture_only``: ``makd_sdpa`` without computing the distributions (the hooks' cost);
* ``plain``: SDPA forwards that capture nothing (the cost of the models alone).

The variants run one step each in turn, rotating the order every round, for ``--rounds``
rounds; each round gives one ratio per variant, and the script prints their
min/median/max. Target: makd's median ratio to ``flags`` is at most 1.0.

    python bench/capture_overhead.py            # about two minutes on 2 cores
    python bench/capture_overhead.py --json     # machine-readable
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers
from enc384 import PAIRS, TEACHER, padded_batch  # noqa: E402  (bench/ on sys.path)

from makd_registry.capture import CapturePlan
from makd_registry.capture.extractor import FeatureExtractor
from makd_registry.features import Feature, FeatureRequest
from makd_registry.losses import attention_log_probs, probs_to_log_probs
from makd_registry.models import make_architecture_registry


def models(attn: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(
        transformers.BertConfig(**TEACHER, attn_implementation=attn)
    ).eval()
    student = transformers.BertForSequenceClassification(
        transformers.BertConfig(**{**TEACHER, "num_hidden_layers": 2}, attn_implementation=attn)
    ).train()
    return teacher, student


def batch(size: int, seq: int) -> dict[str, torch.Tensor]:
    out = padded_batch(size, seq)
    del out["labels"]
    return out


def tinybert_requests() -> list[FeatureRequest]:
    out = [FeatureRequest("teacher", Feature.LOGITS), FeatureRequest("student", Feature.LOGITS)]
    for s, t in PAIRS:
        for kind in (Feature.HIDDEN, Feature.ATTENTION_QUERY, Feature.ATTENTION_KEY):
            out += [FeatureRequest("teacher", kind, t), FeatureRequest("student", kind, s)]
    return out


def makd_step(fx: FeatureExtractor, inputs: dict, distributions: bool) -> None:
    feats, _ = fx(inputs)
    if not distributions:
        return
    mask = inputs["attention_mask"]
    for side, layers in (("teacher", [t for _, t in PAIRS]), ("student", [s for s, _ in PAIRS])):
        get = feats.teacher if side == "teacher" else feats.student
        for layer in layers:
            attention_log_probs(
                get(Feature.ATTENTION_QUERY, layer),
                get(Feature.ATTENTION_KEY, layer),
                attention_mask=mask,
            )


def flags_step(teacher, student, inputs: dict, distributions: bool) -> None:
    with torch.no_grad():
        t_out = teacher(**inputs, output_hidden_states=True, output_attentions=True)
    s_out = student(**inputs, output_hidden_states=True, output_attentions=True)
    if not distributions:
        return
    mask = inputs["attention_mask"]
    for s, t in PAIRS:
        probs_to_log_probs(t_out.attentions[t], mask)
        probs_to_log_probs(s_out.attentions[s], mask)


def timed(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--iters", type=int, default=1, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    registry = make_architecture_registry()
    t_sdpa, s_sdpa = models("sdpa")
    t_eager, s_eager = models("eager")
    adapter = registry.for_model(t_sdpa)
    inputs = batch(args.batch, args.seq)
    plan = CapturePlan.from_requests(tinybert_requests())

    def plain() -> None:
        with torch.no_grad():
            t_sdpa(**inputs)
        s_sdpa(**inputs)

    with (
        FeatureExtractor(plan, s_sdpa, adapter, t_sdpa, adapter) as fx_sdpa,
        FeatureExtractor(plan, s_eager, adapter, t_eager, adapter) as fx_eager,
    ):
        variants = {
            "makd_sdpa": lambda: makd_step(fx_sdpa, inputs, True),
            "makd_eager": lambda: makd_step(fx_eager, inputs, True),
            "capture_only": lambda: makd_step(fx_sdpa, inputs, False),
            "flags": lambda: flags_step(t_eager, s_eager, inputs, True),
            "plain": plain,
        }
        for fn in variants.values():  # warm-up
            fn()
        samples: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                samples[name].append(timed(variants[name], args.iters))

    def ratios(name: str, base: str) -> dict[str, float]:
        values = [a / b for a, b in zip(samples[name], samples[base], strict=True)]
        return {
            "min": min(values),
            "median": statistics.median(values),
            "max": max(values),
        }

    result = {
        "case": "enc384",
        "threads": args.threads,
        "batch": args.batch,
        "seq": args.seq,
        "rounds": args.rounds,
        "steps_per_sample": args.iters,
        "captured": plan.summary(),
        "ms_per_step_median": {n: statistics.median(v) * 1e3 for n, v in samples.items()},
        "ratio_to_flags": {
            n: ratios(n, "flags") for n in ("makd_sdpa", "makd_eager", "capture_only", "plain")
        },
        "ratio_to_plain": {
            n: ratios(n, "plain") for n in ("makd_sdpa", "makd_eager", "capture_only", "flags")
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"enc384 capture benchmark: batch {args.batch} x {args.seq}, {args.threads} threads, "
        f"{args.rounds} rounds, variants interleaved"
    )
    print(f"  makd captures: teacher {plan.summary()['teacher']}")
    print(f"                 student {plan.summary()['student']}")
    print("  flags: output_hidden_states + output_attentions, eager, every layer")
    print(f"  {'variant':<13}{'ms/step':>8}   ratio to flags (min/median/max)   ratio to plain")
    for name in ("makd_sdpa", "makd_eager", "capture_only", "flags", "plain"):
        ms = result["ms_per_step_median"][name]
        to_flags = result["ratio_to_flags"].get(name)
        to_plain = result["ratio_to_plain"].get(name)
        a = (
            f"{to_flags['min']:.3f} / {to_flags['median']:.3f} / {to_flags['max']:.3f}"
            if to_flags
            else "-"
        )
        b = f"{to_plain['median']:.3f}" if to_plain else "-"
        print(f"  {name:<13}{ms:8.0f}   {a:<33}{b}")
    best = min(result["ratio_to_flags"][n]["median"] for n in ("makd_sdpa", "makd_eager"))
    sdpa = result["ratio_to_flags"]["makd_sdpa"]["median"]
    print(
        f"  target: makd / flags <= 1.0 -> makd_sdpa {sdpa:.3f} "
        f"({'met' if sdpa <= 1.0 else 'NOT met'}), best {best:.3f}"
    )


if __name__ == "__main__":
    main()
