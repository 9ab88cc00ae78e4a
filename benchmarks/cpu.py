"""How busy the machine is, for benchmarks on shared machines. Imports no torch, so that a benchmark can measure
what happens before torch is loaded (bench_contention)."""

from __future__ import annotations

import os
import resource
import time


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have used, CPU seconds this script and its finished children have used)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    ours = sum(getattr(resource.getrusage(who), k) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for k in ("ru_utime", "ru_stime"))
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), ours


def idle_cores(seconds: float = 1.0) -> float | None:
    """How many cores no process used over the next `seconds` (None where /proc/stat is missing): the load the
    timings of a shared machine are taken under."""
    try:
        start = busy_seconds()[0]
        time.sleep(seconds)
        used = busy_seconds()[0] - start
    except OSError:
        return None
    return max(0.0, os.cpu_count() - used / seconds)
