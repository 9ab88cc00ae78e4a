"""The statistics of a grid's report (rrepa.experiments.report): mean ± std over seeds, Welch and paired t
intervals of a difference, the verdict an interval gives a claim, steps to reach a target on a curve, and how
each is printed."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

LEVEL = 0.95  # the confidence level of every interval


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def welch(a: list[float], b: list[float], level: float = LEVEL) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch t confidence interval (nan bounds with fewer than 2 values a side)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, float("nan"), float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    h = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return diff, diff - h, diff + h


def paired(a: dict[int, float], b: dict[int, float], level: float = LEVEL) -> tuple[float, float, float, int]:
    """mean over shared seeds of a[seed] - b[seed], its paired t confidence interval, and the number of shared
    seeds (nan bounds with fewer than 2; nan everything with none). Runs of one seed share the flow's
    initialisation and data order, so the seed-by-seed difference removes what the two runs have in common."""
    d = np.asarray([a[s] - b[s] for s in sorted(set(a) & set(b))], dtype=np.float64)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan"), 1
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    if se == 0:
        return mean, mean, mean, len(d)
    h = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * se
    return mean, mean - h, mean + h, len(d)


def verdict(lo: float, hi: float, want_negative: bool) -> str:
    if math.isnan(lo):
        return "not resolved (needs 2+ seeds a side)"
    if (hi < 0) if want_negative else (lo > 0):
        return "holds"
    if (lo > 0) if want_negative else (hi < 0):
        return "contradicted"
    return "not resolved (the interval contains 0)"


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which a decreasing-is-better curve [(step, value)] reaches target, interpolated
    linearly between evaluations (from step 0 at +inf, i.e. never before the first evaluation)."""
    prev = None
    for step, v in curve:
        if v <= target:
            if prev is None or prev[1] == v:
                return float(step)
            s0, v0 = prev
            return s0 + (step - s0) * (v0 - target) / (v0 - v)
        prev = (step, v)
    return None


def fmt_mean(fmt: str, m: float, s: float, n: int) -> str:
    if n == 1:
        return fmt.format(m) + " (1 seed)"
    return f"{fmt.format(m)} ± {fmt.format(s).rstrip('%')}" + ("%" if fmt.endswith("%}") else "")


def fmt_ci(fmt: str, d: float, lo: float, hi: float) -> str:
    if math.isnan(lo):
        return fmt.format(d)
    return f"{fmt.format(d)} [{fmt.format(lo)}, {fmt.format(hi)}]"
