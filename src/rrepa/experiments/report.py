"""The report of an experiment grid (rrepa.experiments.runner), written into the results folder as README.md and
PNGs: the grid, tables of mean ± std over seeds at the last evaluation and along training, the paper's claims with
a confidence interval each (rrepa.experiments.claims), the same-seed differences, and plots. The claims compare arms
in the baseline's space. A grid whose arms also train on VAE latents (an arm naming a latent preset) gets a section
of its own comparing the spaces, each with and without alignment (issue #12's table).

Differences of means get Welch's t interval (95 %), which allows unequal variances and is honest about
three seeds: its degrees of freedom are small, so its intervals are wide. A claim "holds" here when the
interval excludes zero in the claimed direction, is "contradicted" when it excludes zero the other way, and
is "not resolved" otherwise. Runs of one seed share their initial flow and data order, so a last section also
gives same-seed differences against the baseline and `reverse`, with paired t intervals.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from rrepa.experiments.claims import claims, paired_section, probe_claim, probe_positions, steps_to_baseline
from rrepa.experiments.records import EVALS, GRID_COPY, PROBES, REFERENCE_PROBES, read_evals
from rrepa.experiments.stats import fmt_ci, fmt_mean, mean_std, verdict, welch
from rrepa.experiments.tables import (
    METRICS,
    aligned_arms,
    configured_steps,
    final_values,
    finished_curves,
    latent_arms,
    table,
)
from rrepa.utils import atomic_write


def write_report(folder: str | os.PathLike, baseline: str = "baseline") -> Path:
    """Write folder/README.md and the PNG plots from folder/evals.jsonl; returns the README's path."""
    folder = Path(folder)
    if not (folder / EVALS).is_file():
        raise FileNotFoundError(f"{folder / EVALS} does not exist: run `rrepa experiment run GRID --out {folder}` "
                                f"first")
    rows = read_evals(folder / EVALS)
    if not rows:
        raise ValueError(f"{folder / EVALS} has no evaluations yet")
    grid = yaml.safe_load((folder / GRID_COPY).read_text()) if (folder / GRID_COPY).is_file() else {}
    arm_order = list(grid.get("arms", {})) or sorted({r["arm"] for r in rows})
    arms = [a for a in arm_order if any(r["arm"] == a for r in rows)]
    tab = table(rows)
    final = max(r["step"] for r in rows)
    latent = latent_arms(rows)
    lines = [f"# Experiment `{folder.name}`", "",
             f"Written by `rrepa experiment report {folder}` from `{EVALS}` ({len(rows)} evaluations). "
             f"Every number is the mean ± standard deviation over seeds (n seeds in brackets where fewer than "
             f"the grid's); intervals are Welch 95 % confidence intervals of a difference of means, except in "
             f"the section paired by seed.", ""]
    nets = sorted({r["feature_network"] for r in rows if r.get("feature_network")})
    if nets:  # a FID is only comparable with one of the same feature network (name@content hash)
        named = ", ".join(f"`{n}`" for n in nets)
        lines += [f"FID, precision, recall and class accuracy: feature network {named} (name@hash of its weights).", ""]
    lines += _grid_section(grid, arms, rows)
    # A grid whose arms train for different lengths (a recipe search) compares each arm at its own last step.
    last = {a: configured_steps(folder, a) or final for a in arms}
    own = len(set(last.values())) > 1
    lines += ["## At each arm's last evaluation" if own else f"## At the last evaluation (step {final:,})", "",
              "| arm | " + ("step | " if own else "") + "seeds | " + " | ".join(t for _, t, _, _ in METRICS) + " |",
              "|---|" + ("---|" if own else "") + "---|" + "---|" * len(METRICS)]
    for a in arms:
        at = tab[a].get(last[a] if own else final, {})
        n = max((len(v) for v in at.values()), default=0)
        cells = [fmt_mean(f, *mean_std(at[k]), len(at[k])) + (" per latent dim" if k == "bpd" and a in latent else "")
                 if at.get(k) else "—" for k, _, f, _ in METRICS]
        lines.append(f"| {a} | " + (f"{last[a]:,} | " if own else "") + f"{n} | " + " | ".join(cells) + " |")
    if latent:
        lines += ["", f"Bits/dim of {', '.join(latent)} are bits per latent dimension (VAE latents plus the training "
                  "noise): not comparable with the pixel arms' bits/dim."]
    lines += ["", "Wall-clock: the run's, training and its evaluations, on the machine it ran on (shared with "
              "other cells), so a guide to cost, not a benchmark."]
    lines += ["", "## FID during training", "",
              "| arm | " + " | ".join(f"{s:,}" for s in sorted({r['step'] for r in rows})) + " |",
              "|---|" + "---|" * len({r["step"] for r in rows})]
    for a in arms:
        lines.append(f"| {a} | " + " | ".join(
            fmt_mean("{:.1f}", *mean_std(tab[a][s]["fid"]), len(tab[a][s]["fid"])) if tab[a].get(s, {}).get("fid")
            else "—" for s in sorted({r["step"] for r in rows})) + " |")
    last = {a: [(c[-2][0], c[-1][1] - c[-2][1]) for c in finished_curves(rows, a, final) if len(c) > 1] for a in arms}
    starts = {v[0][0] for v in last.values() if v}
    if starts:  # whether the runs ended near their plateau, where this is about 0
        span = f"steps {starts.pop():,}-{final:,}" if len(starts) == 1 else "each arm's last interval"
        lines += ["", f"FID change over {span}, mean over the finished seeds (about 0 at a plateau): "
                  + ", ".join(f"{a} {np.mean([d for _, d in v]):+.1f}" for a, v in last.items() if v) + "."]
    diverged = [f"{r['arm']} seed {r['seed']} step {r['step']:,}: {r['diverged']} of {r['diverged'] + r['num_samples']}"
                for r in rows if r.get("diverged")]
    if diverged:  # the in-training evaluation leaves non-finite samples out of its metrics, and counts them
        lines += ["", "Samples that diverged (NaN or inf) were left out of these evaluations: " + "; ".join(diverged)]
    same_space = [a for a in arms if (a in latent) == (baseline in latent)]
    lines += _gap_by_step(tab, same_space, baseline, sorted({r["step"] for r in rows}))
    lines += ["", "![FID against step](fid.png)", "", "![one-step top-1 against step](one_step.png)", ""]
    probes = read_evals(folder / PROBES, missing_ok=True)
    lines += claims(rows, tab, same_space, baseline, final, probes)
    refs = read_evals(folder / REFERENCE_PROBES, missing_ok=True)
    lines += probe_claim(folder, probes, refs, same_space, baseline, arm_order)
    lines += probe_positions(folder, probes, arms)
    lines += paired_section(rows, same_space, baseline, final)
    if latent and len(latent) < len(arms):
        lines += _spaces(tab, arms, latent, aligned_arms(folder, arms), final)
    _plot_curves(rows, arms, "fid", "FID (embedded evaluator)", folder / "fid.png")
    _plot_curves(rows, arms, "one_step_top1", "one-step top-1", folder / "one_step.png")
    _plot_steps_to_baseline(rows, arms, baseline, final, folder / "steps_to_baseline.png")
    path = folder / "README.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return path


def _gap_by_step(tab, arms: list[str], baseline: str, steps: list[int]) -> list[str]:
    """Each arm's FID minus the baseline's at every evaluated step, with its Welch interval: where in training
    an arm is ahead (convergence speed, claim 4) and whether the gap grows or closes."""
    others = [a for a in arms if a != baseline and a in tab]
    if baseline not in tab or not others:
        return []
    out = ["", f"FID minus the `{baseline}` arm's at each step (negative: ahead), Welch 95 % interval:", "",
           "| arm | " + " | ".join(f"{s:,}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for a in others:
        cells = []
        for s in steps:
            va, vb = tab[a].get(s, {}).get("fid", []), tab[baseline].get(s, {}).get("fid", [])
            if not va or not vb:
                cells.append("—")
                continue
            d, lo, hi = welch(va, vb)
            cells.append(f"{d:+.1f}" if math.isnan(lo) else f"{d:+.1f} [{lo:+.0f}, {hi:+.0f}]")
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    return out


def _spaces(tab, arms: list[str], latent: list[str], aligned: set[str], final: int) -> list[str]:
    """Pixel against latent arms, each with and without alignment: final FID and classifier accuracies, and
    Welch intervals (FID, one-step and Bayes top-1) of latent minus pixel (same alignment) and aligned minus
    not (same space)."""
    def space(a):
        return "latents" if a in latent else "pixels"

    out = ["## Pixels and latents", "",
           "The same comparison in both spaces: each arm's final evaluation, and the training time it took.", "",
           "| arm | space | alignment | seeds | FID | one-step top-1 | Bayes top-1 | wall-clock (min) |",
           "|---|---|---|---|---|---|---|---|"]
    for a in arms:
        at = tab[a].get(final, {})
        cells = [fmt_mean(f, *mean_std(at[k]), len(at[k])) if at.get(k) else "—"
                 for k, f in (("fid", "{:.1f}"), ("one_step_top1", "{:.1%}"), ("bayes_top1", "{:.1%}"),
                              ("wall_min", "{:.0f}"))]
        n = max((len(v) for v in at.values()), default=0)
        out.append(f"| {a} | {space(a)} | {'R-REPA' if a in aligned else 'none'} | {n} | " + " | ".join(cells) + " |")
    pairs = [(b, a, "latent - pixel") for a in arms for b in arms
             if space(a) == "pixels" and space(b) == "latents" and (a in aligned) == (b in aligned)]
    pairs += [(b, a, "aligned - not") for a in arms for b in arms
              if space(a) == space(b) and a not in aligned and b in aligned]
    if pairs:
        out += ["", "| comparison | kind | FID difference [95 % CI] | verdict (lower FID) | one-step difference "
                "[95 % CI] | verdict (higher top-1) | Bayes difference [95 % CI] | verdict (higher top-1) |",
                "|---|---|---|---|---|---|---|---|"]
    for b, a, kind in pairs:
        cells = []
        for key, fmt, lower in (("fid", "{:+.1f}", True), ("one_step_top1", "{:+.1%}", False),
                                ("bayes_top1", "{:+.1%}", False)):
            vb, va = final_values(tab, b, final, key), final_values(tab, a, final, key)
            if vb and va:
                d, lo, hi = welch(vb, va)
                cells += [fmt_ci(fmt, d, lo, hi), verdict(lo, hi, lower)]
            else:
                cells += ["—", "—"]
        out.append(f"| {b} - {a} | {kind} | " + " | ".join(cells) + " |")
    return [*out, ""]


def _grid_section(grid: dict, arms: list[str], rows: list[dict]) -> list[str]:
    if not grid:
        return []
    out = ["## The grid", "",
           f"Preset `{grid.get('preset')}`, seeds {grid.get('seeds')}, common overrides "
           f"`{' '.join(grid.get('set', [])) or '(none)'}`. Each row is "
           f"`rrepa train --preset {grid.get('preset')} --set ... ` with these overrides:", "",
           "| arm | overrides | seeds evaluated |", "|---|---|---|"]
    for a in arms:
        spec = grid["arms"][a]
        seeds = sorted({r["seed"] for r in rows if r["arm"] == a})
        preset = f"`--preset {spec['preset']}` " if "preset" in spec else ""
        out.append(f"| {a} | {preset}`{' '.join(spec.get('set', [])) or '(none)'}` | {seeds} |")
    return [*out, ""]


def _plot_curves(rows, arms, key: str, ylabel: str, path: Path) -> None:
    import matplotlib  # heavy; only for the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for a in arms:
        per_step: dict = defaultdict(list)
        for r in rows:
            if r["arm"] == a and isinstance(r.get(key), (int, float)):
                per_step[r["step"]].append(float(r[key]))
        if not per_step:
            continue
        steps = sorted(per_step)
        m = np.array([np.mean(per_step[s]) for s in steps])
        sd = np.array([np.std(per_step[s], ddof=1) if len(per_step[s]) > 1 else 0.0 for s in steps])
        (line,) = ax.plot(steps, m, marker="o", ms=3, label=f"{a} (n={max(len(v) for v in per_step.values())})")
        ax.fill_between(steps, m - sd, m + sd, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{ylabel}: mean over seeds, band ± 1 std")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _plot_steps_to_baseline(rows, arms, baseline: str, final: int, path: Path) -> None:
    import matplotlib  # heavy; only for the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target, per_arm = steps_to_baseline(rows, arms, baseline, final)
    if math.isnan(target):
        return
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, reached in enumerate(per_arm.values()):
        ok = [s for s in reached if s is not None]
        if ok:
            ax.bar(i, np.mean(ok), color="C0", alpha=0.5)
            ax.scatter([i] * len(ok), ok, color="k", s=12, zorder=3)
        missing = len(reached) - len(ok)
        if missing:
            ax.text(i, final * 1.02, f"{missing} not reached", ha="center", fontsize=7)
    ax.axhline(final, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("steps")
    ax.set_title(f"steps to reach the baseline's final FID ({target:.1f})")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
