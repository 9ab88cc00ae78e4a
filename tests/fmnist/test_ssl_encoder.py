"""The embedded self-supervised fmnist-ssl encoder (rrepa.fmnist.encoder): training without labels, the cached
file, the linear probe, `rrepa encoder train`."""

import argparse
import json
import math

import pytest
import torch

from helpers import NEEDS_FMNIST
from rrepa.align.encoders import build_encoder
from rrepa.cli.encoder import register
from rrepa.data.datasets import DataConfig, TensorImageDataset, build_dataset
from rrepa.eval.linear import linear_probe as fit_probe
from rrepa.fmnist.dataset import find_fashion_mnist
from rrepa.fmnist.encoder import (
    EmbeddedEncoder,
    SSLBackbone,
    SSLConfig,
    SSLTrainConfig,
    linear_probe,
    load_embedded,
    pixel_probe,
    save_embedded,
    train_ssl_encoder,
)

torch.set_num_threads(1)


class NoLabels(torch.utils.data.Dataset):
    """Images only: any access to labels raises."""

    def __init__(self, images):
        self._images = images

    def __len__(self):
        return len(self._images)

    def uint8(self, i):
        return self._images[i]

    def __getitem__(self, i):
        raise AssertionError("the SSL trainer read an (image, label) pair")

    def label(self, i):
        raise AssertionError("the SSL trainer read a label")

    @property
    def targets(self):
        raise AssertionError("the SSL trainer read the labels")


SMALL = SSLConfig(widths=(8, 16), dim=16)


def toy_images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)


def test_ssl_training_changes_weights_and_never_reads_labels():
    cfg = SSLTrainConfig(steps=3, batch_size=16, max_images=48, seed=3)
    torch.manual_seed(cfg.seed)
    init = SSLBackbone(SMALL).state_dict()
    backbone, info = train_ssl_encoder(NoLabels(toy_images()), cfg, SMALL, progress=False, log=lambda s: None)
    trained = backbone.state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init if trained[k].is_floating_point())
    assert info["steps"] == 3 and info["images"] == 48 and math.isfinite(info["final_loss"])
    enc = EmbeddedEncoder(backbone)
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    assert enc(x).shape == (5, 49, 16) and enc.grid((28, 28)) == (7, 7)
    assert enc(torch.rand(2, 3, 56, 56) * 2 - 1).shape == (2, 49, 16)  # RGB -> gray, resized to 28


def test_embedded_save_load_identity_and_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    backbone = SSLBackbone(SMALL).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    enc = EmbeddedEncoder(backbone, info={"probe_test_accuracy": 0.5})
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path))
    path = tmp_path / "encoders" / "fmnist-ssl.safetensors"
    with pytest.raises(FileNotFoundError, match=f"fmnist-ssl weights {path} do not exist.*rrepa encoder train"):
        build_encoder("fmnist-ssl", path)
    save_embedded(path, backbone, enc.info)
    loaded = build_encoder("fmnist-ssl", path)  # a retrained file, picked explicitly
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert torch.equal(loaded(x), enc(x))
    assert loaded.fingerprint == enc.fingerprint and loaded.info == {"probe_test_accuracy": 0.5}
    assert load_embedded(path).name == "fmnist-ssl"
    with pytest.raises(ValueError, match="28 x 28"):
        build_encoder("fmnist-ssl", image_size=224)


def test_linear_probe_separates_easy_classes():
    n = 40
    y = torch.arange(n) % 2
    imgs = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    imgs[y == 1, :, ::2, ::2] = 255  # class 1: a dotted pattern; class 0: black
    imgs = (imgs.int() + torch.randint(0, 30, imgs.shape)).clamp(0, 255).to(torch.uint8)
    train = TensorImageDataset(imgs[:30], y[:30], num_classes=2)
    test = TensorImageDataset(imgs[30:], y[30:], num_classes=2)
    torch.manual_seed(0)
    result = linear_probe(EmbeddedEncoder(SSLBackbone(SMALL)), train, test)
    assert result["probe_test_accuracy"] == 1.0 and result["probe_train_images"] == 30


def test_pixel_probe_is_the_probe_of_the_flattened_pixels():
    """pixel_probe = rrepa.eval.linear's probe of (N, 784) pixels in [-1, 1], here on classes that only the position
    of one bright pixel (left or right of the centre) tells apart."""
    n = 60
    y = torch.arange(n) % 2
    imgs = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    bright = torch.randint(150, 256, (n,), dtype=torch.uint8)
    imgs[y == 0, 0, 14, 4] = bright[y == 0]
    imgs[y == 1, 0, 14, 23] = bright[y == 1]
    train = TensorImageDataset(imgs[:40], y[:40], num_classes=2)
    test = TensorImageDataset(imgs[40:], y[40:], num_classes=2)
    r = pixel_probe(train, test, max_train=30)
    pixels = imgs.float() / 127.5 - 1
    ref = fit_probe(pixels[:30].flatten(1), y[:30], pixels[40:].flatten(1), y[40:], 2)
    assert r["probe_test_accuracy"] == round(ref["test_acc"], 4) == 1.0
    assert (r["probe_train_images"], r["probe_test_images"], r["probe_l2"]) == (30, 20, ref["l2"])


def _have_fashion_mnist() -> bool:
    try:
        find_fashion_mnist(None)
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _have_fashion_mnist(), reason=NEEDS_FMNIST)
def test_cli_encoder_train(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "enc.safetensors"
    args = parser.parse_args(["encoder", "train", "--steps", "2", "--batch-size", "8", "--max-images", "32",
                              "--no-probe", "--out", str(out), "--device", "cpu", "--crop-min", "0.3", "--cutout",
                              "0.5", "--temperature", "0.3", "--widths", "8", "16", "--convs-per-stage", "2",
                              "--dim", "24"])
    args.func(args)
    assert out.is_file() and "wrote" in capsys.readouterr().out
    info = load_embedded(out).info
    assert info["steps"] == 2
    assert {k: info["train_config"][k] for k in ("crop_min", "cutout", "temperature")} == \
        {"crop_min": 0.3, "cutout": 0.5, "temperature": 0.3}
    enc = build_encoder("fmnist-ssl", weights=str(out))  # the architecture travels with the weights
    assert enc.dim == 24 and enc(torch.zeros(2, 3, 28, 28)).shape == (2, 49, 24)
    with pytest.raises(ValueError, match="--overwrite"):
        args.func(args)


@pytest.mark.skipif(not _have_fashion_mnist(), reason=NEEDS_FMNIST)
@pytest.mark.parametrize("random", [False, True])
def test_cli_encoder_probe(tmp_path, capsys, random):
    """`rrepa encoder probe` gives the probe `linear_probe` gives, of the file's weights or of random ones."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "enc.safetensors"
    torch.manual_seed(0)
    save_embedded(out, SSLBackbone(SMALL), {"steps": 7})
    argv = ["encoder", "probe", str(out), "--probe-max-train", "300", *(["--random", "--seed", "3"] if random else [])]
    args = parser.parse_args(argv)
    args.func(args)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    enc = load_embedded(out)
    if random:
        torch.manual_seed(3)
        enc = EmbeddedEncoder(SSLBackbone(SMALL))
    train, test = (build_dataset(DataConfig(name="fmnist"), s) for s in ("train", "test"))
    ref = linear_probe(enc, train, test, max_train=300)
    assert row["probe_test_accuracy"] == ref["probe_test_accuracy"] and row["probe_train_images"] == 300
    assert row["weights"] == ("random" if random else "trained") and row["architecture"]["widths"] == [8, 16]
    assert row["fingerprint"] == enc.fingerprint[:16]


@pytest.mark.skipif(not _have_fashion_mnist(), reason=NEEDS_FMNIST)
def test_cli_encoder_probe_pixels(capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["encoder", "probe", "--pixels", "--probe-max-train", "200"])
    args.func(args)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train, test = (build_dataset(DataConfig(name="fmnist"), s) for s in ("train", "test"))
    assert row["weights"] == "pixels" and row["probe_test_accuracy"] == \
        pixel_probe(train, test, max_train=200)["probe_test_accuracy"]
    with pytest.raises(ValueError, match="--pixels"):
        args = parser.parse_args(["encoder", "probe"])
        args.func(args)


def test_cli_encoder_train_and_probe_on_the_cluttered_variant(data, tmp_path, monkeypatch, capsys):
    """--data fmnist-clutter trains on the 32 px canvases (an 8 x 8 grid from two stages) into its own default file,
    not the cache's fmnist-ssl, and `encoder probe --data fmnist-clutter --pixels` probes those canvases."""
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    variant = ["--data", "fmnist-clutter", "--data-dir", str(data)]
    args = parser.parse_args(["encoder", "train", "--steps", "2", "--batch-size", "8", "--no-probe", "--device", "cpu",
                              "--widths", "8", "16", "--dim", "12", *variant])
    args.func(args)
    out = tmp_path / "encoders" / "fmnist-clutter-ssl.safetensors"
    assert out.is_file() and not (tmp_path / "encoders" / "fmnist-ssl.safetensors").exists()
    enc = load_embedded(out)
    assert enc.image_size == 32 and enc(torch.zeros(2, 1, 32, 32)).shape == (2, 64, 12)
    capsys.readouterr()
    args = parser.parse_args(["encoder", "probe", "--pixels", *variant])
    args.func(args)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train, test = (build_dataset(DataConfig(name="fmnist-clutter", path=str(data), image_size=32), s)
                   for s in ("train", "test"))
    assert row["probe_test_images"] == len(test) and row["probe_test_accuracy"] == \
        pixel_probe(train, test)["probe_test_accuracy"]
