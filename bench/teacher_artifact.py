"""Training from the offline teacher artifact vs with the live teacher (issue 15, item 1).

Case (decoder): teacher GPT-2 6 x 384 (6 heads, FFN 1536), random weights (seed 0) saved as
a local model directory; student GPT-2 2 x 384 built from a config (the same seeded
initialisation in both variants); Tiny Shakespeare, blocks of 128 tokens, batch 8, fp32 on the
CPU. Two vocabularies (``--cases``): ``v50k``, GPT-2's 50,257 entries (the text tokenised with
the bundled ``bert-uncased`` tokenizer, whose ids, < 30,522, all lie inside it), and ``v4k``,
the bundled ``shakespeare-bpe`` tokenizer's 4,096. Objective ``logits_kd``
(forward KL at τ = 1) + ``ce`` (next-token CE), weights 1. The artifact is built first by
``makd teacher cache --top-k 64`` (per token 64 fp16 values, 64 int32 ids and the residual
mass; the objective then reads it as ``teacher: {cache: DIR}``, with no teacher weights).

* **Speed**: both variants are engine trainers made by ``makd run``'s own plan and setup, in
  one process; after ``--warmup`` steps each, ``--rounds`` rounds alternate them (the order
  swapped every round); per round the ratio of the live teacher's step time to the
  artifact's (= steps/s from the artifact over steps/s with the live teacher): median and
  25th-75th percentile. Per round also the share of the CPUs other processes used (the
  machine is shared). Target: median >= 1.5x.
* **Memory**: each variant alone in a child process (plan, setup, warm-up and
  ``--memory-steps`` steps): peak resident size (VmHWM) over the whole child, and the bytes
  of teacher parameters resident in memory (0 for the artifact: its teacher is a meta-device
  model).

Printed: ratios (not absolute times), the peak RSS and the teacher's resident bytes; written
to ``bench/results/llm/teacher_artifact.{json,md}``.

    python bench/teacher_artifact.py          # ~10 minutes on 2 cores (both cases)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from rss import reset_peak, run_child, status_mb  # noqa: E402

LAYERS, STUDENT_LAYERS, WIDTH, HEADS = 6, 2, 384, 6
SEQ, BATCH, TOP_K = 128, 8, 64
TOKENIZERS = ROOT / "data" / "tokenizers"
#: case → (vocabulary size, tokenizer, text lines read)
CASES = {
    "v50k": (50_257, TOKENIZERS / "bert-uncased", 1200),
    "v4k": (4_096, TOKENIZERS / "shakespeare-bpe", 1200),
}
TEXT = ROOT / "data" / "tinyshakespeare" / "train.txt"
TARGET = 1.5
#: a round is quiet when other processes used at most this share of the machine's CPUs
QUIET = 0.10


def gpt2(vocab: int, layers: int) -> str:
    """An inline GPT-2 config (dropout off)."""
    return (
        f"{{model_type: gpt2, vocab_size: {vocab}, n_positions: 1024, n_embd: {WIDTH}, "
        f"n_layer: {layers}, n_head: {HEADS}, resid_pdrop: 0.0, embd_pdrop: 0.0, "
        f"attn_pdrop: 0.0, bos_token_id: {vocab - 1}, eos_token_id: {vocab - 1}}}"
    )


OBJECTIVE = """\
teacher:
{teacher}
student:
  config: {student}
data:
  task: causal_lm
  train: {train}
  text_column: text
  max_length: {seq}
  train_limit: {lines}
training:
  steps: 100000
  batch_size: {batch}
  learning_rate: 1.0e-4
  log_every: 1000
  device: cpu
  precision: fp32
objective:
  type: sum
  name: kd
  terms:
    - {{type: logits_kd, temperature: 1.0, chunk_size: 512}}
    - {{type: ce}}
"""


def write_objective(path: Path, teacher: str, vocab: int, lines: int) -> Path:
    path.write_text(
        OBJECTIVE.format(
            teacher=teacher,
            student=gpt2(vocab, STUDENT_LAYERS),
            train=TEXT,
            seq=SEQ,
            lines=lines,
            batch=BATCH,
        ),
        encoding="utf-8",
    )
    return path


def prepare(work: Path, case: str) -> dict[str, Path]:
    """The teacher's model directory, the two objective files, and the artifact."""
    import transformers

    vocab, tokenizer, lines = CASES[case]
    teacher_dir = work / "teacher"
    if not (teacher_dir / "model.safetensors").is_file():
        config = transformers.GPT2Config(
            vocab_size=vocab,
            n_positions=1024,
            n_embd=WIDTH,
            n_layer=LAYERS,
            n_head=HEADS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
        )
        from makd_registry.models.loading import quiet_transformers

        torch.manual_seed(0)
        with quiet_transformers():
            transformers.GPT2LMHeadModel(config).save_pretrained(teacher_dir)
    live = write_objective(
        work / "live.yaml", f"  model: {teacher_dir}\n  tokenizer: {tokenizer}", vocab, lines
    )
    cached = write_objective(work / "artifact.yaml", f"  cache: {work / 'artifact'}", vocab, lines)
    start = time.perf_counter()
    build = subprocess.run(
        [sys.executable, "-m", "makd_registry.cli", "teacher", "cache", str(live)]
        + ["-o", str(work / "artifact"), "--top-k", str(TOP_K)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )
    if build.returncode != 0:
        raise SystemExit(f"makd teacher cache failed:\n{build.stderr[-3000:]}")
    return {
        "live": live,
        "artifact": cached,
        "dir": work / "artifact",
        "build_s": time.perf_counter() - start,
    }


def make_trainer(path: Path, out: Path):
    """An engine trainer exactly as ``makd run`` makes it (plan, setup, trainer)."""
    from rich.console import Console

    from makd_registry.engine.run import Run, RunOptions, _pad_id
    from makd_registry.engine.seeding import purpose_seed, seed_all
    from makd_registry.engine.trainer import Trainer

    run = Run(path, RunOptions(output=out), Console(quiet=True))
    run._check_run_dir()
    plan = run.plan()
    setup = run.setup(plan)
    trainer = Trainer(
        student=setup.student,
        student_adapter=setup.models.student_adapter,
        root=run.resolved.root,
        data=plan.data,
        training=run.training,
        pad_id=_pad_id(plan.tokenizer),
        device=run.device,
        teacher=setup.teacher,
        teacher_adapter=setup.models.teacher_adapter,
        autocast=run.autocast,
        cache_dir=out,
        source=run.resolved.source,
        teacher_artifact=run.artifact,
    )
    seed_all(purpose_seed(run.training.seed, "train"))
    return trainer


def resident_teacher_bytes(trainer) -> int:
    teacher = trainer.teacher
    if teacher is None:
        return 0
    tensors = list(teacher.parameters()) + list(teacher.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


def quartiles(values: list[float]) -> dict[str, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": q2, "q25": q1, "q75": q3, "min": min(values), "max": max(values)}


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process) from /proc."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]
    with open("/proc/self/stat") as handle:
        stat = handle.read().rsplit(")", 1)[1].split()
    return busy, int(stat[11]) + int(stat[12])


def wait_quiet(limit_s: float, window_s: float = 5.0) -> float:
    """Wait (at most ``limit_s``) until other processes have left the CPUs alone for
    ``window_s`` seconds; the seconds waited."""
    hz, cpus = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    start = time.perf_counter()
    calm = 0.0
    while calm < window_s and time.perf_counter() - start < limit_s:
        busy0, mine0 = _cpu_ticks()
        time.sleep(1.0)
        busy1, mine1 = _cpu_ticks()
        share = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / hz / cpus
        calm = calm + 1.0 if share <= QUIET else 0.0
    return time.perf_counter() - start


def speed(paths: dict[str, Path], work: Path, rounds: int, warmup: int, wait_s: float) -> dict:
    trainers = {name: make_trainer(paths[name], work / f"run-{name}") for name in VARIANTS}
    a, b = (dict(t.student.state_dict()) for t in trainers.values())
    assert all(torch.equal(a[k], b[k]) for k in a), "the students start from different weights"
    for trainer in trainers.values():
        for _ in range(warmup):
            trainer.train_step()
    waited = wait_quiet(wait_s) if wait_s else 0.0
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    others = []
    hz, cpus = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    for i in range(rounds):
        order = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
        busy0, mine0 = _cpu_ticks()
        wall0 = time.perf_counter()
        for name in order:
            start = time.perf_counter()
            trainers[name].train_step()
            times[name].append(time.perf_counter() - start)
        busy1, mine1 = _cpu_ticks()
        wall = time.perf_counter() - wall0
        others.append(max(0.0, (busy1 - busy0) - (mine1 - mine0)) / hz / (wall * cpus))
        ratio = times["live"][-1] / times["artifact"][-1]
        print(
            f"  round {i + 1}/{rounds}: live/artifact {ratio:.2f}; other processes "
            f"{others[-1]:.0%} of the CPUs",
            flush=True,
        )
    ratios = [lv / ar for lv, ar in zip(times["live"], times["artifact"], strict=True)]
    del trainers
    gc.collect()
    return {
        "ratio": {**quartiles(ratios), "ratios": ratios},
        "other_cpu_share": others,
        "waited_for_quiet_s": waited,
    }


VARIANTS = ("live", "artifact")


def child(variant: str, args) -> None:
    torch.set_num_threads(args.threads)
    reset_peak()
    before = status_mb("VmRSS")
    path = Path(args.work) / f"{'live' if variant == 'live' else 'artifact'}.yaml"
    trainer = make_trainer(path, Path(args.work) / f"mem-{variant}")
    for _ in range(args.warmup + args.memory_steps):
        trainer.train_step()
    print(
        json.dumps(
            {
                "peak_mb": status_mb("VmHWM"),
                "before_mb": before,
                "teacher_resident_bytes": resident_teacher_bytes(trainer),
                "teacher_parameters": sum(p.numel() for p in trainer.teacher.parameters()),
            }
        )
    )


def run_case(case: str, work: Path, args) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, case)
    manifest = json.loads((paths["dir"] / "manifest.json").read_text())
    print(
        f"{case}: artifact of {manifest['rows']} rows, {manifest['bytes'] / 2**20:.1f} MiB, "
        f"{manifest['bytes_per_token']:.0f} bytes per token",
        flush=True,
    )
    result = speed(paths, work, args.rounds, args.warmup, args.wait_quiet)
    options = {
        "threads": args.threads,
        "warmup": args.warmup,
        "memory_steps": args.memory_steps,
        "work": str(work),
    }
    memory = {v: run_child(__file__, v, options) for v in VARIANTS}
    artifact = {k: manifest[k] for k in ("rows", "tokens", "bytes", "bytes_per_token", "layout")}
    return {"vocab": CASES[case][0], "speed": result, "memory": memory, "artifact": artifact}


def report(results: dict[str, dict], args) -> str:
    lines = [
        "`python bench/teacher_artifact.py`: GPT-2 6×384 teacher (random weights) → 2×384 "
        f"student, batch {BATCH} × {SEQ} tokens, logits KD (τ 1) + CE, {args.threads} threads, "
        f"{args.rounds} interleaved rounds; the artifact built by `makd teacher cache --top-k "
        f"{TOP_K}`.",
        "",
        "| case | steps/s, artifact ÷ live: median [25th–75th pct] | the same, quiet rounds | "
        "peak RSS (MB), live → artifact | teacher bytes resident (MB), live → artifact | "
        "artifact bytes per token |",
        "|---|---|---|---|---|---|",
    ]
    for res in results.values():
        r = res["speed"]["ratio"]
        shares = res["speed"]["other_cpu_share"]
        quiet = [x for x, o in zip(r["ratios"], shares, strict=True) if o <= QUIET]
        quiet_text = (
            f"{statistics.median(quiet):.2f} ({len(quiet)} rounds)" if len(quiet) >= 3 else "–"
        )
        m = res["memory"]
        lines.append(
            f"| V = {res['vocab']:,} | {r['median']:.2f} [{r['q25']:.2f}–{r['q75']:.2f}] | "
            f"{quiet_text} | {m['live']['peak_mb']:.0f} → {m['artifact']['peak_mb']:.0f} | "
            f"{m['live']['teacher_resident_bytes'] / 2**20:.1f} → "
            f"{m['artifact']['teacher_resident_bytes'] / 2**20:.1f} | "
            f"{res['artifact']['bytes_per_token']:.0f} |"
        )
    lines.append("")
    for res in results.values():
        r = res["speed"]["ratio"]
        share = statistics.median(res["speed"]["other_cpu_share"])
        held = res["memory"]["artifact"]["teacher_resident_bytes"]
        verdict = "met" if r["median"] >= TARGET else "**not met**"
        lines.append(
            f"V = {res['vocab']:,}: target ≥ {TARGET}× {verdict}"
            f" ({r['median']:.2f}×); other processes used {share:.0%} of the CPUs (median over "
            "rounds); training from the artifact holds "
            + ("no teacher weights." if held == 0 else "**teacher weights**.")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=120.0,
        help="before the timed rounds, wait up to this many seconds for 5 quiet seconds",
    )
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "llm")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        child(args.child, args)
        return
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.work) if args.work else Path(tmp)
        os.environ.setdefault("MAKD_CACHE_DIR", str(base / "makd-cache"))
        for case in args.cases:
            results[case] = run_case(case, base / case, args)
    previous = args.out / "teacher_artifact.json"
    if previous.is_file() and set(args.cases) != set(CASES):  # keep the other cases' results
        kept = json.loads(previous.read_text()).get("results", {})
        results = {c: results.get(c) or kept[c] for c in CASES if c in results or c in kept}
    text = report(results, args)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "teacher_artifact.md").write_text(text + "\n", encoding="utf-8")
    payload = {"results": results, "top_k": TOP_K, "threads": args.threads, "rounds": args.rounds}
    (args.out / "teacher_artifact.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
