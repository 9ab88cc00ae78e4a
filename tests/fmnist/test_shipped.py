"""The networks rrepa ships (rrepa.fmnist.shipped): they load, match their recorded hashes and names, and a
missing or damaged file is a one-line error naming the command that trains a replacement."""

import shutil
from pathlib import Path

import pytest
import torch

from rrepa.align.encoders import build_encoder
from rrepa.fmnist import shipped as shipped_mod
from rrepa.fmnist.evaluator import load_evaluator
from rrepa.fmnist.shipped import SHIPPED, resolve_weights, shipped
from rrepa.fmnist.vae import load_vae


def test_the_shipped_networks_load_with_their_recorded_identities():
    ev = load_evaluator()
    assert ev.name == "fmnist-cnn@a46eda2ff3" and ev.test_accuracy == pytest.approx(0.9174)
    enc = build_encoder("fmnist-ssl")
    assert enc(torch.zeros(2, 1, 28, 28)).shape == (2, 49, 128)
    assert enc.info["probe_test_accuracy"] == pytest.approx(0.8298)
    vae = load_vae("fmnist-vae")
    assert vae.fingerprint.startswith("e0900420b4")  # the hash in its folder's name
    for name in SHIPPED:  # each name carries its content hash, and the grids link to these files
        assert shipped(name).name.startswith(f"{name}-")


def test_the_clutter_networks_load_by_name_where_a_weights_file_is_taken():
    """fmnist-clutter's evaluator and encoder (results/fmnist-clutter) by their shipped names: the evaluator's identity
    and the accuracy its card states, the encoder's 8 x 8 tokens of a 32 px canvas; grids link to the same files."""
    ev = load_evaluator("fmnist-clutter-cnn")
    assert ev.name == "fmnist-cnn@618a048268" and ev.test_accuracy == pytest.approx(0.818, abs=5e-4)
    enc = build_encoder("fmnist-ssl", "fmnist-clutter-ssl")
    assert enc(torch.zeros(2, 1, 32, 32)).shape == (2, 64, 128)
    assert resolve_weights("fmnist-clutter-ssl") == shipped("fmnist-clutter-ssl")
    assert resolve_weights("some/file.safetensors") == "some/file.safetensors" and resolve_weights(None) is None
    for link in ("fmnist-clutter-cnn", "fmnist-clutter-ssl"):
        pinned = Path(__file__).parents[2] / "results" / "fmnist-clutter" / "weights" / f"{link}.safetensors"
        assert pinned.resolve() == shipped(link).resolve()


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """The shipped weights copied to a folder the test may damage, standing in for the package's."""
    copy = tmp_path / "weights"
    shutil.copytree(shipped_mod.WEIGHTS, copy)
    monkeypatch.setattr(shipped_mod, "WEIGHTS", copy)
    shipped_mod._sha256.cache_clear()
    yield copy
    shipped_mod._sha256.cache_clear()


@pytest.mark.parametrize("name, retrain", [("fmnist-cnn", "rrepa evaluator train"),
                                           ("fmnist-ssl", "rrepa encoder train"), ("fmnist-vae", "rrepa vae train"),
                                           ("fmnist-clutter-cnn",
                                            "rrepa evaluator train --data fmnist-clutter --epochs 10"),
                                           ("fmnist-clutter-ssl", "rrepa encoder train --data fmnist-clutter")])
@pytest.mark.parametrize("fault", ["missing", "damaged"])
def test_a_missing_or_damaged_file_names_the_retrain_command(package_copy, name, retrain, fault):
    net = SHIPPED[name]
    rel = net.files[-1][0]
    f = package_copy / net.path / rel if rel else package_copy / net.path
    if fault == "missing":
        f.unlink()
        error, what = FileNotFoundError, "is missing from the rrepa package"
    else:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte
        f.write_bytes(bytes(data))
        error, what = ValueError, r"is damaged \(its SHA-256 is not the recorded one\)"
    with pytest.raises(error, match=f"the shipped {name} file .* {what}; reinstall rrepa, or train a replacement "
                                    f"with `{retrain}`"):
        shipped(name)


def test_unknown_names_are_refused():
    with pytest.raises(KeyError, match="ships fmnist-cnn, fmnist-ssl, fmnist-vae"):
        shipped("fmnist-gan")
