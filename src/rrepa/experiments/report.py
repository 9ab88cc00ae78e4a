"""The report of an experiment grid (rrepa.experiments.runner): tables of mean ± std over seeds, a confidence interval
for each of the paper's claims, and plots, written into the results folder as README.md and PNGs.

The claims (R-REPA paper, tested on whatever the grid trained):
1. R-REPA (arm `reverse`) reaches a lower FID than F-REPA (`forward`) and D-REPA (`detach`).
2. Alignment raises the training-free classifier's accuracy above the baseline's.
3. The one-step classifier's accuracy matches the best layer of linear probing (needs `probes.jsonl`, from
   `rrepa experiment probe`).
4. R-REPA reaches the baseline's final FID in fewer steps.
5. Alignment moves the aligned layer's linear probe from the baseline's towards the target encoder's (needs
   `probes.jsonl` and `reference_probes.jsonl`).
The claims compare arms in the baseline's space. A grid whose arms also train on VAE latents (an arm naming a latent
preset) gets a section of its own comparing the spaces, each with and without alignment (issue #12's table).

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

from rrepa.experiments.probes import images_of, target_of
from rrepa.experiments.records import EVALS, GRID_COPY, PROBES, REFERENCE_PROBES, read_evals
from rrepa.experiments.stats import fmt_ci, fmt_mean, mean_std, paired, steps_to_reach, verdict, welch
from rrepa.training.config import RunConfig, read_yaml
from rrepa.utils import atomic_write

# (key in evals.jsonl, column title, format, lower is better)
METRICS = [("fid", "FID", "{:.1f}", True), ("precision", "precision", "{:.3f}", False),
           ("recall", "recall", "{:.3f}", False), ("class_accuracy", "class acc.", "{:.1%}", False),
           ("one_step_top1", "one-step top-1", "{:.1%}", False),
           ("bayes_top1", "Bayes top-1", "{:.1%}", False), ("bpd", "bits/dim (true labels)", "{:.4f}", True),
           ("wall_min", "wall-clock (min)", "{:.0f}", True)]
MIN_GAP = 0.05  # claim 5's share of the gap is shown where the target's probe is this far above the baseline's
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
    last = {a: _configured_steps(folder, a) or final for a in arms}
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
    lines += _claims(rows, tab, same_space, baseline, final, probes)
    refs = read_evals(folder / REFERENCE_PROBES, missing_ok=True)
    lines += _probe_claim(folder, probes, refs, same_space, baseline, arm_order)
    lines += _paired_section(rows, same_space, baseline, final)
    if latent and len(latent) < len(arms):
        lines += _spaces(tab, arms, latent, _aligned_arms(folder, arms), final)
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


def latent_arms(rows: list[dict]) -> list[str]:
    """The arms whose evaluations are of latent runs (their bits/dim are per latent dimension), in row order."""
    return list(dict.fromkeys(r["arm"] for r in rows if LATENT_BPD in str(r.get("bpd_protocol", ""))))


def _arm_config(folder: Path, arm: str) -> RunConfig | None:
    """The resolved config of an arm's first stored seed (the runner writes folder/configs/ARM-sSEED.yaml; an arm's
    seeds share every other setting); None without one."""
    for path in sorted((folder / "configs").glob(f"{arm}-s*.yaml")):
        if path.stem.rpartition("-s")[0] == arm:
            return RunConfig.from_dict(read_yaml(path))
    return None


def _aligned_arms(folder: Path, arms: list[str]) -> set[str]:
    """The arms that train with alignment."""
    return {a for a in arms if (cfg := _arm_config(folder, a)) is not None and cfg.align.enabled}


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
            vb, va = _final_values(tab, b, final, key), _final_values(tab, a, final, key)
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


def _configured_steps(folder: Path, arm: str) -> int | None:
    """train.steps of an arm, from the resolved configs the runner stores (None without them)."""
    cfg = _arm_config(folder, arm)
    return None if cfg is None else cfg.train.steps


def _final_values(tab, arm: str, final: int, key: str) -> list[float]:
    return tab.get(arm, {}).get(final, {}).get(key, [])


def _claims(rows, tab, arms, baseline: str, final: int, probes: list[dict]) -> list[str]:
    out = ["## The paper's claims, tested", ""]
    fid = {a: _final_values(tab, a, final, "fid") for a in arms}
    # 1. R-REPA's FID against F-REPA's and D-REPA's (and the baseline's).
    out += ["**Claim 1: R-REPA reaches a lower FID than F-REPA and D-REPA.** Difference of final FIDs "
            "(negative: R-REPA better):", ""]
    compared = []
    for other in ("forward", "detach", baseline):
        if "reverse" in fid and other in fid and fid["reverse"] and fid[other]:
            d, lo, hi = welch(fid["reverse"], fid[other])
            compared.append(f"| reverse - {other} | {fmt_ci('{:+.1f}', d, lo, hi)} | {verdict(lo, hi, True)} |")
    if compared:
        out += ["| comparison | difference [95 % CI] | verdict |", "|---|---|---|", *compared]
    else:
        out.append(f"Not tested: needs the `reverse` arm and one of `forward`, `detach`, `{baseline}` at step "
                   f"{final:,}.")
    out += ["", "The paper also reports sFID; the embedded Fashion-MNIST evaluator has no spatial features, so "
            "sFID is not measured here.", ""]
    # 2. The classifier's accuracy, aligned arms against the baseline.
    out += ["**Claim 2: alignment raises the training-free classifier's accuracy.** Difference of final top-1 "
            "against the baseline (positive: alignment better):", "",
            "| arm | one-step: difference [95 % CI] | verdict | Bayes: difference [95 % CI] | verdict |",
            "|---|---|---|---|---|"]
    for a in arms:
        if a == baseline:
            continue
        cells = []
        for key in ("one_step_top1", "bayes_top1"):
            va, vb = _final_values(tab, a, final, key), _final_values(tab, baseline, final, key)
            if va and vb:
                d, lo, hi = welch(va, vb)
                cells += [fmt_ci("{:+.1%}", d, lo, hi), verdict(lo, hi, False)]
            else:
                cells += ["—", "—"]
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    # 3. The one-step classifier against the best linear probe, per arm.
    out += ["", "**Claim 3: the one-step classifier matches the best linear probe.** Final one-step top-1 against "
            "the best (block, layer) probe of the same EMA weights, on the same test images (difference: one-step "
            "minus probe):", ""]
    if probes:
        out += ["| arm | one-step top-1 | best probe top-1 | best position(s) | difference [95 % CI] | verdict |",
                "|---|---|---|---|---|---|"]
        for a in arms:
            p = [r for r in probes if r["arm"] == a]
            one = {r["seed"]: r["one_step_top1"] for r in rows if r["arm"] == a and r["step"] == final
                   and isinstance(r.get("one_step_top1"), (int, float))}
            pairs = [(one[r["seed"]], r["probe_top1"]) for r in p if r["seed"] in one]
            if not pairs:
                continue
            o, q = [x for x, _ in pairs], [y for _, y in pairs]
            d, lo, hi = welch(o, q)
            where = ", ".join(sorted({f"({r['probe_block']}, {r['probe_layer']})" for r in p}))
            word = {"holds": "one-step is above the probe", "contradicted": "does not hold: one-step is below"}.get(
                verdict(lo, hi, False), "not resolved (the interval contains 0)"
                if not math.isnan(lo) else "not resolved (needs 2+ seeds)")
            out.append(f"| {a} | {fmt_mean('{:.1%}', *mean_std(o), len(o))} | "
                       f"{fmt_mean('{:.1%}', *mean_std(q), len(q))} | {where} | {fmt_ci('{:+.1%}', d, lo, hi)} | "
                       f"{word} |")
    else:
        out.append("Not measured yet: run `rrepa experiment probe` on the results folder.")
    # 4. Steps to the baseline's final FID.
    out += ["", "**Claim 4: R-REPA reaches the baseline's final FID in fewer steps.**", ""]
    if fid.get(baseline):
        target = float(np.mean(fid[baseline]))
        out += [f"Target: the baseline's mean FID at step {final:,}, {target:.1f}. Steps each seed needed to reach "
                "it (interpolated between evaluations; '—': not reached by the last evaluation), and the speed-up "
                f"{final:,} / steps of the seeds that reached it:", "",
                "| arm | steps per seed | speed-up (mean) |", "|---|---|---|"]
        for a in arms:
            reached = [steps_to_reach(c, target) for c in finished_curves(rows, a, final)]
            ok = [s for s in reached if s is not None]
            speed = f"{np.mean([final / s for s in ok]):.2f}x ({len(ok)} of {len(reached)} seeds)" if ok else "—"
            out.append(f"| {a} | " + ", ".join("—" if s is None else f"{s:,.0f}" for s in reached) + f" | {speed} |")
        out += ["", "![steps to the baseline's final FID](steps_to_baseline.png)", ""]
    else:
        out += [f"Needs the `{baseline}` arm at step {final:,}.", ""]
    return out


def _probe_claim(folder: Path, probes: list[dict], refs: list[dict], arms: list[str], baseline: str,
                 grid_arms: list[str]) -> list[str]:
    """Claim 5: each aligned arm's probe at its aligned position(s) against the baseline's there, paired by seed,
    with the probes of its target and of the raw pixels on the same images (probes.jsonl, reference_probes.jsonl).
    grid_arms: every arm of the grid, evaluated or not."""
    out = ["**Claim 5: alignment moves the aligned layer's probe towards the target's.**", "The linear probe of each "
           "aligned position (final EMA weights, the images of claim 3) against the baseline's probe at the same "
           "position on the same seeds, paired by seed (positive: the aligned arm's probe is higher), and the probe "
           "of the arm's target on the same images, clean, its tokens mean-pooled as the flow's are. \"share of the "
           "gap\": the difference over (target's probe - the baseline's), where the target's probe is at least "
           f"{100 * MIN_GAP:.0f} points above (below that the ratio is noise).", ""]
    if not _aligned_arms(folder, grid_arms):
        return [*out[:1], "", "Not tested: no arm of this grid trains with alignment.", ""]
    per_pos = {a: {r["seed"]: _probed_positions(r) for r in probes if r["arm"] == a} for a in arms}
    lines = []
    for a in arms:
        cfg = _arm_config(folder, a)
        if a == baseline or cfg is None or not cfg.align.enabled or not per_pos[a]:
            continue
        ref = next((r for r in refs if r["reference"] == "target" and r["target"] == target_of(cfg)
                    and r["images"] == images_of(cfg)), None)
        for t, l in cfg.align.positions:
            va = {s: v[(t, l)] for s, v in per_pos[a].items() if (t, l) in v}
            vb = {s: v[(t, l)] for s, v in per_pos.get(baseline, {}).items() if (t, l) in v and s in va}  # paired
            d, lo, hi, n = paired(va, vb)
            base = float(np.mean(list(vb.values()))) if vb else math.nan
            gap = d / (ref["probe_top1"] - base) if ref and n and ref["probe_top1"] - base >= MIN_GAP else math.nan
            lines.append(f"| {a} | ({t}, {l}) | {fmt_mean('{:.1%}', *mean_std(list(va.values())), len(va))} | "
                         + (f"{fmt_mean('{:.1%}', *mean_std(list(vb.values())), len(vb))} | "
                            f"{fmt_ci('{:+.1%}', d, lo, hi)} ({n}) | {verdict(lo, hi, False)} | " if n else
                            "— | — | — | ")
                         + (f"{ref['probe_top1']:.1%} (`{ref['encoder']}`) | " if ref else "not probed | ")
                         + ("—" if math.isnan(gap) else f"{gap:.0%}") + " |")
    if not lines:
        return [*out, "Not measured yet: needs the probes of an aligned arm (`rrepa experiment probe` on the results "
                "folder).", ""]
    out += ["| arm | position | its probe | baseline's probe | difference [95 % CI] (seeds) | verdict | target's "
            "probe | share of the gap |", "|---|---|---|---|---|---|---|---|", *lines]
    pixels = [r for r in refs if r["reference"] == "pixels"]
    if pixels:
        out += ["", "The raw pixels on the same images (a linear probe of the flattened pixels, the floor): "
                + ", ".join(f"{r['probe_top1']:.1%} ({r['images']['name']})" for r in pixels) + "."]
    return [*out, ""]


def _probed_positions(row: dict) -> dict[tuple[int, int], float]:
    """(block, layer) -> test accuracy of one probes.jsonl line (an older line without `positions`: its best)."""
    rows = row.get("positions") or [{"block": row["probe_block"], "layer": row["probe_layer"],
                                     "test_acc": row["probe_top1"]}]
    return {(r["block"], r["layer"]): r["test_acc"] for r in rows}


def _paired_section(rows, arms: list[str], baseline: str, final: int) -> list[str]:
    """Each arm against the baseline and against `reverse` (R-REPA, the arm exploratory grids vary), seed by seed:
    the mean of same-seed differences at the final step with its paired t interval. One seed gives a
    difference without an interval, still fairer than a single run set against another arm's mean."""
    refs = [r for r in (baseline, "reverse") if r in arms]
    pairs = [(a, r) for r in refs for a in arms if a not in (r, baseline)]
    keys = (("fid", "FID", "{:+.1f}", True), ("one_step_top1", "one-step top-1", "{:+.1%}", False),
            ("bayes_top1", "Bayes top-1", "{:+.1%}", False))
    rows_out = []
    for a, r in pairs:
        cells, n = [], 0
        for key, _, fmt, lower in keys:
            d, lo, hi, n_key = paired(final_by_seed(rows, a, key, final), final_by_seed(rows, r, key, final))
            n = max(n, n_key)
            word = verdict(lo, hi, lower).split(" (")[0]  # the reason in brackets is the table's caption
            cells.append("—" if n_key == 0 else fmt_ci(fmt, d, lo, hi) + (f", {word}" if n_key > 1 else ""))
        if n:
            rows_out.append(f"| {a} - {r} | {n} | " + " | ".join(cells) + " |")
    if not rows_out:  # no pair of arms has finished a common seed yet
        return []
    out = ["## Paired by seed", "",
           "Runs of one seed start from the same initial flow and see the data in the same order, so differences "
           "taken seed by seed remove that shared part. Each cell: the mean over shared seeds of (arm - reference) "
           "at the final step, with a paired t 95 % interval and its verdict where 2 or more seeds are shared "
           "(`holds`: the interval excludes 0 in the better direction: lower FID, higher top-1).", "",
           "| comparison | seeds | " + " | ".join(f"{t} difference" for _, t, _, _ in keys) + " |",
           "|---|---|" + "---|" * len(keys), *rows_out]
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

    base = [v for c in by_seed(rows, baseline, "fid").values() for s, v in c if s == final]
    if not base:
        return
    target = float(np.mean(base))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, a in enumerate(arms):
        reached = [steps_to_reach(c, target) for c in finished_curves(rows, a, final)]
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
