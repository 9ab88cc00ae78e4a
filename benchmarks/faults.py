"""Faults and bad input of issue #33, driven through the `rrepa` command as a new user meets them: each case runs
in its own temporary folder (a tiny run trained once on Fashion-MNIST-shaped random IDX files), bounded in time,
and the script prints a Markdown table (case, expected, got, ok). Faults that a command line cannot provoke (a
model that diverges on some samples, a full disk, an immutable pointer) are injected by a few lines run before
the command in the same process (`prelude`).

    python benchmarks/faults.py [--timeout 120]

Offline, one thread per process, its own cache folder: it touches nothing outside its temporary folder.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rrepa.flow.testing import write_fake_fmnist

TINY = ["train.precision=fp32", "model.patch_size=7", "model.width=32", "model.head_dim=16", "model.num_blocks=2",
        "model.layers_per_block=1", "optim.batch_size=8", "optim.warmup_steps=2", "optim.lr=1e-3",
        "train.log_every=1", "train.sample_every=0", "train.ckpt_every=3", "train.sample_rows=1",
        "train.num_workers=0", "train.eval_batch_size=16"]

# A model that diverges on every sample whose first prior value is positive (about half of them): rrepa.flow.testing.
DIVERGING = "from rrepa.flow.testing import diverge_where_first_prior_positive\ndiverge_where_first_prior_positive()\n"


def failing_write(name: str, code: str) -> str:
    """A prelude under which every atomic write of a checkpoint file whose name starts with `name` fails."""
    return f"""
import errno, os
from pathlib import Path
from rrepa.flow import checkpoint
_write = checkpoint.atomic_write
def failing(path, write):
    if Path(path).name.startswith({name!r}):
        raise OSError(errno.{code}, os.strerror(errno.{code}), str(path))
    _write(path, write)
checkpoint.atomic_write = failing
"""


@dataclass
class Case:
    name: str  # what is tried, with the item number
    expected: str  # what should happen, in words
    argv: list[str]  # `rrepa ARGV`, with {root}, {run}, {data} filled in
    check: Callable[[int, str, Path], bool]  # (exit code, output, case folder) -> behaved as expected
    prelude: str = ""  # python run before the command, in its process
    setup: Callable[[Path], None] = field(default=lambda folder: None)  # prepares the case folder


def rrepa(argv: list[str], cwd: Path, env: dict, timeout: float, prelude: str = "") -> tuple[int, str]:
    script = prelude + "\nfrom rrepa import cli\ncli.main()\n"
    try:
        done = subprocess.run([sys.executable, "-c", script, *argv], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:g} s"
    return done.returncode, done.stdout + done.stderr


def error_line(out: str) -> str:
    """The one `rrepa ...: error:` line (or warning), else the last line, shortened for the table."""
    lines = [line for line in out.splitlines() if re.match(r"rrepa [\w ]+: error:|warning:", line)]
    line = (lines or out.strip().splitlines() or [""])[-1]
    line = re.sub(r"/tmp/[\w./-]*?/(case\d+|shared)/", "", line)  # the temporary folders, for a readable table
    return (line[:150] + "...") if len(line) > 150 else line


def one_error(rc: int, out: str, *parts: str) -> bool:
    """Exit 2 with a single error line holding every part, and no traceback."""
    lines = [line for line in out.splitlines() if ": error:" in line]
    return rc == 2 and len(lines) == 1 and "Traceback" not in out and all(p in lines[0] for p in parts)


def cases(run: Path, data: Path) -> list[Case]:
    conf = ["--config", "{root}/tiny.yaml"]
    return [
        Case("1. a batch diverges while sampling", "finite samples written, diverged ones reported by index, exit 0",
             ["sample", "--ckpt", str(run), "--num-samples", "8", "--batch-size", "2", "--format", "npz", "--out",
              "{root}/s"],
             lambda rc, out, f: rc == 0 and "samples diverged" in out and "sample 1 (class 1)" in out
             and (f / "s.npz").is_file() and "data pipeline" not in out, prelude=DIVERGING),
        Case("1. every sample diverges", "an error, nothing written",
             ["sample", "--ckpt", str(run), "--num-samples", "1", "--seed", "3", "--out", "{root}/s"],
             lambda rc, out, f: one_error(rc, out, "nothing was written") and not list(f.glob("s.*")),
             prelude=DIVERGING),
        Case("1. sample --guidance nan", "refused by the option parser",
             ["sample", "--ckpt", str(run), "--guidance", "nan"],
             lambda rc, out, f: rc == 2 and "expected a finite number" in out),
        Case("2. a mistyped pinned evaluator", "an error naming the file, no evaluator trained",
             ["train", *conf, "--out", "{root}/run", "--set", "train.eval_every=2",
              "--set", "train.eval_weights=/no/such.safetensors"],
             lambda rc, out, f: one_error(rc, out, "/no/such.safetensors does not exist") and not (f / "run").exists()),
        Case("3. a diverged training", "an error, exit 2, no final weights",
             ["train", *conf, "--out", "{root}/run", "--set", "train.steps=20"],
             lambda rc, out, f: one_error(rc, out, "training diverged")
             and not (f / "run" / "ema.safetensors").exists(),
             prelude="""
from rrepa.training.objective import Objective
_forward = Objective.forward
def inf_loss(self, *args, **kwargs):
    loss, logs = _forward(self, *args, **kwargs)
    return loss * float("inf"), logs
Objective.forward = inf_loss
"""),
        Case("4. full disk before the first checkpoint", "says to start again with --overwrite, not --resume",
             ["train", *conf, "--out", "{root}/run"],
             lambda rc, out, f: one_error(rc, out, "nothing to resume", "--overwrite") and "--resume" not in out,
             prelude=failing_write("ckpt-", "ENOSPC")),
        Case("5. an immutable `last` pointer", "names the pointer, the checkpoint is complete",
             ["train", *conf, "--out", "{root}/run"],
             lambda rc, out, f: one_error(rc, out, "checkpoint pointer", "/last: Operation not permitted"),
             prelude=failing_write("last", "EPERM")),
        Case("7. a second sample into the same file", "refused, pointing to --overwrite",
             ["sample", "--ckpt", "{root}/run", "--num-samples", "2", "--format", "npz"],
             lambda rc, out, f: one_error(rc, out, "exists; pass --overwrite")
             and (f / "run" / "samples-seed0.npz").read_bytes() == b"first",
             setup=lambda f: copy_run(run, f / "run", {"samples-seed0.npz": b"first"})),
        Case("7. train --resume of a finished run", "says it is finished",
             ["train", "--resume", "{root}/run"],
             lambda rc, out, f: one_error(rc, out, "is finished"), setup=lambda f: copy_run(run, f / "run")),
        Case("8. an empty --out", "refused", ["train", *conf, "--out", "", "--overwrite"],
             lambda rc, out, f: one_error(rc, out, "--out is empty")
             and [p.name for p in f.iterdir()] == ["tiny.yaml"]),
        Case("9. an output under a regular file", "Not a directory, naming the file",
             ["sample", "--ckpt", str(run), "--num-samples", "2", "--out", "{root}/notes.txt/s"],
             lambda rc, out, f: one_error(rc, out, "notes.txt: Not a directory"),
             setup=lambda f: (f / "notes.txt").write_text("a file")),
        Case("10. a folder with 2 of the 4 IDX files", "names the missing ones",
             ["train", "--data-dir", "{root}/part", "--out", "{root}/run"],
             lambda rc, out, f: one_error(rc, out, "holds 2 of Fashion-MNIST's 4 IDX files but not t10k"),
             setup=lambda f: partial_fmnist(data, f / "part")),
        Case("11. evaluate --samples of a text file", "not an npz (no pickle advice)",
             ["evaluate", "--samples", "{root}/s.npz", "--ref", "fmnist:test"],
             lambda rc, out, f: one_error(rc, out, "is not an .npz archive") and "allow_pickle" not in out,
             setup=lambda f: (f / "s.npz").write_text("not samples\n")),
        Case("12. --resume with an empty config.yaml", "says the config is empty",
             ["train", "--resume", "{root}/run"], lambda rc, out, f: one_error(rc, out, "config.yaml is empty"),
             setup=lambda f: copy_run(run, f / "run", {"config.yaml": b""})),
        Case("15. bpd --batch-size 0", "names the option", ["bpd", "--ckpt", str(run), "--batch-size", "0"],
             lambda rc, out, f: one_error(rc, out, "--batch-size >= 1")),
        Case("17. --device tpu", "refused", ["sample", "--ckpt", str(run), "--device", "tpu"],
             lambda rc, out, f: one_error(rc, out, "--device must be auto, cpu, cuda or cuda:N")),
        Case("18. jacobi --sequential-blocks 9 on 2 blocks", "refused",
             ["sample", "--ckpt", str(run), "--sampler", "jacobi", "--sequential-blocks", "9"],
             lambda rc, out, f: one_error(rc, out, "--sequential-blocks must lie in 0..2")),
        Case("18. --weights raw of ema.safetensors", "refused",
             ["bpd", "--ckpt", f"{run}/ema.safetensors", "--weights", "raw"],
             lambda rc, out, f: one_error(rc, out, "holds only the EMA weights")),
        Case("18. train --resume A --out B", "refused", ["train", "--resume", str(run), "--out", "{root}/b"],
             lambda rc, out, f: one_error(rc, out, "would be ignored") and not (f / "b").exists()),
        Case("18. bpd --max-images 0", "refused", ["bpd", "--ckpt", str(run), "--max-images", "0"],
             lambda rc, out, f: one_error(rc, out, "--max-images >= 1")),
        Case("18. vae eval --limit -5", "refused", ["vae", "eval", "--limit", "-5"],
             lambda rc, out, f: one_error(rc, out, "--limit >= 1")),
        Case("19. 32 x 32 x 3 samples against fmnist:test", "refused",
             ["evaluate", "--samples", "{root}/s.npz", "--ref", "fmnist:test"],
             lambda rc, out, f: one_error(rc, out, "the samples are 3 x 32 x 32 images"),
             setup=lambda f: np.savez(f / "s.npz", arr_0=np.zeros((10, 32, 32, 3), np.uint8))),
        Case("20. TARFlow.from_pretrained('/nonexistent')", "a missing path, not a bad repo id",
             [], lambda rc, out, f: rc == 0 and "/nonexistent does not exist" in out,
             prelude="""
from rrepa.flow.tarflow import TARFlow
try:
    TARFlow.from_pretrained("/nonexistent")
except FileNotFoundError as err:
    print(err)
raise SystemExit(0)
"""),
        Case("20. model.sample(0)", "a one-line ValueError", [],
             lambda rc, out, f: rc == 0 and "must be an int >= 1, got 0" in out, prelude="""
from rrepa.flow.config import FlowConfig
from rrepa.flow.tarflow import TARFlow
try:
    TARFlow(FlowConfig(image_height=4, image_width=4, patch_size=2, width=32, head_dim=16, num_blocks=1,
                       layers_per_block=1)).sample(0)
except ValueError as err:
    print(err)
raise SystemExit(0)
"""),
    ]


def copy_run(run: Path, dest: Path, replace: dict[str, bytes] | None = None) -> None:
    dest.mkdir(parents=True)
    for p in run.iterdir():
        if p.is_file():
            (dest / p.name).write_bytes(p.read_bytes())
    for name, content in (replace or {}).items():
        (dest / name).write_bytes(content)


def partial_fmnist(data: Path, dest: Path) -> None:
    dest.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (dest / name).write_bytes((data / name).read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per case at most")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rrepa-faults-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RREPA_OFFLINE": "1",
               "RREPA_CACHE_DIR": str(root / "cache")}
        shared = root / "shared"
        data = write_fake_fmnist(shared / "fmnist")
        (shared / "tiny.yaml").write_text("\n".join(_yaml(TINY + [f"data.path={data}", "train.steps=3"])) + "\n")
        run = shared / "run"
        rc, out = rrepa(["train", "--config", str(shared / "tiny.yaml"), "--out", str(run)], shared, env,
                        args.timeout)
        if rc != 0:
            sys.exit(f"could not train the tiny run: {out[-2000:]}")
        rows = []
        for i, case in enumerate(cases(run, data)):
            folder = root / f"case{i:02d}"
            folder.mkdir()
            (folder / "tiny.yaml").write_text((shared / "tiny.yaml").read_text())
            case.setup(folder)
            argv = [a.format(root=folder) for a in case.argv]
            t0 = time.monotonic()
            rc, out = rrepa(argv, folder, env, args.timeout, case.prelude)
            ok = case.check(rc, out, folder)
            got = f"exit {rc}: {error_line(out)}".replace("|", "\\|")
            rows.append(f"| {case.name} | {case.expected} | {got} | {'yes' if ok else '**NO**'} |")
            print(f"{case.name}: {'ok' if ok else 'NOT OK'} ({time.monotonic() - t0:.1f} s)", file=sys.stderr)
    print("| case | expected | got | ok |\n|---|---|---|---|\n" + "\n".join(rows))
    failed = sum("**NO**" in r for r in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} cases behave as expected")
    sys.exit(1 if failed else 0)


def _yaml(overrides: list[str]) -> list[str]:
    """key=value overrides as a nested YAML config (sections model:, optim:, train:, data:)."""
    sections: dict[str, list[str]] = {}
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        sections.setdefault(section, []).append(f"  {name}: {value}")
    return [line for section, lines in sections.items() for line in (f"{section}:", *lines)]


if __name__ == "__main__":
    main()
