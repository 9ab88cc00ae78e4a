"""`rrepa sample` (ADM npz layout, reproducible seeds, process-count independent shards) and `rrepa bpd`."""

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
from rrepa.data.datasets import DataConfig, build_dataset
from rrepa.distributed import Dist
from rrepa.eval.bpd import evaluate_bpd
from rrepa.flow.sample import generate, grid_labels, save_grid
from rrepa.flow.tarflow import TARFlow
from rrepa.flow.testing import diverge_where_first_prior_positive, write_fake_fmnist
from rrepa.training.config import resolve
from rrepa.training.loop import train
from rrepa.training.run import load_run, samples_from_checkpoint
from rrepa.utils import generator


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny model trained for 3 steps on Fashion-MNIST-shaped random IDX files."""
    root = write_fake_fmnist(tmp_path_factory.mktemp("sample"), n_train=32, n_test=24)
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


# A model that diverges on some samples (rrepa.flow.testing), in this process and in a script under torchrun.
POISON = "from rrepa.flow.testing import diverge_where_first_prior_positive\ndiverge_where_first_prior_positive()\n"


def sample_cli(capsys, *argv: str) -> tuple[int, str]:
    code = 0
    try:
        cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_diverged_samples_are_reported_and_the_finite_ones_kept(run, tmp_path, capsys, monkeypatch):
    """Issue #33 item 1: a non-finite batch neither discards the others nor blames the data pipeline; the same
    under torchrun; and every sample diverged is an error that writes nothing."""
    monkeypatch.setattr(TARFlow, "reverse", TARFlow.reverse)  # restored after the test
    diverge_where_first_prior_positive()
    args = ["sample", "--ckpt", str(run), "--num-samples", "8", "--batch-size", "2", "--device", "cpu", "--seed", "0"]
    # the prior noise of the 4 batches, drawn as generate draws it
    whole = torch.cat([torch.randn((2, 1, 28, 28), generator=generator(0, j)) for j in range(4)])
    bad = (whole.flatten(1)[:, 0] > 0).nonzero().flatten().tolist()
    assert 0 < len(bad) < 8  # seed 0 diverges on some samples, not all
    code, err = sample_cli(capsys, *args, "--out", str(tmp_path / "one"))
    assert code == 0 and "Traceback" not in err and "data pipeline" not in err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"{len(bad)} of 8 samples diverged" in warning[0]
    assert f"sample {bad[0]} (class {bad[0] % 10})" in warning[0] and f"{8 - len(bad)} finite samples remain" in err
    one = load_npz(tmp_path / "one.npz")
    keep = [i for i in range(8) if i not in bad]
    assert one["arr_0"].shape[0] == 8 - len(bad) and one["labels"].tolist() == [i % 10 for i in keep]
    assert Image.open(tmp_path / "one.png").size == (10 * 30 + 2, 30 + 2)  # the grid keeps every place
    # `rrepa evaluate --ckpt` draws the same samples and leaves out the same ones.
    said = []
    images, kept_labels = samples_from_checkpoint(str(run), 8, batch_size=2, seed=0, log=said.append)
    assert np.array_equal(images, one["arr_0"]) and np.array_equal(kept_labels, one["labels"])
    assert len(said) == 1 and f"{len(bad)} of 8 samples diverged" in said[0]
    # Under torchrun: the same file.
    script = tmp_path / "poisoned.py"
    script.write_text(POISON + "from rrepa import cli\ncli.main()\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *args, "--format", "npz", "--out", str(tmp_path / "two")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"{len(bad)} of 8 samples diverged" in done.stderr
    two = load_npz(tmp_path / "two.npz")
    assert np.array_equal(two["arr_0"], one["arr_0"]) and np.array_equal(two["labels"], one["labels"])
    # Every sample diverged: an error, nothing written.
    code, err = sample_cli(capsys, *args, "--num-samples", "1", "--seed", "3", "--out", str(tmp_path / "none"))
    assert code == 2 and "1 of 1 samples diverged" in err and "nothing was written" in err
    assert not list(tmp_path.glob("none*"))


@pytest.mark.parametrize("flag", ["--guidance", "--temperature", "--attn-temp"])
def test_non_finite_sampling_options_are_refused(run, capsys, flag):
    code, err = sample_cli(capsys, "sample", "--ckpt", str(run), flag, "nan")
    assert code == 2 and f"argument {flag}: expected a finite number, got 'nan'" in err
    code, err = sample_cli(capsys, "evaluate", "--ckpt", str(run), "--num-samples", "4", "--ref", "fmnist:test",
                           "--guidance", "inf")
    assert code == 2 and "argument --guidance: expected a finite number, got 'inf'" in err


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


@pytest.mark.parametrize("K, cols, first_row", [(0, 8, None), (3, 3, [0, 1, 2]), (10, 10, list(range(10))),
                                                (1000, 10, [0, 111, 222, 333, 444, 555, 666, 777, 888, 999])])
def test_grid_labels_show_at_most_ten_classes(K, cols, first_row):
    """A grid has one column per class up to 10 classes, then 10 classes spread over the labels: ImageNet's 1000
    would make every training grid one batch of rows x 1000 images (a KV cache of ~500 GB at 64 px)."""
    from rrepa.flow.config import FlowConfig

    model = TARFlow(FlowConfig(in_channels=1, image_height=4, image_width=4, patch_size=2, width=32, head_dim=16,
                               num_blocks=1, layers_per_block=1, num_classes=K))
    y, n = grid_labels(model, rows=3)
    assert n == cols
    if first_row is None:
        assert y is None
    else:
        assert y.tolist() == first_row * 3
