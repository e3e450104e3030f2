"""makd against its peers on one workload: steps/s and peak memory, interleaved in one run.

Workload (enc384, see enc384.py): teacher BERT 6 x 384 x 12 heads, student 2 x 384 (teacher
layers 2 and 5), one batch of 16 rows padded to 64..128 tokens, 2 threads. Objective
(TinyBERT-style): hidden-state MSE and attention-distribution KL on the mapped layers
(student 0 <-> teacher 2, 1 <-> 5) and logits KD at temperature 2; AdamW, clipping at 1.0.

Variants (each builds its own identical models; all see the same 16 rows):

* ``loop``         the hand-written PyTorch loop of ``train_step.py`` (eager attention with
                   ``output_hidden_states`` / ``output_attentions``, the losses in plain torch);
* ``makd``         makd's engine (``Trainer.train_step``): hooks at the mapped layers only,
                   attention distributions from the captured Q/K, the models keep SDPA;
* ``makd_eager``   the same engine with both models built with eager attention instead of
                   SDPA (what a capture that needs ``output_attentions`` would force);
* ``makd_cache``   ``makd`` with ``training.teacher_cache`` (the teacher's features read from the
                   memory-mapped cache written in the first epoch, as in epochs 2+);
* ``textbrewer``   TextBrewer's ``GeneralDistiller``: ``train_on_batch`` (its forwards, adaptors
                   and losses: ``hidden_mse``, ``attention_ce`` on log-probabilities, ``kd_loss``
                   ce at temperature 2) followed by the body of its ``train_with_num_steps``
                   loop (backward, clip, AdamW step, zero_grad). Needs ``pip install textbrewer``.
* ``torchdistill`` listed when ``import torchdistill`` works (it requires torchvision; there is
                   no CPU build of torchvision for torch 2.13 here, see docs/results.md).

Speed: one step of each variant in turn (the order rotates every round) for ``--rounds``
rounds after two warm-up steps each; printed per variant: steps/s (median), the ratio to the
loop's steps/s (min / median / max over rounds). Memory: each variant alone in a child
process; after two steps the peak resident size (VmHWM) is reset and the peak over
``--memory-steps`` further steps is printed, with its ratio to the loop's.

    python bench/peers_speed.py                  # ~5 minutes on 2 cores
    python bench/peers_speed.py --json           # machine-readable
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
from enc384 import PAIRS, padded_batch  # noqa: E402  (bench/ on sys.path)
from rss import reset_peak, run_child, status_mb  # noqa: E402
from train_step import HandLoop, models, tinybert_trainer  # noqa: E402

VARIANTS = ["loop", "makd", "makd_eager", "makd_cache", "textbrewer", "torchdistill"]


def the_batch(args) -> dict[str, torch.Tensor]:
    return padded_batch(args.batch, args.seq, seed=1)


def _dataset(batch: dict[str, torch.Tensor]):
    """The batch's rows, unpadded, as the engine's training set (one batch per epoch)."""

    class Data:
        task = "classification"
        validation = None

    lengths = batch["attention_mask"].sum(-1).tolist()
    ids = batch["input_ids"].tolist()
    Data.train = datasets.Dataset.from_dict(
        {
            "input_ids": [r[:n] for r, n in zip(ids, lengths, strict=True)],
            "attention_mask": [[1] * n for n in lengths],
            "labels": batch["labels"].tolist(),
        }
    )
    return Data()


class Loop:
    def __init__(self, args, batch) -> None:
        self.loop = HandLoop(args)
        self.batch = batch

    def step(self) -> None:
        self.loop.step(self.batch)


class Makd:
    """The engine; its training set is exactly the batch's rows (one step per epoch)."""

    def __init__(self, args, batch, cache: bool = False, attn: str = "sdpa") -> None:
        self._tmp = tempfile.TemporaryDirectory() if cache else None
        cache_dir = Path(self._tmp.name) if self._tmp else None
        self.trainer = tinybert_trainer(
            args.batch, _dataset(batch), teacher_cache=cache, cache_dir=cache_dir, attn=attn
        )

    def step(self) -> None:
        self.trainer.train_step()


class TextBrewer:
    """TextBrewer's GeneralDistiller on the same models, losses and optimizer."""

    def __init__(self, args, batch) -> None:
        import textbrewer
        from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

        self.teacher, self.student, _ = models("eager")
        mapped_t = {t for _, t in PAIRS}
        mapped_s = {s for s, _ in PAIRS}

        def adaptor(mapped):
            def adapt(batch, out):
                # TextBrewer's attention_ce takes attention logits; the models return
                # probabilities, whose log has the same softmax. Only the mapped layers.
                attention = [
                    a.clamp_min(1e-12).log() if i in mapped else None
                    for i, a in enumerate(out.attentions)
                ]
                return {
                    "logits": out.logits,
                    "hidden": out.hidden_states,
                    "attention": attention,
                    "inputs_mask": batch["attention_mask"],
                }

            return adapt

        matches = []
        for s, t in PAIRS:  # hidden_states[0] is the embedding output
            matches.append(
                {
                    "layer_T": t + 1,
                    "layer_S": s + 1,
                    "feature": "hidden",
                    "loss": "hidden_mse",
                    "weight": 1,
                }
            )
            matches.append(
                {
                    "layer_T": t,
                    "layer_S": s,
                    "feature": "attention",
                    "loss": "attention_ce",
                    "weight": 1,
                }
            )
        self.distiller = GeneralDistiller(
            train_config=TrainingConfig(device="cpu", log_dir=None, output_dir=tempfile.mkdtemp()),
            distill_config=DistillationConfig(
                temperature=2.0,
                kd_loss_type="ce",
                kd_loss_weight=1.0,
                hard_label_weight=0.0,
                intermediate_matches=matches,
            ),
            model_T=self.teacher,
            model_S=self.student,
            adaptor_T=adaptor(mapped_t),
            adaptor_S=adaptor(mapped_s),
        )
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-4, weight_decay=0.01)
        self.batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
        self.flags = {"output_hidden_states": True, "output_attentions": True}
        self.version = textbrewer.__version__

    def step(self) -> None:
        # the body of GeneralDistiller.train_with_num_steps for one batch (no accumulation,
        # no fp16, no tensorboard writer)
        loss, _ = self.distiller.train_on_batch(self.batch, self.flags)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def available(variant: str) -> str | None:
    """None when the variant can run here, else why not."""
    if variant == "textbrewer" and importlib.util.find_spec("textbrewer") is None:
        return "textbrewer is not installed (pip install textbrewer)"
    if variant == "torchdistill":
        try:
            import torchdistill  # noqa: F401
        except Exception as exc:  # noqa: BLE001  (ImportError, or torchvision's own failure)
            return f"import torchdistill failed: {type(exc).__name__}: {exc}"
        return "torchdistill imports, but no torchdistill variant is implemented here"
    return None


def build(variant: str, args, batch):
    if variant == "loop":
        return Loop(args, batch)
    if variant == "makd":
        return Makd(args, batch)
    if variant == "makd_eager":
        return Makd(args, batch, attn="eager")
    if variant == "makd_cache":
        return Makd(args, batch, cache=True)
    if variant == "textbrewer":
        return TextBrewer(args, batch)
    raise ValueError(variant)


def child_memory(variant: str, args) -> None:
    torch.set_num_threads(args.threads)
    runner = build(variant, args, the_batch(args))
    for _ in range(2):  # optimizer state, allocator warm-up, the teacher cache's first epoch
        runner.step()
    reset_peak()
    before = status_mb("VmRSS")
    for _ in range(args.memory_steps):
        runner.step()
    print(json.dumps({"before_mb": before, "peak_mb": status_mb("VmHWM")}))


def measure_memory(variant: str, args) -> dict[str, float]:
    options = {
        "threads": args.threads,
        "batch": args.batch,
        "seq": args.seq,
        "memory_steps": args.memory_steps,
    }
    return run_child(__file__, variant, options)


def plot(result: dict, path: Path) -> None:
    """Per-round steps/s ratios to the loop (box and dots) and peak memory ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    speed.boxplot([result["variants"][n]["ratios"] for n in names], tick_labels=names)
    for i, n in enumerate(names, start=1):
        values = result["variants"][n]["ratios"]
        speed.scatter([i] * len(values), values, s=8, color="k", zorder=3)
    speed.axhline(1.0, color="grey", ls="--", lw=1)
    speed.set_ylabel("steps/s ÷ hand-written loop's (per round)")
    speed.set_title(f"enc384 training step, {result['rounds']} interleaved rounds")
    memory.bar(names, [result["variants"][n]["peak_ratio_to_loop"] for n in names])
    memory.axhline(1.0, color="grey", ls="--", lw=1)
    memory.set_ylabel("peak RSS ÷ loop's")
    memory.set_title("peak memory during training steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "peers",
        help="where peers.json and peers.png are written",
    )
    args = parser.parse_args()
    if args.child:
        child_memory(args.child, args)
        return
    torch.set_num_threads(args.threads)
    skipped = {v: why for v in args.variants if (why := available(v))}
    names = [v for v in args.variants if v not in skipped]
    if "loop" not in names:
        raise SystemExit("the loop variant is the reference; keep it in --variants")
    batch = the_batch(args)
    runners = {name: build(name, args, batch) for name in names}
    for runner in runners.values():
        for _ in range(2):
            runner.step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            start = time.perf_counter()
            runners[name].step()
            times[name].append(time.perf_counter() - start)
    del runners
    memory = {name: measure_memory(name, args) for name in names}
    result = {
        "case": "enc384",
        "rounds": args.rounds,
        "threads": args.threads,
        "batch": [args.batch, args.seq],
        "torch": torch.__version__,
        "skipped": skipped,
        "variants": {},
    }
    for name in names:
        ratio = [loop / mine for mine, loop in zip(times[name], times["loop"], strict=True)]
        result["variants"][name] = {
            "steps_per_s": 1 / statistics.median(times[name]),
            "ratio_to_loop": {
                "min": min(ratio),
                "median": statistics.median(ratio),
                "max": max(ratio),
            },
            "ratios": ratio,
            "peak_rss_mb": memory[name]["peak_mb"],
            "peak_ratio_to_loop": memory[name]["peak_mb"] / memory["loop"]["peak_mb"],
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "peers.png")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"enc384 TinyBERT-style step, batch {args.batch} x {args.seq}, {args.threads} threads, "
        f"{args.rounds} interleaved rounds"
    )
    print(
        f"{'variant':<12} {'steps/s':>8}  {'ratio to loop: median (min-max)':<32} {'peak MB':>8} "
        f"{'ratio':>6}"
    )
    for name, v in result["variants"].items():
        r = v["ratio_to_loop"]
        print(
            f"{name:<12} {v['steps_per_s']:8.3f}  {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"
            f"{'':<14} {v['peak_rss_mb']:8.0f} {v['peak_ratio_to_loop']:6.3f}"
        )
    for name, why in skipped.items():
        print(f"{name:<12} skipped: {why}")


if __name__ == "__main__":
    main()
