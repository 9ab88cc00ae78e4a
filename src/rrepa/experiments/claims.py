"""The paper's claims, tested on whatever a grid trained (rrepa.experiments.report puts these sections in its page):

1. R-REPA (arm `reverse`) reaches a lower FID than F-REPA (`forward`) and D-REPA (`detach`).
2. Alignment raises the training-free classifier's accuracy above the baseline's.
3. The one-step classifier's accuracy matches the best layer of linear probing (needs `probes.jsonl`).
4. R-REPA reaches the baseline's final FID in fewer steps; and, along the way, each of the baseline's FIDs.
5. Alignment moves the aligned layer's linear probe from the baseline's towards the target encoder's (needs
   `probes.jsonl` and `reference_probes.jsonl`).

Then the same-seed differences against the baseline and `reverse`, with paired t intervals. Each section is a list
of Markdown lines.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rrepa.experiments.probes import images_of, target_of
from rrepa.experiments.stats import fmt_ci, fmt_mean, mean_std, paired, steps_to_reach, verdict, welch
from rrepa.experiments.tables import aligned_arms, arm_config, final_by_seed, final_values, finished_curves

MIN_GAP = 0.05  # claim 5's share of the gap is shown where the target's probe is this far above the baseline's


def claims(rows: list[dict], tab: dict, arms: list[str], baseline: str, final: int, probes: list[dict]) -> list[str]:
    """Claims 1-4 at step `final`. rows: evals.jsonl's; tab: tables.table(rows); arms: those in the baseline's space;
    probes: probes.jsonl's rows (claim 3)."""
    out = ["## The paper's claims, tested", ""]
    fid = {a: final_values(tab, a, final, "fid") for a in arms}
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
            va, vb = final_values(tab, a, final, key), final_values(tab, baseline, final, key)
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
        target, per_arm = steps_to_baseline(rows, arms, baseline, final)
        out += [f"Target: the baseline's mean FID at step {final:,}, {target:.1f}. Steps each seed needed to reach "
                "it (interpolated between evaluations; '—': not reached by the last evaluation), and the speed-up "
                f"{final:,} / steps of the seeds that reached it:", "",
                "| arm | steps per seed | speed-up (mean) |", "|---|---|---|"]
        for a, reached in per_arm.items():
            ok = [s for s in reached if s is not None]
            speed = f"{np.mean([final / s for s in ok]):.2f}x ({len(ok)} of {len(reached)} seeds)" if ok else "—"
            out.append(f"| {a} | " + ", ".join("—" if s is None else f"{s:,.0f}" for s in reached) + f" | {speed} |")
        out += ["", "![steps to the baseline's final FID](steps_to_baseline.png)", ""]
        out += speed_ups(rows, arms, baseline, final)
    else:
        out += [f"Needs the `{baseline}` arm at step {final:,}.", ""]
    return out


def steps_to_baseline(rows: list[dict], arms: list[str], baseline: str, final: int
                      ) -> tuple[float, dict[str, list[float | None]]]:
    """Claim 4's measure: the target (the baseline's mean FID over its seeds evaluated at step `final`) and, for
    each arm, the steps each finished seed needed to reach it (interpolated; None: not reached). The target is nan
    and the lists empty where the baseline was not evaluated at `final`."""
    base = [c[-1][1] for c in finished_curves(rows, baseline, final)]
    target = float(np.mean(base)) if base else math.nan
    reached = {a: [steps_to_reach(c, target) for c in finished_curves(rows, a, final)] if base else [] for a in arms}
    return target, reached


def speed_ups(rows: list[dict], arms: list[str], baseline: str, final: int) -> list[str]:
    """Claim 4 along the way: for each step s before `final` at which the baseline was evaluated, an arm's speed-up
    s / (the steps its seed needed to reach the baseline's mean FID at s), mean over the seeds that reached it (at
    `final` it is claim 4's own table). Finished seeds only, as in claim 4. A seed already there at its first
    evaluation gives a lower bound (shown with >=)."""
    base = finished_curves(rows, baseline, final)
    steps = sorted({s for c in base for s, _ in c if s < final})
    if not steps:
        return []
    target = {s: float(np.mean([v for c in base for t, v in c if t == s])) for s in steps}
    lines = []
    for a in arms:
        curves = finished_curves(rows, a, final)
        if a == baseline or not curves:
            continue
        cells = []
        for s in steps:
            reached = [steps_to_reach(c, target[s]) for c in curves]
            ok = [r for r in reached if r is not None]
            # steps_to_reach returns a curve's first step only when it was there already (no interpolation before it)
            bound = ">=" if any(r == c[0][0] for r, c in zip(reached, curves)) else ""
            part = "" if len(ok) == len(reached) else f" ({len(ok)} of {len(reached)})"
            cells.append(f"{bound}{np.mean([s / r for r in ok]):.2f}x{part}" if ok else "—")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["Along the way: for each step s before the last at which the baseline was evaluated, s / (the steps an "
            "arm needed to reach the baseline's mean FID at s), mean over seeds (above 1: the arm got there sooner; "
            "'(k of n)': seeds that reached it; '>=': a seed was there at its first evaluation, so a lower bound):",
            "",
            "| arm | " + " | ".join(f"{s:,} ({target[s]:.1f})" for s in steps) + " |", "|---|" + "---|" * len(steps),
            *lines, ""]


def probe_claim(folder: Path, probes: list[dict], refs: list[dict], arms: list[str], baseline: str,
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
    if not aligned_arms(folder, grid_arms):
        return [*out[:1], "", "Not tested: no arm of this grid trains with alignment.", ""]
    per_pos = _probes_by_seed(probes, arms)
    lines = []
    for a in arms:
        cfg = arm_config(folder, a)
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


def probe_positions(folder: Path, probes: list[dict], arms: list[str]) -> list[str]:
    """The probe of every (block, layer) of every arm (final EMA weights, mean ± std over seeds): where in the flow
    the class is linearly readable, and whether alignment moves more than the aligned position. Aligned positions
    carry a '*'."""
    per_arm = {a: list(v.values()) for a, v in _probes_by_seed(probes, arms).items() if v}
    if not per_arm:
        return []
    positions = sorted({pos for v in per_arm.values() for seed in v for pos in seed})
    out = ["**Linear probes at every (block, layer)**, final EMA weights, mean ± std over seeds (the images of claim "
           "3; '*': the arm's aligned position):", "",
           "| arm | " + " | ".join(f"({t}, {l})" for t, l in positions) + " |", "|---|" + "---|" * len(positions)]
    for a, seeds in per_arm.items():
        cfg = arm_config(folder, a)
        aligned = {tuple(p) for p in cfg.align.positions} if cfg is not None and cfg.align.enabled else set()
        cells = []
        for pos in positions:
            v = [s[pos] for s in seeds if pos in s]
            cells.append((fmt_mean("{:.1%}", *mean_std(v), len(v)) if v else "—") + (" *" if pos in aligned else ""))
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    return [*out, ""]


def _probes_by_seed(probes: list[dict], arms: list[str]) -> dict[str, dict[int, dict[tuple[int, int], float]]]:
    """arm -> seed -> (block, layer) -> probe test accuracy, from probes.jsonl's lines (one per finished cell)."""
    return {a: {r["seed"]: _probed_positions(r) for r in probes if r["arm"] == a} for a in arms}


def _probed_positions(row: dict) -> dict[tuple[int, int], float]:
    """(block, layer) -> test accuracy of one probes.jsonl line (an older line without `positions`: its best)."""
    rows = row.get("positions") or [{"block": row["probe_block"], "layer": row["probe_layer"],
                                     "test_acc": row["probe_top1"]}]
    return {(r["block"], r["layer"]): r["test_acc"] for r in rows}


def paired_section(rows, arms: list[str], baseline: str, final: int) -> list[str]:
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
