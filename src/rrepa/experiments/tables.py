"""A grid's evaluations as the report reads them: the metrics it tabulates, the evaluation rows as tables (arm ->
step -> values over seeds) and curves (seed -> [(step, value)]), and each arm's resolved config, which the runner
stores in the results folder."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from rrepa.training.config import RunConfig, read_yaml

# (key in evals.jsonl, column title, format, lower is better)
METRICS = [("fid", "FID", "{:.1f}", True), ("precision", "precision", "{:.3f}", False),
           ("recall", "recall", "{:.3f}", False), ("class_accuracy", "class acc.", "{:.1%}", False),
           ("one_step_top1", "one-step top-1", "{:.1%}", False),
           ("bayes_top1", "Bayes top-1", "{:.1%}", False), ("bpd", "bits/dim (true labels)", "{:.4f}", True),
           ("wall_min", "wall-clock (min)", "{:.0f}", True)]
LATENT_BPD = "per latent dimension"  # in the bpd_protocol of a latent run's evaluations (rrepa.eval.bpd)


def value(row: dict, key: str) -> float | None:
    """A metric of one evaluation row; wall_min is the run's wall clock at that evaluation (wall_s: training and
    its evaluations so far, carried across resumes) in minutes."""
    v = row.get("wall_s") if key == "wall_min" else row.get(key)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v) / 60 if key == "wall_min" else float(v)


def table(rows: list[dict]) -> dict[str, dict[int, dict[str, list[float]]]]:
    """arm -> step -> metric -> values over seeds (in seed order)."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in sorted(rows, key=lambda r: (r["arm"], r["step"], r["seed"])):
        for key, *_ in METRICS:
            v = value(r, key)
            if v is not None:
                out[r["arm"]][r["step"]][key].append(v)
    return out


def by_seed(rows: list[dict], arm: str, key: str) -> dict[int, list[tuple[int, float]]]:
    """seed -> [(step, value)] of one arm, sorted by step."""
    out: dict = defaultdict(list)
    for r in rows:
        if r["arm"] == arm and isinstance(r.get(key), (int, float)):
            out[r["seed"]].append((r["step"], float(r[key])))
    return {s: sorted(v) for s, v in sorted(out.items())}


def final_by_seed(rows: list[dict], arm: str, key: str, final: int) -> dict[int, float]:
    """seed -> the arm's value of a metric at the final step (seeds not evaluated there are left out)."""
    return {s: v for s, curve in by_seed(rows, arm, key).items() for step, v in curve if step == final}


def finished_curves(rows: list[dict], arm: str, final: int) -> list[list[tuple[int, float]]]:
    """The FID curves of an arm's seeds that were evaluated at the final step (a cell still training has none)."""
    return [c for c in by_seed(rows, arm, "fid").values() if c and c[-1][0] == final]


def configured_steps(folder: Path, arm: str) -> int | None:
    """train.steps of an arm, from the resolved configs the runner stores (None without them)."""
    cfg = arm_config(folder, arm)
    return None if cfg is None else cfg.train.steps


def final_values(tab, arm: str, final: int, key: str) -> list[float]:
    return tab.get(arm, {}).get(final, {}).get(key, [])


def latent_arms(rows: list[dict]) -> list[str]:
    """The arms whose evaluations are of latent runs (their bits/dim are per latent dimension), in row order."""
    return list(dict.fromkeys(r["arm"] for r in rows if LATENT_BPD in str(r.get("bpd_protocol", ""))))


def arm_config(folder: Path, arm: str) -> RunConfig | None:
    """The resolved config of an arm's first stored seed (the runner writes folder/configs/ARM-sSEED.yaml; an arm's
    seeds share every other setting); None without one."""
    for path in sorted((folder / "configs").glob(f"{arm}-s*.yaml")):
        if path.stem.rpartition("-s")[0] == arm:
            return RunConfig.from_dict(read_yaml(path))
    return None


def aligned_arms(folder: Path, arms: list[str]) -> set[str]:
    """The arms that train with alignment."""
    return {a for a in arms if (cfg := arm_config(folder, a)) is not None and cfg.align.enabled}
