"""Linear probes: one-pass feature extraction against the flow's own hidden states, the logistic regression
on separable data, the L2 choice on validation data only, and the CLI."""

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rrepa.cli.probe import parse_grid, register
from rrepa.eval import linear
from rrepa.eval.linear import fit_logistic, linear_probe, select_l2
from rrepa.eval.probe import all_positions, extract_features, markdown_table, pool_tokens, save_heatmap
from rrepa.flow.checkpoint import save_weights
from rrepa.flow.config import FlowConfig
from rrepa.flow.tarflow import TARFlow

torch.set_num_threads(1)


def randomised(model: TARFlow, seed: int = 0) -> TARFlow:
    """Non-zero proj_out (a fresh one is zero, making every block the identity) and class embeddings."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.copy_(torch.randn(block.proj_out.weight.shape, generator=g) * 0.05)
            if block.class_embed is not None:
                block.class_embed.copy_(torch.randn(block.class_embed.shape, generator=g))
    return model.eval()


def tiny(patch: int, num_classes: int = 3, layers: int | tuple[int, ...] = 2) -> TARFlow:
    torch.manual_seed(0)
    cfg = FlowConfig(in_channels=1, image_height=8, image_width=8, patch_size=patch, width=32, head_dim=16,
                     num_blocks=3, layers_per_block=layers, num_classes=num_classes)
    return randomised(TARFlow(cfg)).double()


# --- features ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["mean", "max", "flatten-small"])
@pytest.mark.parametrize("patch", [2, 4])  # token grids 4 x 4 and 2 x 2
def test_one_pass_features_equal_the_flows_hidden_states(pool, patch):
    model = tiny(patch)
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64) * 2 - 1
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        feats = extract_features(model, x, pool)
    finally:
        handle.remove()
    assert len(calls) == 1  # every position from one forward pass
    positions = all_positions(model)
    assert positions == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]
    hidden = model(x, hidden=positions).hidden  # raster order, null label
    width = model.cfg.width
    assert feats.shape == (5, 6, width * (4 if pool == "flatten-small" else 1))
    for p, pos in enumerate(positions):
        h = hidden[pos]
        if pool == "mean":
            expected = h.mean(1)
        elif pool == "max":
            expected = h.amax(1)
        elif patch == 4:  # a 2 x 2 grid: the cells are the tokens themselves
            expected = h.reshape(5, -1)
        else:  # 4 x 4 grid -> 2 x 2 cells; cell (0, 0) holds raster tokens 0, 1, 4, 5
            cells = [h[:, [4 * r + c, 4 * r + c + 1, 4 * r + c + 4, 4 * r + c + 5]].mean(1)
                     for r in (0, 2) for c in (0, 2)]
            expected = torch.cat(cells, dim=1)
        assert torch.allclose(feats[:, p], expected, rtol=1e-12, atol=1e-12), (pos, pool)
    # the label never reaches the features: the same as an explicit null label
    assert torch.allclose(feats[:, -1], pool_tokens(model(x, None, hidden=[(3, 2)]).hidden[(3, 2)],
                                                    model.cfg.grid, pool), rtol=1e-12)
    labelled = model(x, torch.zeros(5, dtype=torch.int64), hidden=[(3, 2)]).hidden[(3, 2)]
    assert not torch.allclose(hidden[(3, 2)], labelled)
    sub = extract_features(model, x, pool, positions=[(2, 2), (1, 1)])
    assert torch.equal(sub, feats[:, [3, 0]])


def test_feature_errors():
    model = tiny(4)
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="pool"):
        extract_features(model, x, "avg")
    with pytest.raises(ValueError, match="outside"):
        extract_features(model, x, positions=[(4, 1)])
    with pytest.raises(ValueError, match=r"\(block 2, layer 2\) is outside.*block 2 has layers 1..1"):
        extract_features(tiny(4, layers=(1, 1, 3)), x, positions=[(3, 3), (2, 2)])


def test_one_pass_features_of_a_model_with_per_block_layers():
    """A deep-shallow model: every block's own layers, one pass, equal to the flow's hidden states."""
    model = tiny(4, layers=(1, 1, 3))
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    positions = all_positions(model)
    assert positions == [(1, 1), (2, 1), (3, 1), (3, 2), (3, 3)]
    feats = extract_features(model, x, "mean")
    assert feats.shape == (4, 5, model.cfg.width)
    hidden = model(x, hidden=positions).hidden
    for p, pos in enumerate(positions):
        torch.testing.assert_close(feats[:, p], hidden[pos].mean(1), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(feats[:, 3], feats[:, 4])


# --- logistic regression and the choice of L2 ----------------------------------------------------------


def separable(n: int, K: int = 4, F: int = 12, seed: int = 0, spread: float = 0.3, mean_scale: float = 3.0):
    """Gaussian classes around fixed random means; far apart (separable) by default."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, F, generator=torch.Generator().manual_seed(99)) * mean_scale
    y = torch.randint(0, K, (n,), generator=g)
    return means[y] + spread * torch.randn(n, F, generator=g), y


def test_probe_reaches_full_accuracy_on_separable_features():
    Xtr, ytr = separable(400)
    Xte, yte = separable(200, seed=1)
    r = linear_probe(Xtr, ytr, Xte, yte, 4)
    assert r["train_acc"] == 1.0 and r["test_acc"] >= 0.995
    assert set(r["val_acc"]) == set(linear.DEFAULT_L2_GRID)


def test_fit_logistic_solves_the_penalised_problem():
    X, y = separable(100, spread=2.0)
    X = X.double()
    W, b = fit_logistic(X, y, 4, l2=0.1, max_iter=500)
    W.requires_grad_(True)
    b.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(X @ W + b, y) + 0.05 * W.pow(2).sum()
    gW, gb = torch.autograd.grad(loss, (W, b))
    assert gW.abs().max() < 1e-5 and gb.abs().max() < 1e-5  # a stationary point of a convex objective


def test_l2_is_chosen_on_validation_never_on_test(monkeypatch):
    # overlapping classes in many dimensions: the L2 strength matters
    Xtr, ytr = separable(200, F=150, spread=1.0, mean_scale=0.2)
    Xte, yte = separable(77, F=150, seed=1, spread=1.0, mean_scale=0.2)  # 77 rows: recognisable below
    l2, val_acc = select_l2(Xtr, ytr, 4, seed=3)
    ordered = sorted(val_acc, reverse=True)
    assert l2 == max(ordered, key=val_acc.get)  # best validation accuracy, larger l2 on ties
    assert len(set(val_acc.values())) > 1  # the grid made a difference
    # spy: no fit ever sees the test rows, and the test split is scored exactly once, at the end
    seen = []
    real_fit, real_acc = linear.fit_logistic, linear.accuracy
    monkeypatch.setattr(linear, "fit_logistic", lambda X, *a, **k: seen.append(("fit", len(X))) or real_fit(X, *a, **k))
    monkeypatch.setattr(linear, "accuracy", lambda X, *a: seen.append(("acc", len(X))) or real_acc(X, *a))
    r = linear_probe(Xtr, ytr, Xte, yte, 4, seed=3)
    assert ("fit", 77) not in seen and seen[-1] == ("acc", 77) and seen.count(("acc", 77)) == 1
    assert r["l2"] == l2 and r["val_acc"] == val_acc
    # the choice does not move when the test labels are scrambled; only the test accuracy does
    scrambled = linear_probe(Xtr, ytr, Xte, (yte + 1) % 4, 4, seed=3)
    assert scrambled["l2"] == r["l2"] and scrambled["val_acc"] == r["val_acc"]
    assert scrambled["test_acc"] != r["test_acc"]


def test_split_and_grid_errors():
    X, y = separable(5)
    with pytest.raises(ValueError, match="too few"):
        select_l2(X, y, 4, val_fraction=0.05)
    with pytest.raises(ValueError, match="val_fraction"):
        select_l2(X, y, 4, val_fraction=1.0)
    with pytest.raises(ValueError, match="grid"):
        select_l2(X, y, 4, grid=[])
    with pytest.raises(ValueError, match="l2-grid"):
        parse_grid("1e-3,abc")


def test_markdown_table_marks_the_best():
    rows = [{"block": t, "layer": l, "test_acc": 0.1 * t + 0.01 * l} for t in (1, 2) for l in (1, 2, 3)]
    table = markdown_table(rows, 2, 3)
    assert table.splitlines()[0] == "| block \\ layer | 1 | 2 | 3 |"
    assert table.splitlines()[-1] == "| 2 | 21.00 | 22.00 | **23.00** |"
    assert table.count("**") == 2


def test_markdown_table_and_heatmap_with_per_block_layers(tmp_path):
    """Blocks with different layer counts: as many columns as the deepest block, "—" where a block has no layer
    (an existing layer that was not probed stays empty)."""
    counts = (1, 3, 2)
    rows = [{"block": t, "layer": l, "test_acc": 0.1 * t + 0.01 * l} for t, L in enumerate(counts, start=1)
            for l in range(1, L + 1) if (t, l) != (2, 2)]
    lines = markdown_table(rows, 3, counts).splitlines()
    assert lines[0] == "| block \\ layer | 1 | 2 | 3 |" and lines[1] == "|---|---|---|---|"
    assert lines[2:] == ["| 1 | 11.00 | — | — |", "| 2 | 21.00 |  | 23.00 |", "| 3 | 31.00 | **32.00** | — |"]
    assert markdown_table(rows, 3, list(counts)) == "\n".join(lines)
    with pytest.raises(ValueError, match=r"got 2 layer counts \[1, 3\] for 3 blocks"):
        markdown_table(rows, 3, (1, 3))
    png = tmp_path / "probe.png"
    save_heatmap(rows, 3, counts, png, "ragged")
    assert png.stat().st_size > 1000


# --- the CLI ---------------------------------------------------------------------------------------------


def write_fake_fmnist(folder: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(b"\0\0\x08\x03" + np.array([n, 28, 28], ">u4").tobytes() + imgs.tobytes()))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(b"\0\0\x08\x01" + np.array([n], ">u4").tobytes() + labels.tobytes()))
    return folder


@pytest.mark.parametrize("layers,positions", [(2, [(1, 1), (1, 2), (2, 1), (2, 2)]),
                                              ((1, 2), [(1, 1), (2, 1), (2, 2)])], ids=["uniform", "per-block"])
def test_cli_probe_on_an_unconditional_model(tmp_path, capsys, monkeypatch, layers, positions):
    monkeypatch.setenv("RREPA_OFFLINE", "1")
    data = write_fake_fmnist(tmp_path / "fmnist")
    torch.manual_seed(0)
    cfg = FlowConfig(in_channels=1, image_height=28, image_width=28, patch_size=7, width=32, head_dim=16,
                     num_blocks=2, layers_per_block=layers, num_classes=0)
    save_weights(tmp_path / "w.safetensors", randomised(TARFlow(cfg)))
    parser = argparse.ArgumentParser(prog="rrepa")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "out"
    args = parser.parse_args(["probe", "--ckpt", str(tmp_path / "w.safetensors"), "--limit-train", "20",
                              "--limit-test", "10", "--batch-size", "8", "--data-dir", str(data), "--out", str(out),
                              "--device", "cpu", "--max-iter", "10", "--l2-grid", "1e-3,1e-1", "--pool", "max"])
    args.func(args)
    printed = capsys.readouterr().out
    assert "| block \\ layer | 1 | 2 |" in printed and "**" in printed and "best: block" in printed
    report = json.loads((out / "probe-max.json").read_text())
    assert report["train_images"] == 20 and report["test_images"] == 10 and report["num_classes"] == 10
    assert [(r["block"], r["layer"]) for r in report["positions"]] == positions
    assert ("| 1 | " in printed and " | — |" in printed) == (layers != 2)  # block 1 lacks layer 2
    assert all(r["l2"] in (1e-3, 1e-1) and 0 <= r["test_acc"] <= 1 for r in report["positions"])
    assert report["best"]["test_acc"] == max(r["test_acc"] for r in report["positions"])
    assert (out / "probe-max.png").stat().st_size > 1000
    bad = parser.parse_args(["probe", "--ckpt", str(tmp_path / "w.safetensors"), "--l2-grid", "x"])
    with pytest.raises(ValueError, match="l2-grid"):
        bad.func(bad)
