"""rrepa.fmnist.vae and `rrepa vae`: the embedded autoencoder's training (tiny configs, fake IDX data), its latent
scaling, its atomic diffusers-layout folder, training on first use, and the reconstruction metrics."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import rrepa.fmnist.vae as vae_mod
from helpers import write_fake_fmnist
from rrepa.cli import vae as vae_cli
from rrepa.data.cache import dataset_images
from rrepa.data.datasets import DataConfig, TensorImageDataset, build_dataset
from rrepa.data.vae import VAE
from rrepa.fmnist.evaluator import FMNISTCNN, save_evaluator
from rrepa.fmnist.vae import (
    VAEArch,
    VAETrainConfig,
    default_vae_path,
    reconstruction_quality,
    save_vae,
    train_vae,
)
from rrepa.utils import Interrupted, from_uint8, state_fingerprint

TINY_ARCH = VAEArch(block_out_channels=(8, 16, 16), norm_num_groups=4)  # 28 -> 7, as the default
TINY = dict(steps=4, batch_size=8, warmup=1, scale_images=48)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fake_fmnist(tmp_path_factory.mktemp("fmnist"), n_train=48, n_test=24)


@pytest.fixture(scope="module")
def trained(data):
    train_set = build_dataset(DataConfig(name="fmnist", path=str(data)), "train")
    model, info = train_vae(train_set, VAETrainConfig(**TINY), TINY_ARCH, progress=False, log=lambda m: None)
    return train_set, model, info


def test_a_tiny_training_saves_a_folder_that_vae_load_opens(trained, tmp_path):
    train_set, model, info = trained
    path = save_vae(model, tmp_path / "fmnist-vae", info)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                     "rrepa_vae.json"]
    vae = VAE.load(path)
    assert (vae.in_channels, vae.latent_channels, vae.factor) == (1, 4, 4)
    assert vae.latent_shape((28, 28)) == (4, 7, 7)
    assert vae.scaling_factor == pytest.approx(info["scaling_factor"]) and vae.shift_factor == info["shift_factor"]
    assert json.loads((path / "rrepa_vae.json").read_text())["steps"] == 4
    assert not list(tmp_path.glob(".fmnist-vae.tmp-*"))


def test_the_scaling_gives_the_training_latents_mean_0_and_std_1(trained, tmp_path):
    train_set, model, info = trained
    images = dataset_images(train_set)
    vae = VAE.load(save_vae(model, tmp_path / "v", info), dtype=torch.float64)
    z = vae.encode(from_uint8(images).double())
    assert info["latent_std"] != pytest.approx(1, abs=0.05)  # the scaling does something here
    assert float(z.mean()) == pytest.approx(0, abs=1e-5) and float(z.std()) == pytest.approx(1, abs=1e-5)
    with torch.no_grad():  # the same, from diffusers' posterior mean directly
        m = vae.model.encode(from_uint8(images).double()).latent_dist.mean
    assert info["shift_factor"] == pytest.approx(float(m.mean()), abs=1e-5)
    assert info["scaling_factor"] == pytest.approx(1 / float(m.std()), rel=1e-5)


def test_a_failing_save_leaves_no_folder_and_keeps_an_old_one(trained, tmp_path, monkeypatch):
    _, model, info = trained
    path = tmp_path / "out"

    def failing(self, folder, **kw):
        (folder / "config.json").write_text("{}")  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", failing)
    with pytest.raises(OSError, match="No space left") as e:
        save_vae(model, path, info)
    assert e.value.filename == str(path) and not path.exists() and os.listdir(tmp_path) == []
    monkeypatch.undo()
    save_vae(model, path, {"first": 1})

    def interrupted(self, folder, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_vae(model, path, {"second": 2})
    assert json.loads((path / "rrepa_vae.json").read_text()) == {"first": 1} and os.listdir(tmp_path) == ["out"]


def test_an_interrupted_training_continues_to_the_same_weights(data, tmp_path, monkeypatch):
    train_set = build_dataset(DataConfig(name="fmnist", path=str(data)), "train")
    cfg = VAETrainConfig(**{**TINY, "steps": 6})
    ref, _ = train_vae(train_set, cfg, TINY_ARCH, progress=False, log=lambda m: None)
    state = tmp_path / "v.partial.pt"
    calls, mse = [0], F.mse_loss

    def signalling(*args, **kwargs):  # Ctrl-C inside the 3rd step's loss
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return mse(*args, **kwargs)

    monkeypatch.setattr(F, "mse_loss", signalling)
    with pytest.raises(Interrupted, match=r"at step 3 of 6; its progress is saved in .*v\.partial\.pt") as e:
        train_vae(train_set, cfg, TINY_ARCH, progress=False, log=lambda m: None, state_file=state)
    assert e.value.exit_code == 130 and state.is_file()
    monkeypatch.undo()
    logs = []
    model, info = train_vae(train_set, cfg, TINY_ARCH, progress=False, log=logs.append, state_file=state)
    assert any("continuing the VAE's training from step 3 of 6" in m for m in logs)
    assert state_fingerprint(model) == state_fingerprint(ref)
    logs.clear()
    train_vae(train_set, VAETrainConfig(**{**TINY, "steps": 6, "seed": 1}), TINY_ARCH, progress=False,
              log=logs.append, state_file=state)
    assert any("other settings" in m for m in logs)


def test_fmnist_vae_by_name_is_the_shipped_one(tmp_path, monkeypatch):
    """data.vae=fmnist-vae loads the autoencoder rrepa ships (#30): nothing is trained on first use, and its
    fingerprint is the one results/fmnist-latent was trained with."""
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(vae_mod, "train_vae", lambda *a, **kw: pytest.fail("a VAE was trained"))
    vae = vae_mod.load_vae("fmnist-vae")
    assert vae.fingerprint.startswith("e0900420b4") and vae.latent_shape((28, 28)) == (4, 7, 7)
    assert not default_vae_path().exists()  # the cache, where `rrepa vae train` writes, is untouched


class ShiftVAE:
    """encode = identity, decode = + `levels` pixel levels: the MSE is known exactly."""

    def __init__(self, levels: int):
        self.levels = levels

    def encode(self, x, batch_size=64):
        return x

    def decode(self, z, batch_size=64):
        return z + self.levels / 127.5


def test_reconstruction_quality_is_the_psnr_of_one_mse_over_all_pixels(trained):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 253, (10, 1, 28, 28), dtype=torch.uint8, generator=g)  # + 3 levels stays <= 255
    ds = TensorImageDataset(images, torch.zeros(10), num_classes=10)
    assert reconstruction_quality(ShiftVAE(0), ds) == {"psnr": math.inf, "mse": 0.0, "images": 10}
    q = reconstruction_quality(ShiftVAE(3), ds, limit=4)
    assert q["mse"] == pytest.approx(9.0) and q["images"] == 4
    assert q["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / 9))
    _, model, _ = trained  # a real VAE: the same MSE as computed by hand
    vae = VAE(model)
    x_hat = ((vae.decode(vae.encode(from_uint8(images))) + 1) * 127.5).round().clamp(0, 255)
    assert reconstruction_quality(vae, ds, batch_size=3)["mse"] == pytest.approx(
        float(((x_hat.double() - images.double()) ** 2).mean()), rel=1e-9)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rrepa")
    vae_cli.register(p.add_subparsers(dest="command", required=True))
    return p


def test_the_cli_registers_train_and_eval(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["vae", "train", "--help"])
    text = capsys.readouterr().out
    assert all(f in text for f in ("--out", "--steps", "--batch-size", "--lr", "--seed", "--data-dir", "--device"))
    args = parser().parse_args(["vae", "train"])
    assert (args.steps, args.batch_size, args.lr, args.loss) == (3000, 64, 3e-3, "l2")
    assert parser().parse_args(["vae", "eval"]).vae == "fmnist-vae"


def test_the_cli_trains_saves_and_evaluates(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "vae"
    argv = ["vae", "train", "--out", str(out), "--steps", "2", "--batch-size", "4", "--max-images", "16",
            "--data-dir", str(data), "--device", "cpu"]
    args = parser().parse_args(argv)
    args.func(args)
    text = capsys.readouterr().out
    assert "test reconstruction PSNR" in text and f"wrote {out}" in text and VAE.load(out).factor == 4
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        args.func(args)
    save_evaluator(FMNISTCNN(), {}, tmp_path / "ev.safetensors")  # random weights: the FID's plumbing only
    args = parser().parse_args(["vae", "eval", "--vae", str(out), "--fid-images", "12", "--evaluator-weights",
                                str(tmp_path / "ev.safetensors"), "--data-dir", str(data), "--device", "cpu"])
    args.func(args)
    text = capsys.readouterr().out
    assert "test reconstruction PSNR" in text and "24 images" in text
    assert "FID of 12 test reconstructions against the test split" in text
