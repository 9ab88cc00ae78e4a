"""Training-free classification: the one-step gradient against its closed form, exactness on a model whose
log-likelihood is affine in the class embedding, multi-step moving toward Bayes on a trained flow,
checkpoint resolution, the CLI, and the unconditional-model error."""

import argparse
import gzip
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rrepa.cli.classify import register
from rrepa.eval.classify import (
    add_noise,
    class_log_likelihoods,
    evaluate,
    logit_gradient,
    multi_step_logits,
    num_classes,
    one_step_scores,
    predict,
)
from rrepa.flow.checkpoint import save_weights
from rrepa.flow.config import FlowConfig, FlowOutput
from rrepa.flow.tarflow import TARFlow
from rrepa.training.run import load_run

torch.set_num_threads(1)

TINY = FlowConfig(in_channels=1, image_height=8, image_width=8, patch_size=4, width=32, head_dim=16, num_blocks=3,
                  layers_per_block=2, num_classes=5, sigma=0.05)


def randomised(model: TARFlow, seed: int = 0, scale: float = 0.05) -> TARFlow:
    """A fresh model's proj_out is zero, so its class embedding has no effect: randomise proj_out and
    class_embed so that log p(x | e) depends on e."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.copy_(torch.randn(block.proj_out.weight.shape, generator=g) * scale)
            block.proj_out.bias.copy_(torch.randn(block.proj_out.bias.shape, generator=g) * scale)
            if block.class_embed is not None:
                block.class_embed.copy_(torch.randn(block.class_embed.shape, generator=g))
    return model.eval()


def tiny(cfg: FlowConfig = TINY, seed: int = 0, dtype=torch.float64) -> TARFlow:
    torch.manual_seed(seed)
    return randomised(TARFlow(cfg), seed).to(dtype)


def images(n: int, cfg: FlowConfig = TINY, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, cfg.in_channels, cfg.image_height, cfg.image_width, generator=g) * 2 - 1).to(dtype)


def embedding_gradients(model: TARFlow, x: torch.Tensor) -> list[torch.Tensor]:
    """g^(b) = dL/de^(b) (B, width) at the mean embedding, computed without the classifier: every block's
    embedding is replaced by its own leaf tensor (the mean of its table) and autograd differentiates
    log p(x | e) with respect to those leaves."""
    B = x.shape[0]
    leaves = [b.class_embed.detach().mean(0).expand(B, -1).clone().requires_grad_(True) for b in model.blocks]
    model.embeddings = lambda y, drop=None: leaves  # instance attribute shadows the method
    try:
        L = model.log_prob(x)
        return list(torch.autograd.grad(L.sum(), leaves))
    finally:
        del model.embeddings


# --- the one-step classifier against the closed form ---------------------------------------------------


def test_one_step_gradient_equals_closed_form():
    model, x = tiny(), images(6)
    K = model.cfg.num_classes
    grads = embedding_gradients(model, x)
    tables = [b.class_embed.detach() for b in model.blocks]
    # dL/dlambda_k = (1/K) sum_b (E_k - e_mean) . g_b
    expected = sum((g @ (E - E.mean(0)).T) for g, E in zip(grads, tables)) / K
    closed_form_scores = sum(g @ E.T for g, E in zip(grads, tables))  # sum_b E_k . g_b
    got = one_step_scores(model, x)
    assert got.shape == (6, K) and got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert got.abs().max() > 1e-3  # the embedding matters in this model
    pred = predict(model, x, "one-step")
    assert torch.equal(pred, closed_form_scores.argmax(1))
    assert torch.equal(pred, expected.argmax(1))


def test_one_step_gradient_matches_finite_differences():
    model, x = tiny(seed=3), images(3, seed=4)
    K, h = model.cfg.num_classes, 1e-5
    grad, L0 = logit_gradient(model, x)
    assert torch.allclose(L0, model.log_prob(x), rtol=1e-12)  # lambda = 0 is the null label
    for k in range(K):
        step = torch.zeros(3, K, dtype=torch.float64)
        step[:, k] = h
        Lp = model.log_prob(x, torch.softmax(step, 1))
        Lm = model.log_prob(x, torch.softmax(-step, 1))
        assert torch.allclose((Lp - Lm) / (2 * h), grad[:, k], rtol=1e-6, atol=1e-9)


def test_bayes_batching_over_classes():
    model, x = tiny(seed=5), images(4, seed=6)
    K = model.cfg.num_classes
    loop = torch.stack([model.log_prob(x, torch.full((4,), k)) for k in range(K)], dim=1)
    for rows in (1, 3, 8, 1000):  # one class per pass ... all classes in one pass
        assert torch.allclose(class_log_likelihoods(model, x, max_rows=rows), loop, rtol=1e-12)


# --- exact on a model whose log-likelihood is affine in the embedding --------------------------------


class AffineInEmbedding(TARFlow):
    """A flow whose log-likelihood is affine in the class embeddings:

        log p(x | e) = log p_null(x) + sum_b e^(b) . phi_b(x),    phi_b(x) = mean_i tanh(U_b x_i)

    (x_i the tokens). log p_null (the flow run with the null label) and phi_b do not depend on e, so
    log p is affine in e = (e^(1), ..., e^(T)). Claim: the one-step classifier equals the Bayes one.
    Proof: with weights w in the simplex, e^(b) = sum_k w_k E_k^(b), so
        L(w) = c(x) + sum_k w_k s_k,   s_k = sum_b E_k^(b) . phi_b(x),   log p(x | k) = c(x) + s_k.
    With w = softmax(lambda), dw_j/dlambda_k = w_j (delta_jk - w_k), which at lambda = 0 is
    (delta_jk - 1/K) / K, so
        dL/dlambda_k = (1/K) (s_k - mean_j s_j) = (1/K) (log p(x | k) - mean_j log p(x | j)),
    a strictly increasing function of log p(x | k): same argmax (and the same ranking). Every ascent step
    keeps the argmax too: here dL/dlambda_k = w_k (s_k - w . s) for any lambda; by induction the class m
    with the largest s also has the largest lambda, hence the largest w_m, and its increment
    w_m (s_m - w . s) is positive (s_m > w . s unless all s are equal) and at least that of every other
    class (w_j (s_j - w . s) <= w_m (s_m - w . s) when s_j > w . s, and <= 0 otherwise); the step
    normalisation divides all increments of an image by the same positive number.
    (The density is not normalised per class; classification only compares values at one x.)"""

    def __init__(self, cfg: FlowConfig):
        super().__init__(cfg)
        self.phi = nn.ModuleList(nn.Linear(cfg.token_dim, cfg.width) for _ in range(cfg.num_blocks))

    def forward(self, x, y=None, hidden=(), label_drop=0.0):
        self.check_labels(y, x.shape[0])
        base = super().forward(x, None, hidden)  # null label: independent of y
        tokens = self.patchify(x)
        extra = sum((e * torch.tanh(phi(tokens)).mean(1)).sum(-1) for e, phi in zip(self.embeddings(y), self.phi))
        return FlowOutput(base.z, base.logdet + extra, base.hidden)


def test_one_step_equals_bayes_when_log_p_is_affine_in_the_embedding():
    torch.manual_seed(0)
    cfg = FlowConfig(**{**asdict(TINY), "num_classes": 7})
    model = randomised(AffineInEmbedding(cfg), seed=7).double()
    x = images(40, cfg, seed=8)
    K = cfg.num_classes
    bayes = class_log_likelihoods(model, x, max_rows=64)
    grad = one_step_scores(model, x)
    assert torch.allclose(grad, (bayes - bayes.mean(1, keepdim=True)) / K, rtol=1e-9, atol=1e-12)
    assert torch.equal(grad.argmax(1), bayes.argmax(1))
    assert torch.equal(grad.argsort(1), bayes.argsort(1))  # same ranking: same top-5 too
    assert len(set(bayes.argmax(1).tolist())) > 2  # not a constant answer
    assert torch.equal(multi_step_logits(model, x, steps=4, step_size=0.5).argmax(1), bayes.argmax(1))


# --- multi-step moves toward Bayes on a trained flow ---------------------------------------------------


def test_multi_step_moves_toward_bayes_on_a_trained_flow():
    """Train a 2-block flow on 8 noisy prototypes (8 x 8 pixels, overlapping classes) for 300 steps, then
    compare the classifiers on held-out noisy images."""
    K = 8
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(K, 1, 8, 8, generator=g) - 0.5

    def draw(n, gen):
        y = torch.randint(0, K, (n,), generator=gen)
        return protos[y] + 0.6 * torch.randn(n, 1, 8, 8, generator=gen), y

    torch.manual_seed(0)
    cfg = FlowConfig(in_channels=1, image_height=8, image_width=8, patch_size=4, width=32, head_dim=16,
                     num_blocks=2, layers_per_block=1, num_classes=K, sigma=0.05)
    model = TARFlow(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        x, y = draw(64, g)
        loss = model.nll(x + cfg.sigma * torch.randn_like(x), y, label_drop=0.1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = draw(384, torch.Generator().manual_seed(1))
    x = add_noise(model, x, "train", torch.Generator().manual_seed(2))
    bayes = predict(model, x, "bayes")
    one = predict(model, x, "one-step")
    multi = predict(model, x, "multi-step")  # defaults: 10 steps of 0.25
    agree_one = (one == bayes).float().mean().item()
    agree_multi = (multi == bayes).float().mean().item()
    assert (bayes == y).float().mean() > 0.85  # the flow has learnt the classes
    assert (one == y).float().mean() > 0.75  # the one-step classifier works
    assert agree_one < 1.0  # there is something to move toward
    assert agree_multi >= agree_one
    assert torch.equal(predict(model, x[:32], "multi-step", steps=1), one[:32])  # one step = one-step


# --- checkpoints, the CLI, errors -----------------------------------------------------------------------


def test_unconditional_model_is_refused(tmp_path):
    model = TARFlow(FlowConfig(**{**asdict(TINY), "num_classes": 0}))
    for fn in (lambda: num_classes(model), lambda: one_step_scores(model, images(2, dtype=torch.float32)),
               lambda: class_log_likelihoods(model, images(2, dtype=torch.float32))):
        with pytest.raises(ValueError, match="unconditional.*nothing to classify"):
            fn()
    save_weights(tmp_path / "u.safetensors", model)
    args = parser().parse_args(["classify", "--ckpt", str(tmp_path / "u.safetensors"), "--device", "cpu"])
    with pytest.raises(ValueError, match="unconditional") as err:
        args.func(args)
    assert "\n" not in str(err.value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rrepa")
    register(p.add_subparsers(dest="command", required=True))
    return p


def write_fake_fmnist(folder: Path, n: int = 24) -> Path:
    """Fashion-MNIST-shaped IDX files with random images and labels."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(b"\0\0\x08\x03" + np.array([n, 28, 28], ">u4").tobytes() + imgs.tobytes()))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(b"\0\0\x08\x01" + np.array([n], ">u4").tobytes() + labels.tobytes()))
    return folder


FMNIST_TINY = FlowConfig(in_channels=1, image_height=28, image_width=28, patch_size=7, width=32, head_dim=16,
                         num_blocks=2, layers_per_block=1, num_classes=10)


def test_cli_writes_accuracy_json_and_confusion_pngs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RREPA_OFFLINE", "1")
    data = write_fake_fmnist(tmp_path / "fmnist")
    torch.manual_seed(0)
    save_weights(tmp_path / "w.safetensors", randomised(TARFlow(FMNIST_TINY)))
    out = tmp_path / "out"
    args = parser().parse_args(["classify", "--ckpt", str(tmp_path / "w.safetensors"), "--method", "all",
                                "--limit", "11", "--batch-size", "4", "--data-dir", str(data), "--out", str(out),
                                "--device", "cpu", "--steps", "2"])
    args.func(args)
    printed = capsys.readouterr().out
    assert "one-step: top-1" in printed and "top-5" in printed and "agreement one-step vs bayes" in printed
    report = json.loads((out / "classify.json").read_text())
    assert report["images"] == 11 and report["num_classes"] == 10 and report["noise"] == "train"
    assert set(report["methods"]) == {"one-step", "multi-step", "bayes"}
    for m, r in report["methods"].items():
        assert 0 <= r["top1"] <= r["top5"] <= 1
        assert sum(map(sum, r["confusion"])) == 11
        assert math.isclose(r["top1"], sum(r["confusion"][i][i] for i in range(10)) / 11)
        assert (out / f"confusion-{m}.png").stat().st_size > 1000
    # the CLI's numbers are evaluate()'s on the same inputs
    from rrepa.data.datasets import DataConfig, build_dataset

    model, _ = load_run(tmp_path / "w.safetensors")
    direct = evaluate(model, build_dataset(DataConfig(path=str(data)), "test"), ["one-step"], limit=11, batch_size=4,
                      progress=False)
    assert direct["methods"]["one-step"]["top1"] == report["methods"]["one-step"]["top1"]


def test_bad_arguments_are_one_line_value_errors():
    model, x = tiny(), images(2)
    for fn, match in [(lambda: multi_step_logits(model, x, steps=0), "steps"),
                      (lambda: multi_step_logits(model, x, step_size=0), "step_size"),
                      (lambda: add_noise(model, x, "loud"), "noise"),
                      (lambda: predict(model, x, "magic"), "method"),
                      (lambda: class_log_likelihoods(model, x, max_rows=0), "max_rows")]:
        with pytest.raises(ValueError, match=match) as err:
            fn()
        assert "\n" not in str(err.value)


def test_noise_modes():
    model, x = tiny(dtype=torch.float32), images(3, dtype=torch.float32)
    assert add_noise(model, x, "clean") is x
    noisy = add_noise(model, x, "train", torch.Generator().manual_seed(0))
    assert abs((noisy - x).std().item() - model.cfg.sigma) < 0.02
    assert torch.equal(noisy, add_noise(model, x, "train", torch.Generator().manual_seed(0)))
