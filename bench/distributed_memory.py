"""Per-process training-state memory of ``training.distributed`` fsdp vs replicate (2 processes).

Case (decoder, fp32 on the CPU, gloo): student a Qwen2-style model built from a config,
``--layers`` (16) x 768, 12 query heads sharing 4 key/value heads, gated MLP 2048,
vocabulary 4,096 (the bundled ``shakespeare-bpe`` tokenizer), tied embeddings: about 104 M
parameters (the exact count is printed). Teacher: a Qwen2-style 2 x 768 model with random
weights (seed 0), saved with ``save_pretrained`` and given as ``teacher: {model: DIR}``,
placed whole on every process (``teacher: replicate``) in both runs so that only the
student's placement differs. Tiny Shakespeare in blocks of 128 tokens, batch 4 (2 rows per
process), ``--steps`` (8) AdamW steps, no evaluation, no checkpoint. Objective: ``hidden_mse``
on two mapped layer pairs (the student's middle and last layer to the teacher's 2 layers)
plus ``logits_kd`` (τ 1).

For each strategy the driver launches ``python -m torch.distributed.run --nproc_per_node=2
bench/distributed_memory.py --worker`` (``OMP_NUM_THREADS=1``), ``--rounds`` (2) times,
alternating (replicate then fsdp, the order swapped every round). A worker runs ``makd run``
in its own process (``makd_registry.cli.main``) with the engine's ``make_optimizer`` wrapped
so that a step post-hook on the optimizer records, after every step, this process's bytes of

* **parameters** and **gradients** of the optimizer's parameters (a DTensor's local shard,
  ``to_local()``), and
* **optimizer state** (AdamW's moments and step counters, local shards),

all three alive at that moment; the maximum over the steps is kept. Also the peak resident
size (VmHWM, reset after the first step) of the whole process over steps 2 onwards and over
the whole run (imports, data, the teacher, activations, FSDP's gathered blocks, and what
the allocator keeps of freed buffers), and the time of every step after ``--warmup`` (2)
steps. Each process writes its figures as JSON into a directory the driver gives.

Printed: per strategy the largest per-process parameter, gradient and optimizer-state bytes
and their sum, and the peak resident sizes; the ratios fsdp ÷ replicate of that sum (target
≤ 0.6), of the peak resident size, and of steps/s per round (the slower process of each
launch; ratios of launches measured side by side in one invocation, never absolute times);
the share of the CPUs other processes used during each launch (the machine is shared); and
the largest relative difference (Frobenius, per tensor) between the two strategies' final
students (``student/model.safetensors``): both must compute the same update (≤ 1e-4).
``--mmap-threshold BYTES`` runs the workers with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed,
so that freed large buffers (the student's whole weights before sharding, FSDP's all-gather
buffers) go back to the system and the resident size follows the live tensors.

    python bench/distributed_memory.py              # ~2-4 minutes on 2 cores
    python bench/distributed_memory.py --layers 2 --steps 4 --rounds 1   # smoke, ~30 s
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOKENIZER = ROOT / "data" / "tokenizers" / "shakespeare-bpe"
TEXT = ROOT / "data" / "tinyshakespeare" / "train.txt"
WIDTH, HEADS, KV_HEADS, FFN, VOCAB = 768, 12, 4, 2048, 4096
TEACHER_LAYERS, SEQ, BATCH, PROCESSES = 2, 128, 4, 2
STRATEGIES = ("replicate", "fsdp")
TARGET = 0.6
MAX_WEIGHT_DIFF = 1e-4
MB = 2**20


def qwen2(layers: int) -> dict:
    """A Qwen2-style config (dropout off, as Qwen2's defaults)."""
    return {
        "model_type": "qwen2",
        "vocab_size": VOCAB,
        "hidden_size": WIDTH,
        "intermediate_size": FFN,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }


def flow(mapping: dict) -> str:
    """A YAML flow mapping of plain scalars."""
    items = ", ".join(
        f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in mapping.items()
    )
    return "{" + items + "}"


OBJECTIVE = """\
teacher:
  model: {teacher}
  tokenizer: {tokenizer}
student:
  config: {student}
data:
  task: causal_lm
  train: {train}
  text_column: text
  max_length: {seq}
  train_limit: 600
training:
  steps: {steps}
  batch_size: {batch}
  learning_rate: 1.0e-4
  log_every: 1
  device: cpu
  precision: fp32
  distributed: {{strategy: replicate, teacher: replicate}}
objective:
  type: sum
  name: kd
  layers: {pairs}
  terms:
    - {{type: hidden_mse}}
    - {{type: logits_kd, temperature: 1.0, chunk_size: 512}}
"""


def prepare(work: Path, layers: int, steps: int) -> tuple[Path, int]:
    """The teacher's model directory and the objective file; the student's parameter count."""
    import transformers

    from makd_registry.models.loading import quiet_transformers

    teacher_dir = work / "teacher"
    torch.manual_seed(0)
    with quiet_transformers():
        teacher = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**qwen2(TEACHER_LAYERS)))
        teacher.save_pretrained(teacher_dir)
        with torch.device("meta"):
            student = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**qwen2(layers)))
    count = sum(p.numel() for p in student.parameters())  # a tied table counted once
    pairs = [[max(layers // 2 - 1, 0), 0], [layers - 1, TEACHER_LAYERS - 1]]
    path = work / "objective.yaml"
    path.write_text(
        OBJECTIVE.format(
            teacher=teacher_dir,
            tokenizer=TOKENIZER,
            student=flow(qwen2(layers)),
            train=TEXT,
            seq=SEQ,
            steps=steps,
            batch=BATCH,
            pairs=pairs,
        ),
        encoding="utf-8",
    )
    return path, count


# -- worker (one process of a torchrun launch) --------------------------------------------


def worker(args: argparse.Namespace) -> int:
    from rss import reset_peak, status_mb  # bench/ is sys.path[0] (run as a script)
    from torch.distributed.tensor import DTensor

    import makd_registry.engine.trainer as trainer_module
    from makd_registry.cli import main

    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size()

    peak = {"param_bytes": 0, "grad_bytes": 0, "state_bytes": 0, "total_bytes": 0}
    stamps: list[float] = []
    seen = {"params": 0, "first_peak_mb": 0.0, "steps_peak_mb": 0.0}

    def after_step(optimizer: torch.optim.Optimizer, *_: object) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        now = {
            "param_bytes": sum(nbytes(p) for p in params),
            "grad_bytes": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "state_bytes": sum(
                nbytes(v)
                for state in optimizer.state.values()
                for v in state.values()
                if isinstance(v, torch.Tensor)
            ),
        }
        now["total_bytes"] = sum(now.values())
        for key, value in now.items():
            peak[key] = max(peak[key], value)
        seen["params"] = sum(p.numel() for p in params)  # global (a DTensor's full shape)
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            seen["first_peak_mb"] = status_mb("VmHWM")
            reset_peak()  # the optimizer state exists: the peak of the steps after the first
        else:
            seen["steps_peak_mb"] = status_mb("VmHWM")

    make_optimizer = trainer_module.make_optimizer

    def recording(named_parameters, training):
        optimizer, scheduler = make_optimizer(named_parameters, training)
        optimizer.register_step_post_hook(after_step)
        return optimizer, scheduler

    trainer_module.make_optimizer = recording
    process_start = time.perf_counter()
    setting = f"training.distributed={{strategy: {args.strategy}, teacher: replicate}}"
    code = main(["run", str(args.objective), "--output", str(args.output), "--set", setting])
    rank = int(os.environ.get("RANK", "0"))
    timed = stamps[args.warmup - 1 :] if args.warmup >= 1 else stamps
    figures = {
        **peak,
        "rank": rank,
        "exit_code": code,
        "steps": len(stamps),
        "optimizer_params": seen["params"],
        "steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else None,
        # VmHWM is reset after the first step: the peak over steps 2 onwards, and over the
        # whole process (setup and the first step, or the rest with the final save)
        "steps_peak_mb": seen["steps_peak_mb"],
        "process_peak_mb": max(seen["first_peak_mb"], status_mb("VmHWM")),
        "seconds": time.perf_counter() - process_start,
    }
    args.figures.mkdir(parents=True, exist_ok=True)
    (args.figures / f"rank{rank}.json").write_text(json.dumps(figures, indent=2) + "\n")
    return code


# -- driver --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (from /proc/stat)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _children_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(strategy: str, objective: Path, work: Path, args: argparse.Namespace, tag: str) -> dict:
    """One torchrun launch of ``strategy``; the processes' figures."""
    output, figures = work / f"run-{tag}", work / f"figures-{tag}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={PROCESSES}",
        f"--master_port={free_port()}",
        str(Path(__file__).resolve()),
        "--worker",
        "--strategy",
        strategy,
        "--objective",
        str(objective),
        "--output",
        str(output),
        "--figures",
        str(figures),
        "--warmup",
        str(args.warmup),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    busy0, mine0, start = _machine_busy_s(), _children_s(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    other = max(0.0, (_machine_busy_s() - busy0) - (_children_s() - mine0))
    if done.returncode != 0:
        raise SystemExit(
            f"{strategy} failed (exit {done.returncode}):\n  {' '.join(cmd)}\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
    ranks = [json.loads((figures / f"rank{r}.json").read_text()) for r in range(PROCESSES)]
    return {
        "strategy": strategy,
        "ranks": ranks,
        "output": str(output),
        "wall_s": wall,
        "other_cpu_share": other / wall / (os.cpu_count() or 1),
    }


def max_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """The largest ``|a - b| / |a|`` (Frobenius norms) over the tensors: its value, the
    tensor's name, and that tensor's largest absolute difference."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    errors = {k: float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a}
    worst = max(errors, key=errors.__getitem__)
    return {
        "relative": errors[worst],
        "tensor": worst,
        "max_abs": float((a[worst] - b[worst]).abs().max()),
    }


MEMORY = (
    "param_bytes",
    "grad_bytes",
    "state_bytes",
    "total_bytes",
    "steps_peak_mb",
    "process_peak_mb",
)


def steps_per_s(run: dict) -> float:
    """A launch's steps/s: its slowest process's."""
    return min(r["steps_per_s"] for r in run["ranks"])


def summarise(runs: list[dict]) -> dict:
    """A strategy's launches: the largest per-process figure of every memory field (over
    the processes and the launches) and the median share of the CPUs others used."""
    out: dict = {k: max(r[k] for run in runs for r in run["ranks"]) for k in MEMORY}
    out["other_cpu_share"] = statistics.median(run["other_cpu_share"] for run in runs)
    return out


def report(results: dict, ratios: list[float], count: int, diff: dict, args) -> str:
    rep, fs = results["replicate"], results["fsdp"]
    lines = [
        f"`python bench/distributed_memory.py`: Qwen2-style student {args.layers} × {WIDTH} "
        f"(GQA {HEADS}/{KV_HEADS}, FFN {FFN}, V {VOCAB:,}, tied), {count:,} parameters; "
        f"teacher {TEACHER_LAYERS} × {WIDTH} (random, replicated); batch {BATCH} × {SEQ} "
        f"tokens over {PROCESSES} processes (gloo, 1 thread each), hidden_mse + logits_kd, "
        f"AdamW, {args.steps} steps (steps/s over the last {args.steps - args.warmup}), "
        f"{args.rounds} round(s) of both launches"
        + (f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}." if args.mmap_threshold else "."),
        "",
        "| strategy | parameters (MB) | gradients (MB) | optimizer state (MB) | sum (MB) | "
        "peak RSS, steps 2+ (MB) | peak RSS, whole process (MB) | other CPU share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        lines.append(
            f"| {name} | {res['param_bytes'] / MB:.1f} | {res['grad_bytes'] / MB:.1f} | "
            f"{res['state_bytes'] / MB:.1f} | {res['total_bytes'] / MB:.1f} | "
            f"{res['steps_peak_mb']:.0f} | {res['process_peak_mb']:.0f} | "
            f"{res['other_cpu_share']:.0%} |"
        )
    ratio = fs["total_bytes"] / rep["total_bytes"]
    verdict = "met" if ratio <= TARGET else "**not met**"
    same = "ok" if diff["relative"] <= MAX_WEIGHT_DIFF else f"**above {MAX_WEIGHT_DIFF:g}**"
    per_round = ", ".join(f"{r:.3f}" for r in ratios)
    lines += [
        "",
        "Per process (the largest over the processes, the steps and the rounds); ratios fsdp "
        "÷ replicate:",
        "",
        f"* parameters + gradients + optimizer state: {ratio:.3f} (target ≤ {TARGET}: {verdict})",
        "* peak resident size of the whole process over steps 2 onwards (VmHWM reset after "
        f"the first step): {fs['steps_peak_mb'] / rep['steps_peak_mb']:.3f}; over the whole "
        f"process: {fs['process_peak_mb'] / rep['process_peak_mb']:.3f}",
        f"* steps/s: median {statistics.median(ratios):.3f} (per round: {per_round})",
        f"* final students, largest relative difference per tensor: {diff['relative']:.2e} "
        f"({same}; `{diff['tensor']}`, largest absolute difference {diff['max_abs']:.1e})",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="student layers (2: smoke run)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="launches of each strategy, alternating (the order swapped every round)",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        help="run the workers with glibc's MALLOC_MMAP_THRESHOLD_ set to this many bytes (a "
        "fixed threshold: freed large buffers go back to the system at once)",
    )
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--objective", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--figures", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.steps < args.warmup + 2 or args.warmup < 1:
        parser.error("need --warmup >= 1 and --steps >= --warmup + 2 (two timed step ends)")
    from safetensors.torch import load_file

    runs: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MAKD_CACHE_DIR", str(work / "makd-cache"))
        objective, count = prepare(work, args.layers, args.steps)
        for round_ in range(args.rounds):
            order = STRATEGIES if round_ % 2 == 0 else STRATEGIES[::-1]
            for strategy in order:
                run = launch(strategy, objective, work, args, f"{strategy}-{round_}")
                runs[strategy].append(run)
                print(
                    f"round {round_ + 1}/{args.rounds} {strategy}: {run['wall_s']:.0f} s, "
                    f"other processes {run['other_cpu_share']:.0%} of the CPUs",
                    file=sys.stderr,
                )
            ratios.append(steps_per_s(runs["fsdp"][-1]) / steps_per_s(runs["replicate"][-1]))
        weights = {
            s: load_file(Path(r[0]["output"]) / "student" / "model.safetensors")
            for s, r in runs.items()
        }
        diff = max_relative(weights["replicate"], weights["fsdp"])
    for name, launches in runs.items():
        held = {r["optimizer_params"] for run in launches for r in run["ranks"]}
        assert held == {count}, f"{name}: the optimizer holds {held} parameters, not {count}"
    results = {s: summarise(r) for s, r in runs.items()}
    print(report(results, ratios, count, diff, args))
    if args.json:
        payload = {
            "parameters": count,
            "max_weight_diff": diff,
            "steps_per_s_ratios": ratios,
            "results": results,
            "runs": runs,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
