"""Tests for rrepa.fmnist.evaluator (the embedded Fashion-MNIST CNN) and `rrepa evaluate` on top of it. CPU, offline;
the classifier is trained on a small subset for one epoch."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import NEEDS_FMNIST
from rrepa.cli.evaluate import register
from rrepa.eval.npz import write_samples_npz
from rrepa.eval.reference import ReferenceStats
from rrepa.eval.samples import evaluate_samples
from rrepa.fmnist import evaluator as ev_mod
from rrepa.fmnist.dataset import find_fashion_mnist, load_fashion_mnist
from rrepa.fmnist.evaluator import (
    FMNISTEvaluator,
    default_evaluator_path,
    load_evaluator,
    load_evaluator_file,
    save_evaluator,
    train_evaluator,
)
from rrepa.training.evaluation import evaluate_in_training
from rrepa.training.run import samples_from_checkpoint
from rrepa.utils import Interrupted

torch.set_num_threads(1)
SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason=NEEDS_FMNIST)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RREPA_OFFLINE", "1")
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(weights path, info): one epoch on 3000 training images, tested on 1000 test images."""
    model, info = train_evaluator(epochs=1, batch_size=64, max_train=3000, max_test=1000, seed=0)
    path = save_evaluator(model, info, tmp_path_factory.mktemp("ev") / "tiny.safetensors")
    return path, info


@pytest.fixture(scope="module")
def fmnist_test():
    x, y = load_fashion_mnist(find_fashion_mnist(None), "test")
    return x[:400], y[:400]


def test_tiny_training_learns(tiny):
    _, info = tiny
    assert info["test_accuracy"] > 0.5  # chance is 0.1
    assert info["train_images"] == 3000 and info["test_images"] == 1000 and info["train_seconds"] > 0


def test_features_shapes_and_name(tiny, fmnist_test):
    ev = load_evaluator_file(tiny[0])
    assert re.fullmatch(r"fmnist-cnn@[0-9a-f]{10}", ev.name)
    assert ev.test_accuracy == pytest.approx(tiny[1]["test_accuracy"])
    x, y = fmnist_test
    feats = ev.extract(x[:50])
    assert feats["pool"].shape == (50, 128) and feats["pool"].dtype == np.float32
    assert feats["probs"].shape == (50, 10) and np.allclose(feats["probs"].sum(1), 1)
    assert (feats["pool"] >= 0).all()  # after the ReLU
    # ADM layout (N, H, W, C) gives the same; RGB copies and other sizes are accepted
    nhwc = x[:50].permute(0, 2, 3, 1).numpy()
    assert np.allclose(ev.extract(nhwc)["pool"], feats["pool"])
    rgb = x[:5].repeat(1, 3, 1, 1)
    assert np.allclose(ev.extract(rgb)["pool"], feats["pool"][:5], atol=1e-4)
    big = torch.nn.functional.interpolate(x[:5].float(), size=56).round().to(torch.uint8)
    assert ev.extract(big)["pool"].shape == (5, 128)
    assert (ev.predict(x) == y.numpy()).mean() > 0.5
    with pytest.raises(ValueError, match="uint8"):
        ev.extract(x[:2].float())


def test_save_load_same_hash_and_outputs(tiny, tmp_path, fmnist_test):
    a = load_evaluator_file(tiny[0])
    b = load_evaluator_file(save_evaluator(a.model, a.info, tmp_path / "copy.safetensors"))
    assert a.name == b.name
    x = fmnist_test[0][:20]
    assert np.array_equal(a.extract(x)["pool"], b.extract(x)["pool"])
    other = FMNISTEvaluator(ev_mod.FMNISTCNN())
    assert other.name != a.name


def test_the_default_evaluator_is_the_shipped_one_and_nothing_is_trained(monkeypatch, tmp_path):
    """No evaluator is trained on first use (#30): the default is the shipped fmnist-cnn, the network the README's
    and results/' FIDs name; a pinned path that is missing is an error naming it (#33 item 2)."""
    monkeypatch.setattr(ev_mod, "train_evaluator", lambda **kw: pytest.fail("an evaluator was trained"))
    ev = load_evaluator()
    assert ev.name == "fmnist-cnn@a46eda2ff3" and ev.test_accuracy == pytest.approx(0.9174)
    assert not default_evaluator_path().exists()  # the cache, where `rrepa evaluator train` writes, is untouched
    with pytest.raises(FileNotFoundError, match=f"evaluator weights {tmp_path / 'no' / 'such.safetensors'} do not "
                                                f"exist.*rrepa evaluator train --out"):
        load_evaluator(tmp_path / "no" / "such.safetensors", log=lambda m: None)
    assert not (tmp_path / "no").exists()


def signal_at_step(monkeypatch, step: int) -> None:
    """SIGINT to this process inside the training's `step`-th loss computation, as Ctrl-C would arrive."""
    calls, cross_entropy = [0], torch.nn.functional.cross_entropy

    def signalling(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return cross_entropy(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", signalling)


def test_an_interrupted_training_continues_to_the_same_weights(tmp_path, monkeypatch):
    kw = dict(epochs=2, batch_size=128, max_train=640, max_test=200, seed=0, save_every=3)  # 2 x 5 steps
    ref, _ = train_evaluator(**kw)
    state = tmp_path / "ev.partial.pt"
    signal_at_step(monkeypatch, 4)
    with pytest.raises(Interrupted, match=f"at step 4 of 10; its progress is saved in {re.escape(str(state))}") as e:
        train_evaluator(state_file=state, **kw)
    assert e.value.exit_code == 130 and state.is_file()
    monkeypatch.undo()
    logs = []
    model, info = train_evaluator(state_file=state, log=logs.append, **kw)
    assert any("continuing the evaluator's training from step 4 of 10" in m for m in logs)
    assert ev_mod.weights_hash(model.state_dict()) == ev_mod.weights_hash(ref.state_dict())  # the same evaluator
    logs.clear()
    train_evaluator(state_file=state, log=logs.append, **{**kw, "seed": 1})  # other settings: from the start
    assert any("other settings" in m for m in logs)


def test_evaluate_starts_at_once_and_an_interrupted_retraining_stops_cleanly(fmnist_test, tmp_path, monkeypatch,
                                                                             capsys):
    """`rrepa evaluate` on a fresh machine measures with the shipped evaluator at once; `rrepa evaluator train`,
    interrupted, keeps its progress and says how to continue."""
    from rrepa import cli

    x, y = fmnist_test
    write_samples_npz(tmp_path / "samples.npz", x[:20], y[:20])
    monkeypatch.setattr(ev_mod, "train_evaluator", lambda **kw: pytest.fail("an evaluator was trained"))
    cli.main(["evaluate", "--samples", str(tmp_path / "samples.npz"), "--ref", "fmnist:test", "--device", "cpu"])
    assert "fmnist-cnn@a46eda2ff3" in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path / "cache"))
    signal_at_step(monkeypatch, 2)
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluator", "train"])
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err and "training the evaluator:" in err  # the progress bar
    assert re.fullmatch(r"interrupted the evaluator's training at step 2 of 1407; its progress is saved in \S+"
                        r"fmnist-cnn\.safetensors\.partial\.pt: run the same command again to continue",
                        err.strip().splitlines()[-1])
    assert ev_mod.partial_path(default_evaluator_path()).is_file() and not default_evaluator_path().exists()
    assert not (default_evaluator_path().parent / ".lock").exists()


def test_bad_weights_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_evaluator_file(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        load_evaluator_file(tmp_path / "none.safetensors")


def _parser():
    parser = argparse.ArgumentParser(prog="rrepa")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return parser


def test_cli_evaluate_fmnist(tiny, fmnist_test, tmp_path, capsys):
    x, y = fmnist_test
    write_samples_npz(tmp_path / "samples.npz", x[:200], y[:200])
    write_samples_npz(tmp_path / "ref.npz", x[200:400])
    out = tmp_path / "res.json"
    args = _parser().parse_args(["evaluate", "--samples", str(tmp_path / "samples.npz"), "--ref",
                                 str(tmp_path / "ref.npz"), "--features", "fmnist", "--evaluator-weights",
                                 str(tiny[0]), "--out", str(out), "--device", "cpu"])
    args.func(args)
    table = capsys.readouterr().out
    assert "| FID |" in table and "| class accuracy |" in table and "| sFID | n/a |" in table
    res = json.loads(out.read_text())
    ev = load_evaluator_file(tiny[0])
    assert res["feature_network"] == ev.name and res["sfid"] is None
    assert res["fid"] > 0 and 0 < res["precision"] <= 1 and 0 < res["recall"] <= 1 and res["is"] > 1
    assert res["class_accuracy"] == pytest.approx((ev.predict(x[:200]) == y[:200].numpy()).mean())
    assert res["num_samples"] == 200 and res["num_ref"] == 200


def test_fid_of_dataset_with_itself_is_zero(tiny, fmnist_test):
    ev = load_evaluator_file(tiny[0])
    x = fmnist_test[0][:300]
    res = evaluate_samples(x, ev, ReferenceStats.from_features(ev.extract(x), ev.name))
    assert abs(res["fid"]) < 1e-6 and res["precision"] == 1.0 and res["recall"] == 1.0


def test_evaluate_in_training(tiny, fmnist_test):
    ev = load_evaluator_file(tiny[0])
    x, y = fmnist_test
    ref = ReferenceStats.from_features(ev.extract(x[:300]), ev.name)
    pos = [0]

    def sampler(m):  # the flow's output: floats in [-1, 1], plus the labels they were drawn for
        lo, pos[0] = pos[0], pos[0] + m
        return x[lo:lo + m].float() / 127.5 - 1, y[lo:lo + m]

    res = evaluate_in_training(sampler, ev, ref, 120, batch_size=50)
    assert res["num_samples"] == 120 and res["feature_network"] == ev.name
    assert np.isfinite(res["fid"]) and res["class_accuracy"] > 0.5 and res["eval_seconds"] >= 0


def test_cli_errors(tiny, tmp_path):
    parser = _parser()
    args = parser.parse_args(["evaluate", "--ckpt", "run", "--ref", "fmnist:test"])
    with pytest.raises(ValueError, match="needs --num-samples"):
        args.func(args)
    args = parser.parse_args(["evaluate", "--samples", str(tmp_path / "nope.npz"), "--ref", "fmnist:test",
                              "--evaluator-weights", str(tiny[0])])
    with pytest.raises(FileNotFoundError):
        args.func(args)
    args = parser.parse_args(["evaluator", "train", "--out", str(tiny[0])])
    with pytest.raises(ValueError, match="--overwrite"):
        args.func(args)
    with pytest.raises(FileNotFoundError, match="checkpoint run does not exist"):
        samples_from_checkpoint("run", 10)


def test_cli_evaluator_train_on_the_cluttered_variant(data, tmp_path, capsys):
    """`rrepa evaluator train --data fmnist-clutter` trains the same CNN on the variant's 32 px canvases (resized to
    28 like every input) into its own default file, and records the data it saw."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluator", "train", "--data", "fmnist-clutter", "--data-dir", str(data), "--epochs",
                              "1", "--batch-size", "16"])
    args.func(args)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "cache" / "evaluator" / "fmnist-clutter-cnn.safetensors"
    assert row["path"] == str(out) and out.is_file()
    ev = load_evaluator(out)
    assert ev.info["data"]["name"] == "fmnist-clutter" and ev.info["data"]["image_size"] == 32
    assert ev.info["train_images"] == 64 and ev.info["test_images"] == 32  # the fake split's sizes
    assert not (tmp_path / "cache" / "evaluator" / "fmnist-cnn.safetensors").exists()
