"""`rrepa sample` (ADM npz layout, reproducible seeds, process-count independent shards) and `rrepa bpd`."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rrepa import cli
from rrepa.config import resolve
from rrepa.data import DataConfig, build_dataset
from rrepa.distributed import Dist
from rrepa.eval.bpd import evaluate_bpd
from rrepa.run import load_run
from rrepa.sample import generate, save_grid
from rrepa.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny model trained for 3 steps on Fashion-MNIST-shaped random IDX files."""
    root = tmp_path_factory.mktemp("sample")
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("t10k", 24)):
        head = b"\0\0\x08\x03" + np.array([n, 28, 28], ">u4").tobytes()
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(head + rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()))
        head = b"\0\0\x08\x01" + np.array([n], ">u4").tobytes()
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(head + rng.integers(0, 10, n, dtype=np.uint8).tobytes()))
    cfg = resolve("fmnist", overrides=[
        "model.patch_size=7", "model.width=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1",
        "optim.batch_size=8", "train.steps=3", "train.sample_every=0", "train.eval_bpd=false",
        "train.num_workers=0", f"data.path={root}"])
    train(cfg, root / "run", device="cpu")
    return root / "run"


def load_npz(path: Path) -> dict:
    with np.load(path) as f:
        return dict(f)


def test_sample_npz_layout_and_seed(run, tmp_path):
    args = ["sample", "--ckpt", str(run), "--num-samples", "5", "--batch-size", "2", "--guidance", "0.5", "--anneal"]
    cli.main([*args, "--seed", "1", "--out", str(tmp_path / "a")])
    cli.main([*args, "--seed", "1", "--out", str(tmp_path / "b"), "--format", "npz"])
    cli.main([*args, "--seed", "2", "--out", str(tmp_path / "c"), "--format", "npz"])
    a, b, c = (load_npz(tmp_path / f"{k}.npz") for k in "abc")
    assert set(a) == {"arr_0", "labels"}
    assert a["arr_0"].shape == (5, 28, 28, 1) and a["arr_0"].dtype == np.uint8
    assert a["labels"].tolist() == [0, 1, 2, 3, 4] and a["labels"].dtype == np.int64
    assert np.array_equal(a["arr_0"], b["arr_0"]) and not np.array_equal(a["arr_0"], c["arr_0"])
    assert Image.open(tmp_path / "a.png").size == (10 * 30 + 2, 30 + 2)  # one column per class
    assert not (tmp_path / "b.png").exists()
    cli.main(["sample", "--ckpt", str(run / "ema.safetensors"), "--num-samples", "3", "--class", "7", "--no-denoise",
              "--temperature", "0.8", "--attn-temp", "0.9", "--guidance", "1", "--format", "npz",
              "--out", str(tmp_path / "d")])
    assert load_npz(tmp_path / "d.npz")["labels"].tolist() == [7, 7, 7]


def test_shards_do_not_depend_on_the_process_count(run):
    model, _ = load_run(run)
    labels = torch.arange(5) % 10
    whole = generate(model, labels, 5, 2, seed=3, d=Dist(), progress=False)
    shards = {}
    for rank in (0, 1):
        shards.update(generate(model, labels, 5, 2, seed=3, d=Dist(rank=rank, world_size=2), progress=False))
    assert sorted(shards) == [0, 1, 2]
    for j in whole:
        assert torch.equal(whole[j], shards[j])


def test_sample_under_torchrun_matches_one_process(run, tmp_path):
    args = ["sample", "--ckpt", str(run), "--num-samples", "5", "--batch-size", "2", "--format", "npz",
            "--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "rrepa.cli", *args, "--out", str(tmp_path / "two")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    cli.main([*args, "--out", str(tmp_path / "one")])
    two, one = load_npz(tmp_path / "two.npz"), load_npz(tmp_path / "one.npz")
    assert np.array_equal(two["arr_0"], one["arr_0"]) and np.array_equal(two["labels"], one["labels"])


def test_bpd_command(run, capsys, tmp_path):
    cli.main(["bpd", "--ckpt", str(run), "--split", "test", "--batch-size", "10", "--json", str(tmp_path / "b.json")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 24 and result["split"] == "test" and result["step"] == 3
    assert not result["conditional"] and result["protocol"] == "uniform dequantization, null label"  # TARFlow's
    assert json.loads((tmp_path / "b.json").read_text()) == result
    # The same number from the library, whatever the batch size (the noise is tied to the image index).
    model, info = load_run(run)
    dataset = build_dataset(DataConfig(**info["config"]["data"]), "test")
    direct = evaluate_bpd(model, dataset, 24, Dist(), conditional=False, progress=False)
    assert abs(direct["bpd"] - result["bpd"]) < 1e-4
    # A fresh flow is the identity on [-1, 1]: Gaussian NLL of the dequantized pixels, ~ 8.4 bits/dim here.
    assert 5 < result["bpd"] < 12


def test_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["sample", "--ckpt", str(tmp_path / "missing")])
    assert "checkpoint" in capsys.readouterr().err
    (tmp_path / "ckpt-0000001.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        cli.main(["bpd", "--ckpt", str(tmp_path / "ckpt-0000001.pt")])
    err = capsys.readouterr().err.strip()
    assert "ckpt-0000001.pt is corrupt or truncated" in err and "\n" not in err


def test_save_grid(tmp_path):
    save_grid(torch.zeros(7, 3, 4, 4), tmp_path / "g.png", ncol=3)
    im = Image.open(tmp_path / "g.png")
    assert im.size == (3 * 6 + 2, 3 * 6 + 2) and im.mode == "RGB"
