"""A grid's records on disk, which the runner writes and the prober and the report read: the evaluation log
(evals.jsonl, one line per cell and step, copied from the cells' metrics.jsonl), the probe logs (probes.jsonl, one
line per cell; reference_probes.jsonl, one line per alignment target and for the raw pixels), the copy of the grid
file (grid.yaml), and each cell's state from its run folder."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from rrepa.experiments.grid import Cell
from rrepa.flow.checkpoint import list_checkpoints, weights_step
from rrepa.utils import atomic_write

EVALS = "evals.jsonl"
PROBE_LOCK = ".probe.lock"  # the prober's own lock: probing may run beside the runner, which holds LOCK_FILE
PROBES = "probes.jsonl"
REFERENCE_PROBES = "reference_probes.jsonl"  # the alignment targets' and the raw pixels' probes
GRID_COPY = "grid.yaml"


# --------------------------------------------------------------------------------------------
# The evaluation log
# --------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> tuple[list[dict], int]:
    """A run's metrics.jsonl: its evaluation lines with their `eval_` prefix removed, and the last step logged (0
    when none). A line still being written (the last one, while the run is alive) is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [], 0
    evals, step = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = max(step, int(row["step"]))
        if "eval_fid" in row:
            evals.append({"step": row["step"], **{k[5:]: v for k, v in row.items() if k.startswith("eval_")}})
    return evals, step


def eval_rows(run_dir: Path) -> list[dict]:
    """The evaluation lines of a run's metrics.jsonl (see read_metrics)."""
    return read_metrics(run_dir)[0]


def append_line(path: Path, row: dict) -> None:
    """Append one JSON line in a single write, on disk before it returns (a kill leaves at most a partial line)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


class EvalLog:
    """results/NAME/evals.jsonl: one line per (arm, seed, step), appended with a single write each."""

    def __init__(self, path: Path):
        self.path = path
        self.keys: set[tuple[str, int, int]] = set()
        if path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            good = []
            for line in lines:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill mid-write
                if line.endswith("\n") and self.key(row) not in self.keys:
                    self.keys.add(self.key(row))
                    good.append(line)
            if good != lines:
                atomic_write(path, lambda tmp: Path(tmp).write_text("".join(good)))

    @staticmethod
    def key(row: dict) -> tuple[str, int, int]:
        return row["arm"], int(row["seed"]), int(row["step"])

    def drop(self, cell: Cell) -> int:
        """Remove the cell's lines (a cell that starts again from step 0: they describe a run that is gone)."""
        rows = read_evals(self.path, missing_ok=True)
        keep = [r for r in rows if (r["arm"], int(r["seed"])) != (cell.arm, cell.seed)]
        if len(keep) < len(rows):
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in keep)))
            self.keys = {self.key(r) for r in keep}
        return len(rows) - len(keep)

    def add(self, cell: Cell, rows: list[dict]) -> int:
        """Append the rows not logged yet; returns how many were new."""
        new = 0
        for row in rows:
            row = {"arm": cell.arm, "seed": cell.seed, **row}
            if self.key(row) in self.keys:
                continue
            append_line(self.path, row)
            self.keys.add(self.key(row))
            new += 1
        return new


def read_evals(path: str | os.PathLike, missing_ok: bool = False) -> list[dict]:
    """The rows of an evals.jsonl (a trailing partial line is ignored); [] for a missing file when missing_ok,
    FileNotFoundError otherwise."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


# --------------------------------------------------------------------------------------------
# A cell's state
# --------------------------------------------------------------------------------------------


def cell_state(cell: Cell, run_dir: Path) -> str:
    """done | resume (has checkpoints) | restart (killed before its first checkpoint) | new."""
    t = cell.cfg.train
    ema = run_dir / "ema.safetensors"
    if ema.is_file() and weights_step(ema) == t.steps and (not t.eval_bpd or (run_dir / "bpd.json").is_file()):
        return "done"
    if list_checkpoints(run_dir):
        return "resume"
    return "restart" if run_dir.exists() and any(run_dir.iterdir()) else "new"
