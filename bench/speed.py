"""makd against a hand-written loop, TextBrewer and TRL: the same update, two fixed cases.

Cases (``speed_cases.py``): ``enc`` (all-MiniLM-L6-v2 -> BERT 2x384, hidden MSE + attention
KL + logits KD + CE) and ``dec`` (GPT-2 6x384 -> 2x384, V 50257, forward KL + next-token CE).
Frameworks (``speed_frameworks.py``): ``loop``, ``makd``, ``makd_cache``, ``makd_bf16``,
``textbrewer`` and, for dec, ``trl`` (GKDTrainer). One run measures, per case:

1. equivalence: every framework from the same initial weights, 3 steps on the batch;
   ``|theta_fw - theta_loop| / |theta_loop - theta_0|`` over all student parameters. Above
   1e-3 (``makd_cache`` and ``makd_bf16`` excepted: fp16 / top-k cache and bf16 autocast,
   reported only; bf16's losses are checked against fp32's instead) the run stops with exit
   status 1 unless ``--keep-going``;
2. speed: the frameworks step-interleaved in one process (the order rotates each round) after
   ``--warmup`` steps each; per framework the median steps/s, and paired per-round ratios
   (makd's steps/s over the other's in the same round: median and 25th-75th percentiles);
3. peak RSS: each framework alone in a child process, peak resident size (VmHWM, reset after
   the warm-up) over ``--memory-steps`` steps; ratio to the loop's;
4. matmul fraction: the machine's fp32 matmul peak (square ``torch.mm``, best of several,
   ``--threads`` threads) and each step's FLOPs counted by ``FlopCounterMode`` (in the memory
   child, after the memory steps): FLOPs x steps/s / peak.

Writes ``speed.json`` and ``speed.md`` into ``--out`` and prints the tables.

    python bench/speed.py                       # everything, ~10-15 minutes on 2 quiet cores
    python bench/speed.py --cases enc --frameworks loop makd
    python bench/speed.py --profile             # torch.profiler tables of each step instead
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rss import reset_peak, run_child, status_mb  # noqa: E402
from speed_cases import CASES, DEC_CHUNK, DEC_TOP_K, adamw_kernel, the_batch  # noqa: E402
from speed_frameworks import FRAMEWORKS, build  # noqa: E402

TOLERANCE = 1e-3
#: reported in the equivalence table, never gated: the fp16 / top-k teacher cache and bf16
#: autocast are approximations by design
APPROXIMATE = {"makd_cache", "makd_bf16"}
#: makd itself and its variants (not peers)
MAKD = ("makd", "makd_cache", "makd_bf16")
#: bf16 autocast's losses must match fp32's within this (relative, every equivalence step)
BF16_LOSS_TOLERANCE = 0.01
#: makd's targets (issue 13): (other framework, minimum median, minimum 25th percentile)
TARGETS = [("loop", 1.05, 0.97), ("textbrewer", 1.0, 0.97), ("trl", 1.0, 0.97)]
CACHE_TARGET = 1.5
#: a round is quiet when other processes used at most this share of the machine's CPUs
QUIET = 0.10
MIN_QUIET = 5  # quiet rounds needed for the quiet-rounds ratios


def quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import logging

    for name in ("Distillation", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def quartiles(values: list[float]) -> dict[str, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": q2, "q25": q1, "q75": q3, "min": min(values), "max": max(values)}


def available(framework: str) -> str | None:
    import importlib.util

    module = {"textbrewer": "textbrewer", "trl": "trl"}.get(framework)
    if module and importlib.util.find_spec(module) is None:
        return f"{module} is not installed (use .venv-bench, see bench/README.md)"
    return None


# -- 1. equivalence ----------------------------------------------------------------------


def equivalence(case: str, names: list[str], steps: int) -> dict[str, dict]:
    batch = the_batch(case)
    ref0 = ref = None
    out: dict[str, dict] = {}
    for name in ["loop"] + [n for n in names if n != "loop"]:
        runner = build(case, name, batch)
        theta0 = flat_params(runner.student)
        step_losses = [runner.step() for _ in range(steps)]
        theta = flat_params(runner.student)
        del runner
        gc.collect()
        if name == "loop":
            ref0, ref = theta0, theta
            out[name] = {"relative_difference": 0.0, "same_init": True}
            continue
        same_init = bool(torch.equal(theta0, ref0))
        rel = float((theta - ref).norm() / (ref - ref0).norm())
        out[name] = {
            "relative_difference": rel,
            "same_init": same_init,
            "gated": name not in APPROXIMATE,
            "ok": same_init and (name in APPROXIMATE or rel <= TOLERANCE),
        }
        if step_losses[0] is not None:
            out[name]["losses"] = step_losses
        print(
            f"  {case}/{name:<11} |dθ| / |Δθ_loop| = {rel:.2e}"
            f"{'' if same_init else '  (initial weights differ!)'}"
            f"{'  (approximation, not gated)' if name in APPROXIMATE else ''}",
            flush=True,
        )
    return out


# -- 2. speed ----------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process) from /proc."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    with open("/proc/self/stat") as handle:
        stat = handle.read().rsplit(")", 1)[1].split()
    return busy, int(stat[11]) + int(stat[12])  # utime + stime


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


def speed(
    case: str, names: list[str], rounds: int, warmup: int
) -> tuple[dict[str, list[float]], list[float]]:
    """Step times per framework, and per round the share of the machine's CPUs that other
    processes used during it (the machine is shared: a busy round is a noisy round)."""
    batch = the_batch(case)
    runners = {name: build(case, name, batch) for name in names}
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
        if hasattr(runner, "ready"):
            runner.ready()
    times: dict[str, list[float]] = {name: [] for name in names}
    others: list[float] = []
    hz, cpus = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        busy0, mine0 = _cpu_ticks()
        wall0 = time.perf_counter()
        for name in order:
            start = time.perf_counter()
            runners[name].step()
            times[name].append(time.perf_counter() - start)
        busy1, mine1 = _cpu_ticks()
        wall = time.perf_counter() - wall0
        others.append(max(0.0, (busy1 - busy0) - (mine1 - mine0)) / hz / (wall * cpus))
        line = ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names)
        print(
            f"  {case} round {i + 1}/{rounds}: {line}; other processes "
            f"{others[-1]:.0%} of the CPUs",
            flush=True,
        )
    del runners
    gc.collect()
    return times, others


def paired(times: dict[str, list[float]], mine: str, other: str) -> dict[str, float]:
    """makd's steps/s over the other's, round by round (= the other's step time over makd's)."""
    ratios = [o / m for m, o in zip(times[mine], times[other], strict=True)]
    return {**quartiles(ratios), "ratios": ratios}


# -- 3./4. memory and FLOPs (child processes) --------------------------------------------


def child(variant: str, args) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    case, name = variant.split("/")
    runner = build(case, name, the_batch(case))
    for _ in range(args.warmup):
        runner.step()
    if hasattr(runner, "ready"):
        runner.ready()
    gc.collect()
    reset_peak()
    before = status_mb("VmRSS")
    for _ in range(args.memory_steps):
        runner.step()
    peak = status_mb("VmHWM")
    with FlopCounterMode(display=False) as counter:
        runner.step()
    print(json.dumps({"before_mb": before, "peak_mb": peak, "flops": counter.get_total_flops()}))


def matmul_peak(threads: int, sizes=(1024, 2048, 3072), repeats: int = 5) -> dict:
    """The best fp32 ``torch.mm`` throughput over square sizes (FLOP/s)."""
    torch.set_num_threads(threads)
    best: dict[int, float] = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        best[n] = 2 * n**3 / min(times)
    return {"per_size": best, "peak": max(best.values())}


# -- report ------------------------------------------------------------------------------


def met(ok: bool | None) -> str:
    return "measured" if ok is None else "met" if ok else "**not met**"


def evaluate(result: dict) -> list[dict]:
    """The issue's targets, each with its value and whether it is met."""
    rows = []
    for case, r in result["cases"].items():
        fws = r["frameworks"]
        ratios = r.get("paired", {})
        quiet = r.get("paired_quiet", {})

        def value(key: str, ratios=ratios, quiet=quiet) -> str:
            p = ratios[key]
            text = f"{p['median']:.3f} [{p['q25']:.3f}, {p['q75']:.3f}]"
            if key in quiet:
                q = quiet[key]
                text += f"; quiet rounds only: {q['median']:.3f} [{q['q25']:.3f}, {q['q75']:.3f}]"
            return text

        for other, median_min, q25_min in TARGETS:
            key = f"makd/{other}"
            if key in ratios:
                p = ratios[key]
                rows.append(
                    {
                        "case": case,
                        "target": f"makd ÷ {other} steps/s ≥ {median_min:.2f}, "
                        f"25th pct ≥ {q25_min}",
                        "value": value(key),
                        "met": p["median"] >= median_min and p["q25"] >= q25_min,
                    }
                )
        if "makd_cache/loop" in ratios:
            p = ratios["makd_cache/loop"]
            what = "teacher cache" if case == "enc" else f"teacher cache (top-{DEC_TOP_K})"
            rows.append(
                {
                    "case": case,
                    "target": f"makd with the {what} ÷ loop ≥ {CACHE_TARGET}",
                    "value": value("makd_cache/loop"),
                    "met": p["median"] >= CACHE_TARGET,
                }
            )
        peers = [n for n in fws if n not in MAKD]
        if "makd" in fws and all("peak_rss_mb" in fws[n] for n in ["makd", *peers]) and peers:
            worst = min(peers, key=lambda n: fws[n]["peak_rss_mb"])
            rows.append(
                {
                    "case": case,
                    "target": "makd's peak RSS ≤ every peer's",
                    "value": f"makd {fws['makd']['peak_rss_mb']:.0f} MB, lowest peer {worst} "
                    f"{fws[worst]['peak_rss_mb']:.0f} MB",
                    "met": fws["makd"]["peak_rss_mb"] <= fws[worst]["peak_rss_mb"],
                }
            )
        if "makd" in fws and all("matmul_fraction" in fws[n] for n in ["makd", *peers]) and peers:
            best = max(peers, key=lambda n: fws[n]["matmul_fraction"])
            rows.append(
                {
                    "case": case,
                    "target": "makd's matmul fraction the highest",
                    "value": f"makd {fws['makd']['matmul_fraction']:.1%}, best peer {best} "
                    f"{fws[best]['matmul_fraction']:.1%}",
                    "met": fws["makd"]["matmul_fraction"] >= fws[best]["matmul_fraction"],
                }
            )
        eq = r.get("equivalence", {})
        if "losses" in eq.get("makd_bf16", {}) and "losses" in eq.get("makd", {}):
            fp32, bf16 = eq["makd"]["losses"], eq["makd_bf16"]["losses"]
            worst = max(abs(b - a) / abs(a) for a, b in zip(fp32, bf16, strict=True))
            rows.append(
                {
                    "case": case,
                    "target": f"bf16 autocast: each of the first {len(fp32)} steps' loss "
                    f"within {BF16_LOSS_TOLERANCE:.0%} of fp32's",
                    "value": f"largest relative difference {worst:.1e} "
                    f"(fp32 {fp32[0]:.5f}, bf16 {bf16[0]:.5f} at step 1)",
                    "met": worst <= BF16_LOSS_TOLERANCE,
                }
            )
        if "makd_bf16/makd" in ratios:
            rows.append(
                {
                    "case": case,
                    "target": "bf16 autocast ÷ fp32 steps/s (makd; measured, no target)",
                    "value": value("makd_bf16/makd"),
                    "met": None,
                }
            )
    return rows


def markdown(result: dict) -> str:
    lines = []
    peak = result.get("matmul_peak", {}).get("peak")
    lines.append(
        f"`{result['command']}` — {result['threads']} threads, {result['rounds']} interleaved "
        f"rounds after {result['warmup']} warm-up step(s) each; peak RSS over "
        f"{result['memory_steps']} step(s), mean of {result['memory_repeats']} child "
        f"processes; fp32 matmul peak "
        + (f"{peak / 1e9:.1f} GFLOP/s" if peak else "not measured")
        + f"; {result['wall_s'] / 60:.1f} min."
    )
    lines.append("")
    for case, r in result["cases"].items():
        lines.append(f"**{case}**: {CASES[case].description}.")
        lines.append("")
        if "other_processes_cpu_share" in r:
            others = r["other_processes_cpu_share"]
            lines.append(
                f"Other processes used {statistics.median(others):.0%} of the machine's CPUs "
                f"in the median round (max {max(others):.0%}); {len(r['quiet_rounds'])} of "
                f"{len(others)} rounds were quiet (≤ {QUIET:.0%})."
            )
            lines.append("")
        lines.append(
            "| framework | steps/s | makd ÷ it, paired: median [25th, 75th pct] | "
            "makd_cache ÷ it | peak RSS (MB) | ÷ loop | GFLOP/step | matmul fraction | "
            "‖θ − θ_loop‖ ÷ ‖θ_loop − θ₀‖ |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for name, f in r["frameworks"].items():

            def ratio(mine: str, r=r, name=name) -> str:
                p = r.get("paired", {}).get(f"{mine}/{name}")
                return "" if p is None else f"{p['median']:.3f} [{p['q25']:.3f}, {p['q75']:.3f}]"

            eq = r.get("equivalence", {}).get(name)
            eq_text = (
                ""
                if eq is None
                else (
                    "reference"
                    if name == "loop"
                    else f"{eq['relative_difference']:.1e}"
                    + ("" if eq.get("gated", True) else " (approx.)")
                )
            )
            cells = [
                name,
                f"{f['steps_per_s']:.3f}" if "steps_per_s" in f else "",
                ratio("makd") if name != "makd" else "1",
                ratio("makd_cache") if name != "makd_cache" else "1",
                f"{f['peak_rss_mb']:.0f}" if "peak_rss_mb" in f else "",
                f"{f['peak_ratio_to_loop']:.3f}" if "peak_ratio_to_loop" in f else "",
                f"{f['flops'] / 1e9:.1f}" if "flops" in f else "",
                f"{f['matmul_fraction']:.1%}" if "matmul_fraction" in f else "",
                eq_text,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    targets = result.get("targets", [])
    if targets:
        lines.append("| case | target | value | |")
        lines.append("|---|---|---|---|")
        for t in targets:
            lines.append(f"| {t['case']} | {t['target']} | {t['value']} | {met(t['met'])} |")
        lines.append("")
    return "\n".join(lines)


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "transformers", "makd", "textbrewer", "trl", "accelerate"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", *cmd], cwd=HERE.parent, capture_output=True, text=True, check=True
            ).stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "python": platform.python_version(),
        "versions": versions,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "commit": git("rev-parse", "--short", "HEAD"),
        "modified": [line[3:] for line in git("status", "--porcelain").splitlines()],
        "load_average_start": os.getloadavg(),
    }


# -- profile -----------------------------------------------------------------------------


def profile(args, cases: dict[str, list[str]]) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = []
    for case, names in cases.items():
        batch = the_batch(case)
        for name in names:
            runner = build(case, name, batch)
            for _ in range(args.warmup):
                runner.step()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile_steps):
                    runner.step()
            table = prof.key_averages().table(
                sort_by="self_cpu_time_total",
                row_limit=args.profile_rows,
                max_name_column_width=58,
            )
            del runner
            gc.collect()
            text = f"### {case}/{name} ({args.profile_steps} steps)\n\n```\n{table}\n```\n"
            print(text, flush=True)
            out.append(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.md").write_text(
        "# torch.profiler: top ops by self CPU time\n\n`"
        + " ".join(sys.argv)
        + "`\n\n"
        + "\n".join(out)
    )


# -- main --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument(
        "--frameworks",
        nargs="+",
        choices=sorted({f for v in FRAMEWORKS.values() for f in v}),
        help="default: all of each case (loop is always included: it is the reference)",
    )
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds per case")
    parser.add_argument("--warmup", type=int, default=2, help="steps per framework first")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument(
        "--memory-repeats",
        type=int,
        default=2,
        help="child processes per framework (peak RSS: their mean)",
    )
    parser.add_argument("--equivalence-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=["equivalence", "speed", "memory", "matmul"]
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=120,
        metavar="S",
        help="before each case's speed rounds, wait up to S seconds for 5 "
        "quiet seconds (other processes <= 10%% of the CPUs); 0: don't",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="continue (exit 0) when a framework's update differs by > 1e-3",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only profile each framework's step (writes profile.md)",
    )
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "speed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet()
    if args.child:
        child(args.child, args)
        return 0

    started = time.perf_counter()
    cases, skipped = {}, {}
    for case in args.cases:
        names = [
            n
            for n in FRAMEWORKS[case]
            if not args.frameworks or n in args.frameworks or n == "loop"
        ]
        for n in names:
            if why := available(n):
                skipped[f"{case}/{n}"] = why
        cases[case] = [n for n in names if f"{case}/{n}" not in skipped]
    if args.profile:
        profile(args, cases)
        return 0

    result: dict = {
        "command": "python bench/speed.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "threads": args.threads,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "memory_steps": args.memory_steps,
        "memory_repeats": args.memory_repeats,
        "equivalence_steps": args.equivalence_steps,
        "tolerance": TOLERANCE,
        "dec_chunk_size": DEC_CHUNK,
        "dec_top_k": DEC_TOP_K,
        "adamw_kernel": adamw_kernel(),
        "environment": environment(),
        "skipped": skipped,
        "cases": {},
    }
    for what, why in skipped.items():
        print(f"skipped {what}: {why}")
    failed = False
    if "matmul" not in args.skip:
        result["matmul_peak"] = matmul_peak(args.threads)
        print(f"fp32 matmul peak: {result['matmul_peak']['peak'] / 1e9:.1f} GFLOP/s", flush=True)
    for case, names in cases.items():
        r: dict = {"description": CASES[case].description, "frameworks": {n: {} for n in names}}
        result["cases"][case] = r
        t0 = time.perf_counter()
        if "equivalence" not in args.skip:
            print(f"{case}: equivalence, {args.equivalence_steps} steps each", flush=True)
            r["equivalence"] = equivalence(case, names, args.equivalence_steps)
            bad = [n for n, e in r["equivalence"].items() if not e.get("ok", True)]
            if bad:
                failed = True
                print(
                    f"EQUIVALENCE FAILED ({case}): {', '.join(bad)} differ from the loop's "
                    f"update by more than {TOLERANCE:g}",
                    flush=True,
                )
                if not args.keep_going:
                    return 1
        if "speed" not in args.skip:
            if args.wait_quiet:
                waited = wait_quiet(args.wait_quiet)
                r["waited_for_quiet_s"] = waited
                print(f"{case}: waited {waited:.0f} s for a quiet machine", flush=True)
            print(f"{case}: speed, {args.rounds} rounds", flush=True)
            times, others = speed(case, names, args.rounds, args.warmup)
            r["times_s"] = times
            r["other_processes_cpu_share"] = others
            quiet_rounds = [i for i, x in enumerate(others) if x <= QUIET]
            r["quiet_rounds"] = quiet_rounds
            r["paired"], r["paired_quiet"] = {}, {}
            for mine in MAKD:
                for other in names:
                    if mine in names and other != mine:
                        r["paired"][f"{mine}/{other}"] = paired(times, mine, other)
                        if MIN_QUIET <= len(quiet_rounds) < len(others):
                            sub = {k: [v[i] for i in quiet_rounds] for k, v in times.items()}
                            r["paired_quiet"][f"{mine}/{other}"] = paired(sub, mine, other)
            for n in names:
                r["frameworks"][n]["steps_per_s"] = 1 / statistics.median(times[n])
        if "memory" not in args.skip:
            runs: dict[str, list[dict]] = {n: [] for n in names}
            for repeat in range(args.memory_repeats):
                for n in names:
                    print(
                        f"{case}: peak memory and FLOPs of {n} (child process, "
                        f"{repeat + 1}/{args.memory_repeats})",
                        flush=True,
                    )
                    runs[n].append(
                        run_child(
                            __file__,
                            f"{case}/{n}",
                            {
                                "threads": args.threads,
                                "warmup": args.warmup,
                                "memory_steps": args.memory_steps,
                            },
                        )
                    )
            for n, outs in runs.items():
                r["frameworks"][n].update(
                    {
                        "peak_rss_mb": statistics.mean(o["peak_mb"] for o in outs),
                        "peak_rss_mb_runs": [o["peak_mb"] for o in outs],
                        "rss_before_mb": statistics.mean(o["before_mb"] for o in outs),
                        "flops": outs[0]["flops"],
                    }
                )
            loop_peak = r["frameworks"]["loop"]["peak_rss_mb"]
            for n in names:
                f = r["frameworks"][n]
                f["peak_ratio_to_loop"] = f["peak_rss_mb"] / loop_peak
                if "steps_per_s" in f and "matmul_peak" in result:
                    f["matmul_fraction"] = (
                        f["flops"] * f["steps_per_s"] / result["matmul_peak"]["peak"]
                    )
        r["wall_s"] = time.perf_counter() - t0
    if "matmul" not in args.skip:  # again at the end: the machine is shared, keep the best
        again = matmul_peak(args.threads)
        if again["peak"] > result["matmul_peak"]["peak"]:
            result["matmul_peak_start"] = result["matmul_peak"]
            result["matmul_peak"] = again
            for r in result["cases"].values():
                for f in r["frameworks"].values():
                    if "matmul_fraction" in f:
                        f["matmul_fraction"] = f["flops"] * f["steps_per_s"] / again["peak"]
    result["environment"]["load_average_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - started
    result["targets"] = evaluate(result)
    result["equivalence_failed"] = failed
    text = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(result, indent=2))
    (args.out / "speed.md").write_text(text + "\n")
    print()
    print(text)
    print(f"wrote {args.out / 'speed.json'} and {args.out / 'speed.md'}")
    return 1 if failed and not args.keep_going else 0


if __name__ == "__main__":
    sys.exit(main())
