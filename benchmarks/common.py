"""Shared by the benchmark scripts (run them as `python benchmarks/NAME.py`; this folder is then on sys.path)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall time of fn() in seconds over `repeats` calls, after one warm-up call (when warmup)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
