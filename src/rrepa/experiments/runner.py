"""Experiment grids: arms x seeds of ordinary rrepa runs, resumable across sessions, with one evaluation log.

A grid file (rrepa.experiments.grid) names a preset, the seeds, common overrides and the arms.

`rrepa experiment run GRID --out results/NAME` trains every cell `ARM-sSEED` as a separate `rrepa train`
process into `RUNS/ARM-sSEED` (RUNS defaults to `results/NAME/runs`; checkpoints are large, keep them out of
git), `jobs` at a time with `threads` intra-op threads each. It is resumable: finished cells are skipped (also
when their run folder is gone but the log holds their final evaluation), a cell with checkpoints continues from
the newest one, before any new cell starts, and a cell killed before its first checkpoint restarts. A cell named in
a `reuse` folder (another grid's results) with the same name, a resolved config equal to the one stored there
(`configs/ARM-sSEED.yaml`) and its final evaluation logged there is not trained again: its evaluations and probes
are copied, so that grids which share a baseline share its cells.
Every in-training evaluation of every cell is appended, once, as one JSON line to `results/NAME/evals.jsonl`
(keys arm, seed, step, fid, precision, recall, one_step_top1, bayes_top1, bpd, wall_s, ...): the runner copies
them from the cells' metrics.jsonl, keyed by (arm, seed, step), so a cell that is killed and resumed, and so
evaluates a step again, never duplicates a line (the evaluation is deterministic: fixed noise, EMA weights
restored exactly). Linear probes at every (block, layer) of each finished cell go to `probes.jsonl`, one line
per cell: the runner probes each cell as it finishes (`--no-probe` turns that off), while the cell's run folder,
which a fresh machine lacks, is still there; `rrepa experiment probe results/NAME` probes any finished cell left
unprobed (it may run while the grid trains), and once per grid the raw pixels and the alignment targets on the
same images (`reference_probes.jsonl`; rrepa.experiments.probes). `rrepa experiment report results/NAME`
(experiments.report) turns the logs into tables and plots.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from rrepa.experiments.grid import Cell, grid_from_dict, load_grid
from rrepa.experiments.probes import probe_grid, probe_references
from rrepa.experiments.records import (
    EVALS,
    GRID_COPY,
    PROBE_LOCK,
    PROBES,
    EvalLog,
    append_line,
    cell_state,
    eval_rows,
    read_evals,
    read_metrics,
)
from rrepa.flow.checkpoint import list_checkpoints, load_checkpoint
from rrepa.training.branch import branch, branch_mismatch
from rrepa.training.config import RunConfig, read_yaml
from rrepa.training.loop import check_pinned_files
from rrepa.utils import LOCK_FILE, RunInUseError, atomic_write, run_lock

# --------------------------------------------------------------------------------------------
# Running the grid
# --------------------------------------------------------------------------------------------


def reuse_cells(cells: list[Cell], sources: list[str], evals: EvalLog, out: Path, log=tqdm.write) -> set[str]:
    """Copy the evaluations (and probes) of the cells another grid's results folder finished with the same resolved
    config into this grid's logs; returns the names of the cells taken, which are not trained here."""
    taken: set[str] = set()
    for src in map(Path, sources):
        if not (src / EVALS).is_file():
            raise FileNotFoundError(f"reuse: {src / EVALS} does not exist; name a results folder of another grid")
        rows, probes = read_evals(src / EVALS), read_evals(src / PROBES, missing_ok=True)
        for c in cells:
            stored = src / "configs" / f"{c.name}.yaml"
            if c.name in taken or not stored.is_file():
                continue
            if not same_config(stored, c.cfg):
                log(f"{c.name}: not reused from {src}: its resolved config differs from {stored}")
                continue
            mine = [{k: v for k, v in r.items() if k not in ("arm", "seed")} for r in rows
                    if (r["arm"], r["seed"]) == (c.arm, c.seed)]
            if not any(r["step"] == c.cfg.train.steps for r in mine):
                continue  # not finished there (yet): trained here
            new = evals.add(c, mine)
            with run_lock(out, warn=log, name=PROBE_LOCK):  # probes.jsonl is the prober's
                have = {(r["arm"], r["seed"]) for r in read_evals(out / PROBES, missing_ok=True)}
                for r in probes:
                    if (r["arm"], r["seed"]) == (c.arm, c.seed) and (c.arm, c.seed) not in have:
                        append_line(out / PROBES, r)
            taken.add(c.name)
            log(f"{c.name}: reused from {src} ({new} evaluation(s) copied)")
    return taken


def branch_cells(cells: list[Cell], sources: list[str], runs: Path, evals: EvalLog, log=tqdm.write) -> None:
    """Start each cell that has not run yet at the newest checkpoint of its namesake in a `branch` folder (that
    grid's `runs/NAME/`) which the cell's config, trained from step 0, would reach (rrepa.training.branch): a longer
    schedule does not train the steps it shares with a shorter one again."""
    for c in cells:
        if cell_state(c, runs / c.name) not in ("new", "restart") or (c.arm, c.seed, c.cfg.train.steps) in evals.keys:
            continue
        for ckpt in (k for src in map(Path, sources) for k in reversed(list_checkpoints(src / "runs" / c.name))):
            state = load_checkpoint(ckpt)  # newest first, each loaded once
            if branch_mismatch(RunConfig.from_dict(state["config"]), c.cfg, int(state["step"])) is None:
                shutil.rmtree(runs / c.name, ignore_errors=True)  # a cell killed before its first checkpoint
                log(f"{c.name}: branched from {ckpt} at step {branch(ckpt, c.cfg, runs / c.name, state)}")
                break


def same_config(stored: Path, cfg: RunConfig) -> bool:
    """Whether a stored config.yaml describes the run cfg describes. The stored one is read as a RunConfig, so a
    field added to rrepa since it was written takes its default (which keeps the old behaviour) instead of making
    every finished cell look different; a key rrepa does not know (a newer rrepa's) makes it differ."""
    try:
        return RunConfig.from_dict(read_yaml(stored)).to_dict() == cfg.to_dict()
    except (KeyError, ValueError):
        return False


def train_command(cell: Cell, run_dir: Path, state: str, config_file: Path) -> list[str]:
    cmd = [sys.executable, "-m", "rrepa.cli", "train"]
    if state == "resume":
        return [*cmd, "--resume", str(run_dir)]
    return [*cmd, "--preset", cell.preset, "--config", str(config_file), "--out", str(run_dir),
            *(["--overwrite"] if state == "restart" else [])]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the runner dies (even by SIGKILL), so no cell trains on unsupervised; and
    take SIGINT again (a runner started in the background, `cmd &`, ignores it, and children inherit that), so
    that stopping the runner stops the cells."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with contextlib.suppress(Exception):  # not Linux: no parent-death signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_grid(grid_file: str | os.PathLike, out: str | os.PathLike, runs: str | os.PathLike | None = None,
             jobs: int = 2, threads: int = 1, poll: float = 5.0, only: list[str] | None = None,
             probe: bool = True, log=tqdm.write) -> int:
    """Train every unfinished cell of the grid; returns the number of cells not done (failed, or interrupted from
    outside and left to continue). With probe, each time a
    cell finishes, the finished cells not probed yet are probed (probe_grid, on the freed core), while their
    run folders, a cache that another machine or session may not have, still exist."""
    if jobs < 1 or threads < 1:
        raise ValueError(f"--jobs and --threads must be >= 1, got {jobs} and {threads}")
    grid = load_grid(grid_file)
    cells = everything = grid.cells()  # --only picks what to train; the grid's record is every cell
    if only:
        unknown = set(only) - set(grid.arms)
        if unknown:
            raise ValueError(f"--only names unknown arms {sorted(unknown)}; the grid has {', '.join(grid.arms)}")
        cells = [c for c in cells if c.arm in only]
    silent = [c.name for c in cells if c.cfg.train.eval_every == 0]
    if silent:  # such cells train and log nothing the report could show
        raise ValueError(f"{grid_file}: cell(s) {', '.join(silent)} have train.eval_every=0, so they would log no "
                         f"evaluation and `rrepa experiment report` would have nothing to show; set "
                         f"train.eval_every (e.g. - train.eval_every=300 under set:)")
    for c in cells:  # a missing pinned file fails the grid here, once, not every cell (nor trains a network there)
        try:
            check_pinned_files(c.cfg)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{grid_file}, cell {c.name}: {err} (a grid file's relative paths are relative to "
                                    f"its own folder)") from err
    out = Path(out)
    runs = Path(runs) if runs is not None else out / "runs"
    with run_lock(out, warn=log):  # one runner per results folder
        stored = out / GRID_COPY
        if stored.is_file() and grid_from_dict(yaml.safe_load(stored.read_text()), str(stored)).to_dict() != \
                grid.to_dict():
            _check_grid_change(out, runs, everything, stored, grid_file, log)
        atomic_write(stored, lambda tmp: Path(tmp).write_text(yaml.safe_dump(grid.to_dict(), sort_keys=False)))
        _ignore_local_files(out, runs)
        configs = out / "configs"
        configs.mkdir(exist_ok=True)
        for c in everything:  # the resolved config of every cell, beside its results
            atomic_write(configs / f"{c.name}.yaml", lambda tmp, c=c: Path(tmp).write_text(c.cfg.to_yaml()))
        runs.mkdir(parents=True, exist_ok=True)
        evals = EvalLog(out / EVALS)
        reused = reuse_cells(cells, grid.reuse_folders(), evals, out, log)
        branch_cells([c for c in cells if c.name not in reused], grid.branch_folders(), runs, evals, log)
        prober = (lambda: _probe_finished(out, runs, threads, log)) if probe else None
        return _run(cells, runs, configs, evals, jobs, threads, poll, log, reused, prober)


def _ignore_local_files(out: Path, runs: Path) -> None:
    """OUT/.gitignore, unless the folder has one: results folders are meant to be committed while a grid runs,
    and the locks (and run folders kept inside OUT) are this machine's, not results."""
    if (out / ".gitignore").exists():
        return
    names = [LOCK_FILE, PROBE_LOCK]
    runs, out_dir = runs.resolve(), out.resolve()
    if runs.is_relative_to(out_dir):
        names.insert(0, runs.relative_to(out_dir).as_posix() + "/")
    atomic_write(out / ".gitignore", lambda tmp: Path(tmp).write_text("".join(f"{n}\n" for n in names)))


def _check_grid_change(out: Path, runs: Path, cells: list[Cell], stored: Path, grid_file: Path,
                   log: Callable[[str], None]) -> None:
    """A changed grid file may change the grid in `out` where nothing ran (new arms or seeds, or dropping a cell
    that never reached a checkpoint) but not change or drop a cell that ran (it has a checkpoint or an evaluation
    logged): each such cell's stored config must reappear, identical, among `cells`; else ValueError. A dropped
    cell loses its stored config and its run folder (a few steps at most)."""
    new = {c.name: c.cfg.to_yaml() for c in cells}
    logged = {f"{r['arm']}-s{r['seed']}" for r in read_evals(out / EVALS, missing_ok=True)}
    stored_configs = sorted((out / "configs").glob("*.yaml"))
    ran = [p for p in stored_configs if (runs / p.stem).is_dir() and list_checkpoints(runs / p.stem)
           or p.stem in logged]
    changed = [p.stem for p in ran if new.get(p.stem) != p.read_text()]
    if changed:
        what = f"cell {changed[0]} ran and is missing or resolves differently"
        raise ValueError(f"{out} holds the results of another grid ({stored} differs from {grid_file}: {what}); "
                         f"a grid may only gain arms or seeds, or drop cells that never reached a checkpoint; choose "
                         f"another --out, or delete {out} to start over")
    dropped = [p for p in stored_configs if p.stem not in new]
    for p in dropped:
        p.unlink()
        shutil.rmtree(runs / p.stem, ignore_errors=True)
    added = set(new) - {p.stem for p in stored_configs}
    log(f"{grid_file} changes the grid in {out} where nothing ran: {len(added)} cell(s) added, {len(dropped)} that "
        f"never reached a checkpoint dropped, the {len(ran)} that ran kept")


# A training run stopped by SIGINT or SIGTERM saves a checkpoint and exits 128 + the signal's number (rrepa.cli);
# one killed before it could is reported by Popen as minus the signal's number.
STOPPED_BY_SIGNAL = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}


def _run(cells: list[Cell], runs: Path, configs: Path, evals: EvalLog, jobs: int, threads: int, poll: float,
         log, reused: set[str] = frozenset(), prober: Callable[[], None] | None = None) -> int:
    states = {c.name: "done" if c.name in reused else cell_state(c, runs / c.name) for c in cells}
    for c in cells:  # the log is the record and run folders a cache: a cell whose final evaluation is logged is
        if states[c.name] == "new" and (c.arm, c.seed, c.cfg.train.steps) in evals.keys:  # done without them
            states[c.name] = "done"
    for c in cells:  # finished cells may still have evaluations the log lacks (a runner killed at the end)
        if states[c.name] != "new":
            evals.add(c, eval_rows(runs / c.name))
    # Cells with checkpoints go first: run folders are a per-machine cache, so the steps already trained here are
    # finished before new cells start, rather than left half-done for a machine that may not keep them.
    pending = sorted((c for c in cells if states[c.name] != "done"), key=lambda c: states[c.name] != "resume")
    if prober is not None and len(pending) < len(cells):  # cells a killed runner finished but did not probe
        prober()
    log(f"{len(cells)} cells: {len(cells) - len(pending)} done, {len(pending)} to run ({jobs} at a time, "
        f"{threads} thread(s) each); runs in {runs}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TQDM_MININTERVAL": "30"}  # the cells' logs get a progress line every 30 s, not every step
    total = sum(c.cfg.train.steps for c in pending)
    bar = tqdm(total=total, desc="grid", unit="step", dynamic_ncols=True)
    done_steps = {c.name: read_metrics(runs / c.name)[1] for c in pending}
    bar.update(sum(done_steps.values()))
    running: dict[str, tuple[Cell, subprocess.Popen]] = {}
    failed: list[str] = []
    interrupted: list[str] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                c = pending.pop(0)
                run_dir = runs / c.name
                state = cell_state(c, run_dir)
                if state in ("new", "restart") and evals.drop(c):
                    log(f"{c.name} starts again from step 0: its earlier evaluations are removed from the log")
                cmd = train_command(c, run_dir, state, configs / f"{c.name}.yaml")
                logfile = open(runs / f"{c.name}.log", "a")  # noqa: SIM115 - closed when the process ends
                logfile.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {state}: {' '.join(cmd)}\n")
                logfile.flush()
                proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, preexec_fn=_die_with_parent)
                logfile.close()
                running[c.name] = (c, proc)
                log(f"started {c.name} ({state}, PID {proc.pid})")
            time.sleep(poll)
            for name, (c, proc) in list(running.items()):
                rows, step = read_metrics(runs / name)  # one read of the file per poll
                new = evals.add(c, rows)
                bar.update(max(0, step - done_steps[name]))
                done_steps[name] = max(step, done_steps[name])
                if new:
                    log(f"{name}: {new} new evaluation(s), step {step}")
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode == 0 and cell_state(c, runs / name) == "done":
                    log(f"finished {name}")
                    if prober is not None:
                        prober()
                elif proc.returncode in STOPPED_BY_SIGNAL:  # stopped from outside, e.g. `kill -INT` on its PID
                    interrupted.append(name)
                    log(f"{name} was stopped by a signal (exit code {proc.returncode}) near step {step}; run the "
                        f"same command again to continue it from its newest checkpoint")
                else:
                    failed.append(name)
                    log(f"FAILED {name} (exit code {proc.returncode}); see {runs / name}.log:\n"
                        + "".join(_tail(runs / f"{name}.log")))
    except KeyboardInterrupt:
        log(f"interrupted: stopping {len(running)} cell(s); they keep their checkpoints, run the same command "
            f"again to continue")
        _stop([p for _, p in running.values()])
        for name, (c, _) in running.items():
            evals.add(c, eval_rows(runs / name))
        raise
    finally:
        bar.close()
    not_done = failed + interrupted
    log(f"{len(cells) - len(not_done)} of {len(cells)} cells done" + "".join(
        f"; {what}: {', '.join(names)}" for what, names in (("failed", failed), ("interrupted", interrupted)) if names))
    return len(not_done)


def _probe_finished(out: Path, runs: Path, threads: int, log) -> None:
    """probe_grid, then the references its probes are read against (probe_references, once), with the cells'
    thread budget; a prober already at work (`rrepa experiment probe` by hand) is left to it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        probe_grid(out, runs, progress=False, log=log)
        probe_references(out, progress=False, log=log)
    except RunInUseError as err:
        log(f"not probing now: {err}")
    finally:
        torch.set_num_threads(before)


def _tail(path: Path, n: int = 15) -> list[str]:
    lines = path.read_text(errors="replace").splitlines(keepends=True) if path.is_file() else []
    return [line.split("\r")[-1] for line in lines[-n:]]


def _stop(procs: list[subprocess.Popen], grace: float = 120.0) -> None:
    """SIGINT first (a training run then saves a checkpoint), SIGKILL after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
