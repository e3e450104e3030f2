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
