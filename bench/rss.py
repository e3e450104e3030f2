"""Resident-memory probes for the benchmarks' child processes (Linux ``/proc``)."""

from __future__ import annotations


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``) in MB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    """Reset the peak resident size (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def run_child(script: str, variant: str, options: dict[str, object]) -> dict:
    """Run ``script --child VARIANT --key value ...`` in a fresh interpreter; its last JSON line.

    Each benchmark measures a variant's memory alone in a child process so that one variant's
    allocations never count against another's peak.
    """
    import json
    import subprocess
    import sys

    cmd = [sys.executable, script, "--child", variant]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{variant} memory child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
