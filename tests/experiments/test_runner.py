"""Experiment grids (rrepa.experiments.runner): the evaluation log, a real 2 arms x 2 seeds grid killed and resumed (no
evaluation line lost or duplicated, the same values as an uninterrupted grid), and the report from a fixture log."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from helpers import ENV, assert_same_state, write_fake_fmnist
from rrepa.experiments.grid import grid_from_dict, load_grid
from rrepa.experiments.probes import probe_grid
from rrepa.experiments.records import EvalLog, cell_state, read_evals
from rrepa.experiments.report import write_report
from rrepa.experiments.stats import paired, steps_to_reach, verdict, welch

TIMING = {"wall_s", "eval_seconds", "eval_seconds_test"}  # the only keys that differ between two identical runs


def test_eval_log_drops_a_line_cut_short_and_duplicates(tmp_path):
    path = tmp_path / "evals.jsonl"
    good = [{"arm": "a", "seed": 0, "step": 2, "fid": 1.0}, {"arm": "a", "seed": 0, "step": 4, "fid": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*good, good[0]]) + '{"arm": "a", "se')
    log = EvalLog(path)
    assert read_evals(path) == good and log.keys == {("a", 0, 2), ("a", 0, 4)}
    # A cell that starts again from step 0 loses its lines; the others keep theirs.
    other = {"arm": "b", "seed": 0, "step": 2, "fid": 3.0}
    log.add(grid_from_dict({"arms": {"b": []}}).cells()[0], [{"step": 2, "fid": 3.0}])
    assert log.drop(grid_from_dict({"arms": {"a": []}}).cells()[0]) == 2
    assert read_evals(path) == [other] and log.keys == {("b", 0, 2)}


def test_read_evals_of_a_missing_file(tmp_path):
    assert read_evals(tmp_path / "none.jsonl", missing_ok=True) == []
    with pytest.raises(FileNotFoundError):  # the report needs evals.jsonl and says so
        read_evals(tmp_path / "none.jsonl")


# --------------------------------------------------------------------------------------------
# A real grid, killed and resumed
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory) -> Path:
    from rrepa.fmnist.evaluator import FMNISTCNN, save_evaluator

    root = tmp_path_factory.mktemp("grid")
    data = write_fake_fmnist(root / "data", n_train=64, n_test=32)
    torch.manual_seed(0)
    evaluator = save_evaluator(FMNISTCNN(), {"test_accuracy": 0.1}, root / "evaluator.safetensors")  # random
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "preset": "fmnist", "seeds": [0, 1],
        "set": ["model.patch_size=7", "model.width=32", "model.head_dim=16", "model.num_blocks=2",
                "model.layers_per_block=1", "optim.batch_size=8", "optim.warmup_steps=2", "train.steps=80",
                "train.log_every=5", "train.sample_every=0", "train.ckpt_every=10", "train.keep_last=0",
                "train.eval_every=20", "train.eval_samples=20", "train.eval_test_images=16",
                "train.eval_batch_size=16", f"train.eval_weights={evaluator}", f"data.path={data}"],
        "arms": {"baseline": [], "fast": ["optim.lr=3e-3"]}}))
    return path


def runner(grid: Path, out: Path, **kw) -> subprocess.Popen:
    env = {**ENV, "RREPA_CACHE_DIR": str(out.parent / "cache")}
    return subprocess.Popen([sys.executable, "-m", "rrepa.cli", "experiment", "run", str(grid), "--out", str(out),
                             "--jobs", "2", "--no-report"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def keyed(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["arm"], r["seed"], r["step"]): {k: v for k, v in r.items() if k not in TIMING} for r in rows}


def test_grid_killed_and_resumed_loses_and_duplicates_nothing(grid_file, tmp_path):
    expected = {(a, s, step) for a in ("baseline", "fast") for s in (0, 1) for step in (20, 40, 60, 80)}
    # The reference: the grid uninterrupted.
    finish(runner(grid_file, tmp_path / "ref"))
    ref = read_evals(tmp_path / "ref" / "evals.jsonl")
    assert len(ref) == len(expected) and set(keyed(ref)) == expected
    assert {"arm", "seed", "step", "fid", "precision", "recall", "one_step_top1", "bayes_top1", "bpd",
            "wall_s"} <= set(ref[0])
    assert keyed(ref)[("fast", 1, 40)] != keyed(ref)[("baseline", 1, 40)]  # the arms really differ
    # The folder is meant to be committed as it fills: this machine's locks and run folders are ignored.
    assert (tmp_path / "ref" / ".gitignore").read_text().split() == ["runs/", ".lock", ".probe.lock"]
    # The same grid, killed (runner and cells at once) while a cell is between checkpoints.
    out = tmp_path / "killed"
    out.mkdir()
    (out / ".gitignore").write_text("mine\n")  # a folder's own .gitignore is left alone
    proc = runner(grid_file, out)
    runs, grid = out / "runs", load_grid(grid_file)
    deadline = time.time() + 240
    while time.time() < deadline:
        if any(cell_state(c, runs / c.name) == "resume" for c in grid.cells()):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    while True:  # until no process of the group is left (the cells die with the group)
        try:
            os.killpg(proc.pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            break
    states = {c.name: cell_state(c, runs / c.name) for c in grid.cells()}
    assert "resume" in states.values() and set(states.values()) != {"done"}, states
    before = read_evals(out / "evals.jsonl") if (out / "evals.jsonl").exists() else []
    log = finish(runner(grid_file, out))
    assert "(resume" in log
    after = read_evals(out / "evals.jsonl")
    assert len(after) == len(expected) and set(keyed(after)) == expected  # no duplicate, none lost
    assert after[:len(before)] == before  # lines are only ever appended
    assert (out / ".gitignore").read_text() == "mine\n"
    assert keyed(after) == keyed(ref)  # the resumed cells evaluate exactly as the uninterrupted ones
    # Run again: everything is done, nothing is trained or logged twice.
    log = finish(runner(grid_file, out))
    assert "4 done, 0 to run" in log and read_evals(out / "evals.jsonl") == after
    # The runner probed each finished cell once, killed run or not, on the test images of its evaluations
    # (the fake split's 32, fewer than the default 2,000), and as the uninterrupted grid did.
    probes = read_evals(out / "probes.jsonl")
    assert sorted((r["arm"], r["seed"]) for r in probes) == [(a, s) for a in ("baseline", "fast") for s in (0, 1)]
    assert all(r["step"] == 80 and r["test_images"] == 32 and len(r["positions"]) == 2 and 0 <= r["probe_top1"] <= 1
               for r in probes)
    untimed = [{k: v for k, v in r.items() if k not in TIMING} for r in probes]
    ref_probes = read_evals(tmp_path / "ref" / "probes.jsonl")
    assert sorted(map(json.dumps, untimed)) == sorted(json.dumps({k: v for k, v in r.items() if k not in TIMING})
                                                      for r in ref_probes)
    assert probe_grid(out, log=lambda m: None) == 0 and read_evals(out / "probes.jsonl") == probes
    # A runner killed after its cells finished but before it probed them: the next one probes them first.
    (out / "probes.jsonl").unlink()
    log = finish(runner(grid_file, out))
    assert "4 done, 0 to run" in log and "probing 4 finished cell(s)" in log
    assert sorted(map(json.dumps, read_evals(out / "probes.jsonl"))) == sorted(map(json.dumps, probes))
    # The run folders are a cache: without them, the cells whose final evaluation is logged stay done.
    shutil.rmtree(runs)
    log = finish(runner(grid_file, out))
    assert "4 done, 0 to run" in log and read_evals(out / "evals.jsonl") == after
    # Another grid into the same folder is refused.
    other = tmp_path / "other.yaml"
    other.write_text(grid_file.read_text().replace("optim.lr=3e-3", "optim.lr=1e-2"))
    proc = runner(other, out)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "holds the results of another grid" in text


def test_a_second_runner_on_the_same_folder_is_refused(grid_file, tmp_path):
    out = tmp_path / "out"
    first = runner(grid_file, out)
    try:
        deadline = time.time() + 60
        while not (out / ".lock").is_file() or not (out / ".lock").read_text().strip():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        second = runner(grid_file, out)
        text, _ = second.communicate(timeout=120)
        assert second.returncode == 2 and f"in use by process {first.pid}" in text
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """A log as the runner writes it: one JSON object a line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_grid_file(folder: Path, arms: tuple[str, ...]) -> None:
    """The grid.yaml a run of `arms` x seeds 0-2 leaves beside its log, each arm without overrides."""
    (folder / "grid.yaml").write_text(yaml.safe_dump({"preset": "fmnist", "seeds": [0, 1, 2], "set": [],
                                                      "arms": {a: {"set": [], "seeds": [0, 1, 2]} for a in arms}}))


def fixture_rows() -> list[dict]:
    """Three seeds of four arms; reverse's FID is clearly lower, forward's no different from the baseline's."""
    rng = np.random.default_rng(0)
    base = {"baseline": 100.0, "forward": 99.0, "detach": 95.0, "reverse": 80.0}
    rows = []
    for arm, f in base.items():
        for seed in range(3):
            for step in (100, 200, 300, 400):
                fid = f * 400 / step + rng.normal(0, 1.0)
                rows.append({"arm": arm, "seed": seed, "step": step, "fid": fid, "precision": 0.5, "recall": 0.3,
                             "one_step_top1": 0.5 + (0.05 if arm == "reverse" else 0.0) + rng.normal(0, 0.005),
                             "bayes_top1": 0.6, "bpd": 5.4, "wall_s": step * 1.0,
                             "feature_network": "fmnist-cnn@0123456789"})
    return rows


def test_welch_interval_matches_scipy():
    rng = np.random.default_rng(1)
    a, b = list(rng.normal(1, 1, 3)), list(rng.normal(0, 2, 4))
    d, lo, hi = welch(a, b)
    res = stats.ttest_ind(a, b, equal_var=False)
    se = abs(d / res.statistic)
    # the interval is d +- t_{0.975, df} se, so its half-width over se is the t quantile at the Welch df:
    assert d == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
    assert stats.t.cdf((hi - d) / se, res.df) == pytest.approx(0.975, abs=1e-9)
    assert lo == pytest.approx(2 * d - hi, abs=1e-12)
    assert math.isnan(welch([1.0], [2.0, 3.0])[1])


def test_paired_interval_matches_scipy():
    """Only the shared seeds count, and the interval is scipy's paired t interval of their differences."""
    rng = np.random.default_rng(3)
    shared = rng.normal(0, 5, 4)  # a seed effect both arms have in common
    a = {s: shared[s] + 1.0 + rng.normal(0, 0.3) for s in range(4)} | {7: 99.0}
    b = {s: shared[s] + rng.normal(0, 0.3) for s in range(4)}
    d, lo, hi, n = paired(a, b)
    ci = stats.ttest_rel([a[s] for s in range(4)], [b[s] for s in range(4)]).confidence_interval(0.95)
    assert n == 4 and d == pytest.approx(np.mean([a[s] - b[s] for s in range(4)]), abs=1e-12)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-9)
    _, w_lo, w_hi = welch([a[s] for s in range(4)], list(b.values()))
    assert hi - lo < (w_hi - w_lo) / 5  # the shared seed effect cancels in the pairs, not in the means
    d, lo, hi, n = paired({0: 3.0, 1: 5.0}, {0: 1.0})
    assert (d, n) == (2.0, 1) and math.isnan(lo) and math.isnan(hi)
    assert paired({0: 1.0}, {1: 1.0})[3] == 0


@pytest.mark.parametrize("lo, hi, want_negative, word", [
    (-3, -1, True, "holds"), (1, 3, True, "contradicted"), (-1, 1, True, "not resolved"),
    (1, 3, False, "holds"), (-3, -1, False, "contradicted"), (float("nan"), float("nan"), False, "not resolved")])
def test_verdict(lo, hi, want_negative, word):
    assert verdict(lo, hi, want_negative).startswith(word)


def test_steps_to_reach_interpolates():
    curve = [(100, 50.0), (200, 30.0), (300, 20.0)]
    assert steps_to_reach(curve, 40.0) == pytest.approx(150.0)
    assert steps_to_reach(curve, 50.0) == 100.0 and steps_to_reach(curve, 60.0) == 100.0
    assert steps_to_reach(curve, 10.0) is None


def test_report_from_a_fixture_log(tmp_path):
    rows = fixture_rows()
    # a fourth reverse seed still training (evaluated up to step 200): no final values, and no part in claim 4
    unfinished = [{**r, "seed": 3} for r in rows if r["arm"] == "reverse" and r["seed"] == 0 and r["step"] <= 200]
    write_jsonl(tmp_path / "evals.jsonl", rows + unfinished)
    write_grid_file(tmp_path, ("baseline", "forward", "detach", "reverse"))
    probes = [{"arm": a, "seed": s, "step": 400, "probe_top1": 0.8 - (0.3 if a == "reverse" else 0.0) + 0.01 * s,
               "probe_block": 4, "probe_layer": 2} for a in ("baseline", "reverse") for s in range(3)]
    write_jsonl(tmp_path / "probes.jsonl", probes)
    text = write_report(tmp_path).read_text()
    assert "feature network `fmnist-cnn@0123456789` (name@hash of its weights)" in text  # which FIDs compare
    assert "diverged" not in text  # no evaluation left samples out
    fid = {(r["arm"], r["seed"], r["step"]): r["fid"] for r in rows}  # the last interval's change, by hand
    change = np.mean([fid[("reverse", s, 400)] - fid[("reverse", s, 300)] for s in range(3)])
    assert "FID change over steps 300-400, mean over the finished seeds (about 0 at a plateau): baseline " in text
    assert f"reverse {change:+.1f}." in text
    rows[0] = {**rows[0], "diverged": 7, "num_samples": 1993}
    write_jsonl(tmp_path / "evals.jsonl", rows + unfinished)
    line = f"{rows[0]['arm']} seed {rows[0]['seed']} step {rows[0]['step']:,}: 7 of 2000"
    assert f"were left out of these evaluations: {line}" in write_report(tmp_path).read_text()
    for png in ("fid.png", "one_step.png", "steps_to_baseline.png"):
        assert (tmp_path / png).stat().st_size > 1000
    final = {a: [r["fid"] for r in rows if r["arm"] == a and r["step"] == 400] for a in ("baseline", "reverse",
                                                                                        "forward")}
    m, s = np.mean(final["reverse"]), np.std(final["reverse"], ddof=1)
    assert f"| reverse | 3 | {m:.1f} ± {s:.1f} |" in text
    d, lo, hi = welch(final["reverse"], final["forward"])
    line = next(x for x in text.splitlines() if x.startswith("| reverse - forward"))
    assert f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" in line and "holds" in line
    assert any("not resolved" in x for x in text.splitlines() if x.startswith("| forward |"))  # claim 2
    # Claim 3: baseline's one-step (~50 %) is far below its probe (~81 %); reverse's (~55 %) is near its (~51 %).
    lines = [x for x in text.split("**Claim 3")[1].split("**Claim 4")[0].splitlines() if "(4, 2)" in x]
    assert len(lines) == 2 and "does not hold" in lines[0] and lines[0].startswith("| baseline")
    one = [r["one_step_top1"] for r in rows if r["arm"] == "baseline" and r["step"] == 400]
    d, lo, hi = welch(one, [p["probe_top1"] for p in probes if p["arm"] == "baseline"])
    assert f"{d:+.1%} [{lo:+.1%}, {hi:+.1%}]" in lines[0]
    # FID minus the baseline's, step by step: reverse is ahead at every step, by its interval at step 400.
    gap = text.split("FID minus the `baseline` arm's at each step")[1].split("![FID")[0]
    row = next(x for x in gap.splitlines() if x.startswith("| reverse |")).split(" | ")
    d, lo, hi = welch(final["reverse"], final["baseline"])
    assert row[-1].rstrip(" |") == f"{d:+.1f} [{lo:+.0f}, {hi:+.0f}]" and len(row) == 5  # arm + 4 steps
    assert "| baseline |" not in gap
    # Claim 4: reverse reaches the baseline's final mean FID (about 100) before its last evaluation.
    line = next(x for x in text.splitlines() if x.startswith("| reverse |") and "x (" in x)
    curves = {seed: [(r["step"], r["fid"]) for r in sorted(rows, key=lambda r: r["step"])
                     if r["arm"] == "reverse" and r["seed"] == seed] for seed in range(3)}  # not the unfinished seed 3
    reached = [steps_to_reach(c, np.mean(final["baseline"])) for c in curves.values()]
    assert line == (f"| reverse | {', '.join(f'{r:,.0f}' for r in reached)} | "
                    f"{np.mean([400 / r for r in reached]):.2f}x (3 of 3 seeds) |")
    # ... and along the way: at each baseline step s, s / (steps to the baseline's mean FID at s), mean over seeds.
    along = text.split("Along the way")[1].split("**Claim 5")[0]
    steps = sorted({r["step"] for r in rows if r["arm"] == "baseline"} - {400})  # step 400: claim 4's own table
    want = []
    for s in steps:
        target = np.mean([r["fid"] for r in rows if r["arm"] == "baseline" and r["step"] == s])
        reached = [steps_to_reach(c, target) for c in curves.values()]
        ok = [s / r for r in reached if r is not None]
        first = any(r == c[0][0] and c[0][1] <= target for r, c in zip(reached, curves.values()))
        want.append("—" if not ok else (">=" if first else "") + f"{np.mean(ok):.2f}x"
                     + ("" if len(ok) == 3 else f" ({len(ok)} of 3)"))
    assert f"| reverse | {' | '.join(want)} |" in along and "| baseline |" not in along and "| 400 (" not in along
    # Paired by seed: against the baseline and against reverse, each cell the paired mean and interval.
    section = text.split("## Paired by seed")[1]
    row = next(x for x in section.splitlines() if x.startswith("| reverse - baseline |"))
    fid = {a: {r["seed"]: r["fid"] for r in rows if r["arm"] == a and r["step"] == 400} for a in ("reverse",
                                                                                                "baseline")}
    d, lo, hi, n = paired(fid["reverse"], fid["baseline"])
    assert n == 3 and f"| 3 | {d:+.1f} [{lo:+.1f}, {hi:+.1f}], {verdict(lo, hi, True).split(' (')[0]} |" in row
    assert any(x.startswith("| forward - reverse | 3 |") for x in section.splitlines())
    assert not any(x.startswith(("| baseline -", "| reverse - reverse")) for x in section.splitlines())
    with pytest.raises(FileNotFoundError, match="experiment run"):
        write_report(tmp_path / "nothing")


def test_report_of_a_grid_whose_reverse_arm_is_still_training(tmp_path):
    """Claim 1 and the paired section need reverse's final step: until then they say so, no empty tables."""
    rows = [r for r in fixture_rows() if r["arm"] in ("baseline", "reverse") and not (r["arm"] == "reverse"
                                                                                    and r["step"] == 400)]
    write_jsonl(tmp_path / "evals.jsonl", rows)
    write_grid_file(tmp_path, ("baseline", "reverse"))
    text = write_report(tmp_path).read_text()
    claim1 = text.split("**Claim 1")[1].split("**Claim 2")[0]
    assert "Not tested: needs the `reverse` arm" in claim1 and "| comparison |" not in claim1
    assert "## Paired by seed" not in text
    rows += [r for r in fixture_rows() if r["arm"] == "reverse" and r["step"] == 400]  # reverse finishes
    write_jsonl(tmp_path / "evals.jsonl", rows)
    text = write_report(tmp_path).read_text()
    assert "| reverse - baseline |" in text.split("**Claim 1")[1].split("**Claim 2")[0]
    assert any(x.startswith("| reverse - baseline | 3 |") for x in text.split("## Paired by seed")[1].splitlines())
    write_jsonl(tmp_path / "evals.jsonl", [r for r in rows if r["step"] == 400])  # evaluated at the end only
    text = write_report(tmp_path).read_text()
    assert "x (3 of 3 seeds) |" in text.split("**Claim 4")[1] and "Along the way" not in text  # nothing before it


def test_report_compares_pixel_and_latent_arms(tmp_path):
    """A grid with latent arms: their bits/dim are labelled per latent dimension, the claims keep to the
    baseline's space, and a section compares the spaces with and without alignment."""
    rng = np.random.default_rng(2)
    fid = {"baseline": 130.0, "reverse": 128.0, "latent": 60.0, "latent_reverse": 58.0}
    bayes = {"baseline": 0.70, "reverse": 0.72, "latent": 0.85, "latent_reverse": 0.85}
    rows = []
    for arm, f in fid.items():
        latent = arm.startswith("latent")
        for seed in range(2):
            for step in (100, 200):
                rows.append({"arm": arm, "seed": seed, "step": step, "fid": f * 200 / step + rng.normal(0, 1.0),
                             "one_step_top1": 0.6 + rng.normal(0, 0.01),
                             "bayes_top1": bayes[arm] + rng.normal(0, 0.01), "bpd": 2.0 if latent else 5.2,
                             "bpd_protocol": "VAE latents + N(0, 0.2^2) noise, per latent dimension, no "
                             "dequantization, true label" if latent else "uniform dequantization, true label",
                             "wall_s": 60.0 * step})
    write_jsonl(tmp_path / "evals.jsonl", rows)
    (tmp_path / "configs").mkdir()
    for arm in fid:
        for seed in range(2):
            (tmp_path / "configs" / f"{arm}-s{seed}.yaml").write_text(yaml.safe_dump(
                {"align": {"enabled": arm.endswith("reverse")}, "data": {"vae": "v" if arm.startswith("latent")
                                                                                else None}}))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"preset": "fmnist", "seeds": [0, 1], "set": [], "arms": {
        "baseline": {"set": []}, "reverse": {"set": ["align.enabled=true"]},
        "latent": {"preset": "fmnist-latent", "set": []},
        "latent_reverse": {"preset": "fmnist-latent", "set": ["align.enabled=true"]}}}))
    text = write_report(tmp_path).read_text()
    lines = text.splitlines()
    final_table = [x for x in lines if x.startswith("| latent |") and "per latent dim" in x]
    assert len(final_table) == 1 and final_table[0].endswith("| 200 ± 0 |")  # wall-clock: 200 x 60 s = 200 min
    assert not any("per latent dim" in x for x in lines if x.startswith("| baseline |"))
    claims = text.split("## The paper's claims, tested")[1].split("## Pixels and latents")[0]
    assert "| latent" not in claims and "| reverse |" in claims
    row = next(x for x in lines if x.startswith("| latent - baseline |"))
    f_l = [r["fid"] for r in rows if r["arm"] == "latent" and r["step"] == 200]
    f_b = [r["fid"] for r in rows if r["arm"] == "baseline" and r["step"] == 200]
    d, lo, hi = welch(f_l, f_b)
    assert "latent - pixel" in row and f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" in row and "holds" in row
    b_l = [r["bayes_top1"] for r in rows if r["arm"] == "latent" and r["step"] == 200]
    b_b = [r["bayes_top1"] for r in rows if r["arm"] == "baseline" and r["step"] == 200]
    d, lo, hi = welch(b_l, b_b)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6] == f"{d:+.1%} [{lo:+.1%}, {hi:+.1%}]" and cells[7] == verdict(lo, hi, False)
    assert any(x.startswith("| latent_reverse - latent | aligned - not |") for x in lines)
    assert not any(x.startswith("| latent_reverse - baseline |") for x in lines)  # alignment differs
    assert "| latent | latents | none | 2 |" in text and "| reverse | pixels | R-REPA | 2 |" in text


# --------------------------------------------------------------------------------------------
# Reusing another grid's cells
# --------------------------------------------------------------------------------------------


def fake_results(folder: Path, grid: dict, final_of: set[str], lr_of: dict[str, str] | None = None) -> list[dict]:
    """A results folder as a runner leaves it, without training: the stored config of every cell (lr_of: other
    overrides for some, so that their config differs), evaluations up to the final step for the cells in final_of
    (else only the first), a probe per finished cell."""
    (folder / "configs").mkdir(parents=True)
    rows, probes = [], []
    for c in grid_from_dict(grid).cells():
        cfg = c.cfg if c.name not in (lr_of or {}) else grid_from_dict(
            {**grid, "set": [*grid["set"], lr_of[c.name]]}).cells()[0].cfg
        (folder / "configs" / f"{c.name}.yaml").write_text(cfg.to_yaml())
        steps = (20, 40) if c.name in final_of else (20,)
        rows += [{"arm": c.arm, "seed": c.seed, "step": s, "fid": 100.0 - s + c.seed, "wall_s": 1.0} for s in steps]
        if c.name in final_of:
            probes.append({"arm": c.arm, "seed": c.seed, "step": 40, "probe_top1": 0.5, "probe_block": 1,
                           "probe_layer": 1})
    write_jsonl(folder / "evals.jsonl", rows)
    write_jsonl(folder / "probes.jsonl", probes)
    return rows


def test_cells_finished_elsewhere_with_the_same_config_are_reused(tmp_path):
    from rrepa.experiments.records import EvalLog
    from rrepa.experiments.runner import reuse_cells, run_grid

    common = ["model.width=32", "model.head_dim=16", "train.steps=40", "train.eval_every=20"]
    source = {"preset": "fmnist", "seeds": [0, 1], "set": common, "arms": {"baseline": [], "fast": ["optim.lr=3e-3"]}}
    rows = fake_results(tmp_path / "src", source, final_of={"baseline-s0", "baseline-s1", "fast-s0"},
                        lr_of={"fast-s0": "optim.lr=1e-2"})
    grid = {**source, "reuse": [str(tmp_path / "src")]}
    # A config stored before a field existed (here train.max_skipped_fraction) still describes the same run.
    stored = tmp_path / "src" / "configs" / "baseline-s1.yaml"
    old = yaml.safe_load(stored.read_text())
    del old["train"]["max_skipped_fraction"]
    stored.write_text(yaml.safe_dump(old))
    out = tmp_path / "out"
    out.mkdir()
    logs = []
    taken = reuse_cells(grid_from_dict(grid).cells(), grid["reuse"], EvalLog(out / "evals.jsonl"), out, logs.append)
    # baseline: finished there, same config -> taken; fast-s0: finished but its config differs; fast-s1: unfinished
    assert taken == {"baseline-s0", "baseline-s1"}
    assert any("fast-s0: not reused" in m and "config differs" in m for m in logs)
    copied = read_evals(out / "evals.jsonl")
    assert copied == [r for r in rows if r["arm"] == "baseline"]
    assert [(r["arm"], r["seed"]) for r in read_evals(out / "probes.jsonl")] == [("baseline", 0), ("baseline", 1)]
    # Again: nothing is copied twice.
    reuse_cells(grid_from_dict(grid).cells(), grid["reuse"], EvalLog(out / "evals.jsonl"), out, logs.append)
    assert read_evals(out / "evals.jsonl") == copied and len(read_evals(out / "probes.jsonl")) == 2
    # A grid made only of reused cells trains nothing.
    only = {**grid, "arms": {"baseline": []}}
    (tmp_path / "only.yaml").write_text(yaml.safe_dump(only))
    logs.clear()
    assert run_grid(tmp_path / "only.yaml", tmp_path / "out2", log=logs.append) == 0
    assert any("2 done, 0 to run" in m for m in logs) and not (tmp_path / "out2" / "runs" / "baseline-s0").exists()
    assert read_evals(tmp_path / "out2" / "evals.jsonl") == copied
    with pytest.raises(ValueError, match="reuse must be a list"):
        grid_from_dict({**source, "reuse": "results/x"})


def test_a_longer_grid_branches_from_a_shorter_ones_checkpoints(grid_file, tmp_path):
    """`branch:` starts a cell at the newest checkpoint of its namesake in another grid that it would have reached
    itself: a 16-step wsd cell from an 8-step one's step 6 (its lr is the same until the 8-step cool-down). Its
    evaluations, copied up to step 6 and computed after, equal those of the same cell trained from step 0."""
    from rrepa.experiments.runner import run_grid

    base = yaml.safe_load(grid_file.read_text())
    common = [o for o in base["set"] if not o.startswith(("train.steps=", "train.eval_every=", "train.ckpt_every="))]
    short = {**base, "seeds": [0], "arms": {"baseline": []},
             "set": [*common, "optim.schedule=wsd", "train.steps=8", "train.eval_every=2", "train.ckpt_every=3"]}
    long = {**short, "set": [*common, "optim.schedule=wsd", "train.steps=16", "train.eval_every=4",
                             "train.ckpt_every=5"]}
    for name, grid in (("short", short), ("long", long), ("branched", {**long, "branch": [str(tmp_path / "short")]})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(grid))
        logs = []
        assert run_grid(tmp_path / f"{name}.yaml", tmp_path / name, jobs=1, poll=0.2, probe=False,
                        log=logs.append) == 0
    assert any(m.startswith("baseline-s0: branched from ") and m.endswith("ckpt-0000006.pt at step 6") for m in logs)
    got, want = (keyed(read_evals(tmp_path / n / "evals.jsonl")) for n in ("branched", "long"))
    assert got == want and [k[2] for k in got] == [4, 8, 12, 16]
    assert_same_state(*(tmp_path / n / "runs" / "baseline-s0" / "ckpt-0000016.pt" for n in ("branched", "long")))
    with pytest.raises(ValueError, match="branch must be a list"):
        grid_from_dict({**short, "branch": "results/x"})


def test_paths_in_a_grid_file_are_relative_to_it(tmp_path, monkeypatch):
    """Issue #33 item 2: a grid's relative paths (pinned weights, reuse folders, data.vae where it exists) are
    relative to the grid file, from whatever folder it is run; a pinned file that is missing fails the grid once,
    naming it, before any cell starts (it used to train a new evaluator into every cell's relative path)."""
    from rrepa.experiments.runner import run_grid
    from rrepa.fmnist.evaluator import FMNISTCNN, save_evaluator

    folder = tmp_path / "g"
    save_evaluator(FMNISTCNN(), {"test_accuracy": 0.1}, folder / "w" / "ev.safetensors")
    grid = {"preset": "fmnist", "seeds": [0], "set": ["train.steps=4", "train.eval_every=2",
                                                      "train.eval_weights=w/ev.safetensors"],
            "arms": {"baseline": [], "named_vae": ["data.vae=fmnist-vae", "model.in_channels=4",
                                                    "model.image_height=7", "model.image_width=7",
                                                    "model.patch_size=1"]},
            "reuse": ["../other"]}
    (folder / "grid.yaml").write_text(yaml.safe_dump(grid))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    g = load_grid(folder / "grid.yaml")
    base, named = g.cells()
    assert Path(base.cfg.train.eval_weights).resolve() == (folder / "w" / "ev.safetensors").resolve()
    assert named.cfg.data.vae == "fmnist-vae"  # a name, not a path beside the grid file: kept as it is
    assert [Path(r).resolve() for r in g.reuse_folders()] == [(tmp_path / "other").resolve()]
    grid["set"][-1] = "train.eval_weights=w/none.safetensors"
    (folder / "grid.yaml").write_text(yaml.safe_dump(grid))
    with pytest.raises(FileNotFoundError, match=r"cell baseline-s0: train.eval_weights=\S*w/none.safetensors does "
                                                r"not exist .*relative to its own folder"):
        run_grid(folder / "grid.yaml", tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists() and not list(elsewhere.iterdir())


def test_a_grid_that_would_log_no_evaluation_is_refused_up_front(tmp_path):
    """Issue #33 item 14: cells without train.eval_every log nothing the report could show; the runner says so
    before anything is trained or written."""
    from rrepa.experiments.runner import run_grid

    grid = {"preset": "fmnist", "seeds": [0], "set": ["train.steps=4"], "arms": {"baseline": [],
                                                                             "evaluated": ["train.eval_every=2"]}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    with pytest.raises(ValueError, match=r"cell\(s\) baseline-s0 have train.eval_every=0, so they would log no "
                                         r"evaluation"):
        run_grid(tmp_path / "grid.yaml", tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("change, ok", [
    ({"seeds": [0, 1]}, True),  # a new seed
    ({"arms": {"baseline": [], "fast": ["optim.lr=3e-3"]}}, True),  # a new arm
    ({"arms": {"baseline": [], "wide": ["model.width=64"]}}, True),  # a cell that never started, dropped
    ({"arms": {"baseline": ["optim.lr=3e-3"], "idle": []}}, False),  # a cell that ran, changed
    ({"arms": {"fast": ["optim.lr=3e-3"], "idle": []}}, False),  # a cell that ran, dropped
])
def test_a_grid_may_change_only_where_nothing_ran(tmp_path, change, ok):
    """baseline-s0 ran (a checkpoint), idle-s0 was killed before its first: new arms or seeds and dropping idle are
    allowed, a change to baseline is refused."""
    from rrepa.experiments.runner import _check_grid_change

    ran = {"preset": "fmnist", "seeds": [0], "set": ["model.width=32", "model.head_dim=16"],
           "arms": {"baseline": [], "idle": ["optim.lr=1e-2"]}}
    (tmp_path / "configs").mkdir()
    for c in grid_from_dict(ran).cells():
        (tmp_path / "configs" / f"{c.name}.yaml").write_text(c.cfg.to_yaml())
    (tmp_path / "runs" / "baseline-s0").mkdir(parents=True)
    (tmp_path / "runs" / "baseline-s0" / "ckpt-0000010.pt").write_bytes(b"")  # ran: a checkpoint
    (tmp_path / "runs" / "idle-s0").mkdir()  # started, killed before its first checkpoint
    logs = []
    cells = grid_from_dict({**ran, **change}).cells()
    if ok:
        _check_grid_change(tmp_path, tmp_path / "runs", cells, tmp_path / "grid.yaml", Path("new.yaml"), logs.append)
        names = {c.name for c in cells}
        added, dropped = len(names - {"baseline-s0", "idle-s0"}), int("idle-s0" not in names)
        assert logs == [f"new.yaml changes the grid in {tmp_path} where nothing ran: {added} cell(s) added, {dropped} "
                        f"that never reached a checkpoint dropped, the 1 that ran kept"]
        assert (tmp_path / "runs" / "idle-s0").is_dir() == ("idle-s0" in names)
        assert ("idle-s0" in names) == (tmp_path / "configs" / "idle-s0.yaml").exists()
    else:
        with pytest.raises(ValueError, match="cell baseline-s0 ran and is missing or resolves differently"):
            _check_grid_change(tmp_path, tmp_path / "runs", cells, tmp_path / "grid.yaml", Path("new.yaml"),
                               logs.append)


def test_only_trains_some_arms_of_a_changed_grid_without_dropping_the_others(tmp_path, monkeypatch):
    """--only picks the cells to train, not the grid: a cell of another arm that ran is neither "missing" from the
    changed grid nor dropped with its run folder."""
    from rrepa.experiments import runner as runner_module

    ran = {"preset": "fmnist", "seeds": [0], "set": ["model.width=32", "model.head_dim=16", "train.eval_every=10"],
           "arms": {"baseline": [], "idle": ["optim.lr=1e-2"]}}
    grid_copy = tmp_path / "out" / "grid.yaml"
    (tmp_path / "out" / "configs").mkdir(parents=True)
    grid_copy.write_text(yaml.safe_dump(ran, sort_keys=False))
    for c in grid_from_dict(ran).cells():
        (tmp_path / "out" / "configs" / f"{c.name}.yaml").write_text(c.cfg.to_yaml())
    for name, ckpt in (("baseline-s0", True), ("idle-s0", False)):
        (tmp_path / "out" / "runs" / name).mkdir(parents=True)
        if ckpt:  # ran: a checkpoint
            (tmp_path / "out" / "runs" / name / "ckpt-0000010.pt").write_bytes(b"")
    grown = tmp_path / "grown.yaml"  # a new arm, trained alone
    grown.write_text(yaml.safe_dump({**ran, "arms": {**ran["arms"], "fast": ["optim.lr=3e-3"]}}, sort_keys=False))
    trained = []
    monkeypatch.setattr(runner_module, "_run", lambda cells, *a, **k: trained.extend(c.name for c in cells) or 0)
    assert runner_module.run_grid(grown, tmp_path / "out", only=["fast"], probe=False, log=lambda m: None) == 0
    assert trained == ["fast-s0"]
    assert sorted(p.stem for p in (tmp_path / "out" / "configs").glob("*.yaml")) == ["baseline-s0", "fast-s0",
                                                                                      "idle-s0"]
    assert (tmp_path / "out" / "runs" / "idle-s0").is_dir()  # kept: the grid still has it


def test_report_of_a_recipe_search_compares_each_arm_at_its_own_last_step(tmp_path):
    """Arms of different train.steps (experiments/fmnist-recipe.yaml) are each shown at their own configured last
    step, with a step column; an arm still training shows dashes there, not an earlier evaluation."""
    rows = [{"arm": "short", "seed": 0, "step": 1200, "fid": 30.0, "class_accuracy": 0.8},
            {"arm": "long", "seed": 0, "step": 1200, "fid": 40.0},
            {"arm": "long", "seed": 0, "step": 1800, "fid": 25.0},
            {"arm": "unfinished", "seed": 0, "step": 900, "fid": 50.0}]
    write_jsonl(tmp_path / "evals.jsonl", rows)
    write_grid_file(tmp_path, ("short", "long", "unfinished"))
    (tmp_path / "configs").mkdir()
    for arm, steps in (("short", 1200), ("long", 1800), ("unfinished", 2400)):
        (tmp_path / "configs" / f"{arm}-s0.yaml").write_text(yaml.safe_dump({"train": {"steps": steps}}))
    text = write_report(tmp_path).read_text()
    section = text.split("## At each arm's last evaluation")[1].split("##")[0]
    assert "| arm | step | seeds | FID |" in section
    assert "| short | 1,200 | 1 | 30.0 (1 seed) |" in section and "| 80.0% (1 seed) |" in section
    assert "| long | 1,800 | 1 | 25.0 (1 seed) |" in section
    assert "| unfinished | 2,400 | 0 | — |" in section


def test_cells_with_checkpoints_are_trained_before_new_ones(tmp_path, monkeypatch):
    """A cell that has checkpoints here (resumed) starts before the cells that have none, whatever the grid's
    order: its trained steps live only in this machine's run folder."""
    from rrepa.experiments import runner as runner_module

    grid = {"preset": "fmnist", "seeds": [0, 1], "set": ["model.width=32", "model.head_dim=16", "train.steps=10"],
            "arms": {"baseline": [], "other": ["optim.lr=1e-2"]}}
    cells = grid_from_dict(grid).cells()
    (tmp_path / "configs").mkdir()
    (tmp_path / "runs" / "other-s1").mkdir(parents=True)
    (tmp_path / "runs" / "other-s1" / "ckpt-0000005.pt").write_bytes(b"")
    monkeypatch.setattr(runner_module, "train_command", lambda *a: [sys.executable, "-c", "pass"])
    logs = []
    runner_module._run(cells, tmp_path / "runs", tmp_path / "configs", EvalLog(tmp_path / "evals.jsonl"),
                       jobs=1, threads=1, poll=0.05, log=logs.append)
    started = [m.split()[1] for m in logs if m.startswith("started ")]
    assert started == ["other-s1", "baseline-s0", "other-s0", "baseline-s1"]  # the others in grid order, seed-major


@pytest.mark.parametrize("exit_code,word", [(130, "interrupted"), (143, "interrupted"),
                                            (-signal.SIGTERM, "interrupted"), (3, "failed")])
def test_a_cell_stopped_by_a_signal_is_interrupted_not_failed(tmp_path, monkeypatch, exit_code, word):
    """A cell stopped from outside (SIGINT / SIGTERM on its PID: it checkpoints and exits 130 / 143, or dies of the
    signal) is reported as interrupted, to be continued; any other exit is a failure, with the log's tail."""
    from rrepa.experiments import runner as runner_module

    grid = {"preset": "fmnist", "seeds": [0], "set": ["model.width=32", "model.head_dim=16", "train.steps=10"],
            "arms": {"baseline": []}}
    cells = grid_from_dict(grid).cells()
    exit_with = (f"import os, signal; os.kill(os.getpid(), {-exit_code})" if exit_code < 0
                 else f"import sys; sys.exit({exit_code})")
    monkeypatch.setattr(runner_module, "train_command", lambda *a: [sys.executable, "-c", exit_with])
    (tmp_path / "configs").mkdir()
    (tmp_path / "runs").mkdir()
    logs = []
    not_done = runner_module._run(cells, tmp_path / "runs", tmp_path / "configs", EvalLog(tmp_path / "evals.jsonl"),
                                  jobs=1, threads=1, poll=0.05, log=logs.append)
    assert not_done == 1
    assert logs[-1] == f"0 of 1 cells done; {word}: baseline-s0"
    stopped = any("baseline-s0 was stopped by a signal" in m and "same command again to continue" in m for m in logs)
    assert stopped == (word == "interrupted")
    assert any(m.startswith("FAILED baseline-s0 (exit code 3)") for m in logs) == (word == "failed")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_runner_even_where_sigint_was_ignored(tmp_path, monkeypatch, capsys, signum):
    """A runner started in the background (`cmd &`) inherits SIGINT ignored; `kill -INT` (or SIGTERM) on it must still
    stop it and its cells, and no further cell may start."""
    import threading

    from rrepa import cli
    from rrepa.experiments import runner as runner_module

    grid = {"preset": "fmnist", "seeds": [0, 1], "set": ["model.width=32", "model.head_dim=16", "train.steps=10",
                                                          "train.eval_every=5"], "arms": {"baseline": []}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(runner_module, "train_command", lambda *a: sleeper)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # the command sets both
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signum))
    timer.start()
    try:
        with pytest.raises(SystemExit) as err:
            cli.main(["experiment", "run", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "out"), "--jobs", "1",
                      "--no-probe"])
    finally:
        timer.cancel()
        for s, h in before.items():
            signal.signal(s, h)
    assert err.value.code == 130
    logs = capsys.readouterr().out.splitlines()
    assert any(m.startswith("interrupted: stopping 1 cell(s)") for m in logs)
    started = [m for m in logs if m.startswith("started")]
    assert len(started) == 1 and started[0].startswith("started baseline-s0")
