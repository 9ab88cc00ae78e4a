"""Branching a run: a new run that starts from another run's checkpoint at step S, where the new config, trained
from step 0, would have reached that very state.

What it is for: training a run longer without training its shared steps again. The wsd schedule holds its
learning rate until the cool-down, so a 4,800-step run follows a 2,400-step one exactly for its first 1,920 steps;
`rrepa train --branch-from OLD/ckpt-0001800.pt --out NEW --set train.steps=4800` starts NEW at step 1,800. The
branch is exact, not approximate: everything a step computes is in the checkpoint (weights, EMA, projectors, AdamW
state, schedule position, data position, RNG), the configs must agree on every key but those that only say when
the run stops, evaluates, draws grids or saves, and the learning rates must agree at every step up to S. A test
checks that the branch ends bit for bit where the new config trained from scratch ends.

The new run folder gets its own config.yaml, a copy of the checkpoint, and what its own config would have written up
to S: the metrics.jsonl lines (training lines every log_every steps, evaluations every eval_every) and the sample
grids (every sample_every), so its logs read as if it had run from step 0; its TensorBoard events start at S.
`rrepa train --resume NEW` then continues it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from rrepa.flow.checkpoint import LAST_POINTER, checkpoint_name, resolve_checkpoint
from rrepa.training.config import RunConfig
from rrepa.utils import LOCK_FILE, atomic_write, lr_schedule, run_lock

# Keys that may differ between the two configs: when the run stops, evaluates, draws grids, writes checkpoints and
# how many it keeps. Evaluation and grids draw from their own generators, so they never move the training state.
# The evaluations up to the branch point are copied, so there the new cadence must be one the old run evaluated.
FREE_KEYS = {("train", "steps"), ("train", "eval_every"), ("train", "sample_every"), ("train", "ckpt_every"),
             ("train", "keep_last")}


def branch_mismatch(old: RunConfig, new: RunConfig, step: int) -> str | None:
    """Why `new`, trained from step 0, would not reach the state `old` had at `step` (None: it would).
    old: the checkpoint's stored (resolved) config; new: the config the branch will train."""
    a, b = old.to_dict(), new.to_dict()
    if not b["data"].get("vae_fingerprint"):  # filled in when a latent run starts; the checkpoint's is the pin
        b["data"]["vae_fingerprint"] = a["data"].get("vae_fingerprint")
    for section in sorted(set(a) | set(b)):
        for key in sorted(set(a.get(section, {})) | set(b.get(section, {}))):
            va, vb = a.get(section, {}).get(key), b.get(section, {}).get(key)
            if (section, key) not in FREE_KEYS and va != vb:
                return f"{section}.{key} is {va!r} in the checkpoint's run and {vb!r} here"
    n, o = new.train.eval_every, old.train.eval_every
    missing = [s for s in range(n, step + 1, n) if not o or s % o] if n > 0 else []
    if missing:  # the branch's log copies the evaluations up to `step`: each must exist
        return (f"train.eval_every is {n} here and {o} in the checkpoint's run, which did not evaluate step "
                f"{missing[0]}; evaluate at multiples of {o} up to step {step}")
    if old.train.steps < step:
        return f"the checkpoint is at step {step}, past its own run's train.steps ({old.train.steps})"
    if new.train.steps <= step:
        return f"train.steps is {new.train.steps}, not beyond the checkpoint's step {step}: nothing to train"
    fa, fb = lr_schedule(old.optim, old.train.steps), lr_schedule(new.optim, new.train.steps)
    # Update k + 1 uses factor k; the checkpoint's AdamW holds the lr of the next update, factor `step`, so that one
    # must agree too.
    for s in range(step + 1):
        if fa(s) != fb(s):
            return (f"the learning rate of step {s} differs ({fa(s):.6g} x optim.lr there, {fb(s):.6g} here): the "
                    f"two schedules part by step {step}; branch from an earlier checkpoint")
    return None


def branch(source: str | Path, cfg: RunConfig, run_dir: str | Path, state: dict | None = None) -> int:
    """Make run_dir (absent or empty) a run of cfg at the step of the checkpoint `source` (a ckpt-*.pt file, or a run
    folder for its newest); returns that step. ValueError (one line, saying why) where cfg would not have reached
    that checkpoint's state (branch_mismatch). state: the file's contents, where the caller has loaded them."""
    path, state = (Path(source), state) if state is not None else resolve_checkpoint(source)
    step = int(state["step"])
    old = RunConfig.from_dict(state["config"])
    why = branch_mismatch(old, cfg, step)
    if why:
        raise ValueError(f"cannot branch from {path}: {why}")
    cfg = replace(cfg, data=replace(cfg.data, vae_fingerprint=old.data.vae_fingerprint))  # the run's pin
    run_dir = Path(run_dir)
    with run_lock(run_dir):  # one writer: a second branch (or a run) into the same folder is refused
        if any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise FileExistsError(f"{run_dir} is not empty; branch into a new folder")
        every = cfg.train.sample_every
        grids = [g for g in sorted((path.parent / "samples").glob("step-*.png"))  # the grids it would have drawn
                 if every > 0 and int(g.stem[5:]) <= step and int(g.stem[5:]) % every == 0]
        config, metrics, target, pointer = (run_dir / n for n in ("config.yaml", "metrics.jsonl",
                                                                   checkpoint_name(step), LAST_POINTER))
        try:
            atomic_write(config, lambda tmp: Path(tmp).write_text(cfg.to_yaml()))
            lines = _lines_up_to(path.parent / "metrics.jsonl", step, cfg)
            atomic_write(metrics, lambda tmp: Path(tmp).write_text("".join(lines)))
            for g in grids:
                (run_dir / "samples").mkdir(exist_ok=True)
                atomic_write(run_dir / "samples" / g.name, lambda tmp, g=g: shutil.copyfile(g, tmp))
            atomic_write(target, lambda tmp: shutil.copyfile(path, tmp))  # then the pointer: resumable when whole
            atomic_write(pointer, lambda tmp: Path(tmp).write_text(target.name + "\n"))
        except BaseException:  # nothing half-made is left: the folder is as empty as it was
            for f in (config, metrics, target, pointer):
                f.unlink(missing_ok=True)
            shutil.rmtree(run_dir / "samples", ignore_errors=True)
            raise
    return step


def _lines_up_to(metrics: Path, step: int, cfg: RunConfig) -> list[str]:
    """The source run's metrics lines up to `step` that a run of cfg would have written: training lines at multiples
    of log_every, evaluation lines at multiples of eval_every (the values are the same: the states are)."""
    if not metrics.is_file():
        return []
    t, out = cfg.train, []
    for line in metrics.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        s = int(row["step"])
        every = t.eval_every if any(k.startswith("eval_") for k in row) else t.log_every
        if s <= step and every > 0 and s % every == 0:
            out.append(line if line.endswith("\n") else line + "\n")
    return out
