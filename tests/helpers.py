"""What the test modules share: models for the math tests, a fake Fashion-MNIST, the tiny training config, `rrepa`
in a subprocess (pytest puts this folder on sys.path: tests/conftest.py lives here)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rrepa.data.datasets import ImageDataset
from rrepa.flow.testing import random_flow, write_fake_fmnist  # noqa: F401 - the tests import them from here
from rrepa.training.config import resolve

# The GPU variant of a device-parametrised test is marked `cuda` and skipped without a GPU (conftest.py).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Why the tests that need the real Fashion-MNIST are skipped without it (`make test` installs it where it can).
NEEDS_FMNIST = ("needs Fashion-MNIST in /usr/share/datasets/fashion-mnist: run `make data` (Debian, as root) or "
                "`apt-get install dataset-fashion-mnist`")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RREPA_OFFLINE": "1"}


def tiny(data: Path, *extra: str, preset: str = "fmnist"):
    """A 2-block, 1-layer flow over 16 tokens of 7 x 7 pixels, batch 8: a step takes milliseconds. float32 unless
    extra says otherwise: `auto` would be bf16 on some machines and fp32 on others (tests/test_precision.py).
    Another Fashion-MNIST preset shrinks the same way (extra sets a patch that divides its images)."""
    return resolve(preset, overrides=["train.precision=fp32",
        "model.patch_size=7", "model.width=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1",
        "optim.batch_size=8", "optim.warmup_steps=2", "optim.lr=1e-3", "train.steps=6", "train.log_every=1",
        "train.sample_every=3", "train.ckpt_every=3", "train.sample_rows=1", "train.num_workers=0",
        "train.eval_batch_size=16", f"data.path={data}", *extra])


def assert_same_state(a_path: Path, b_path: Path) -> None:
    """Two checkpoints hold the same training state, bit for bit: weights, EMA weights and AdamW's moments."""
    from rrepa.flow.checkpoint import load_checkpoint

    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name} differs"
    for s1, s2 in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])


def rows(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


def rrepa(*args: str, env=None, script: str = "from rrepa import cli; cli.main()") -> subprocess.Popen:
    """`rrepa ARGS` (or another script given ARGS) in a fresh process."""
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env or ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(p: subprocess.Popen, rc: int = 0) -> str:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == rc, out[-3000:]
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (Linux /proc), also those in sessions of their own, which a killpg
    misses: torchrun's workers, left behind by a test that timed out."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def killer(method: str) -> str:
    """A `rrepa` CLI script that SIGKILLs itself inside the KILL_AT_CALL-th call of TARFlow.<method>."""
    return f"""
import os, signal, sys
from rrepa import cli
from rrepa.flow.tarflow import TARFlow
original, calls = TARFlow.{method}, [0]
def killing(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_CALL"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
TARFlow.{method} = killing
cli.main(sys.argv[1:])
"""


def sgd(groups, lr, betas=None, fused=None):
    """Stands in for torch.optim.AdamW in the DDP test: an update linear in the gradient."""
    return torch.optim.SGD(groups, lr=lr)


def check_item(ds: ImageDataset, i: int) -> None:
    x, y = ds[i]
    assert x.dtype == torch.float32 and x.shape == (ds.channels, ds.image_size, ds.image_size)
    assert x.min() >= -1 and x.max() <= 1
    assert y.dtype == torch.int64 and y.ndim == 0 and 0 <= int(y) < ds.num_classes
