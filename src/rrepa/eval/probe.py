"""Linear probes on a frozen TARFlow's hidden states at every (block, layer).

Features: h(t, l), the output of layer l of block t's transformer, with the tokens put back into raster
order, pooled over the tokens (`pool`):

    mean           average over the N tokens (width features; the default)
    max            maximum over the tokens (width features)
    flatten-small  the token grid average-pooled to 2 x 2 cells (fewer when the grid is smaller), cells
                   flattened in raster order: 4 x width features that keep a coarse spatial layout

All positions come from ONE forward pass per batch: forward hooks on every layer pool its output as soon
as it is computed, so no more than one layer's full hidden state is alive at a time (T L full states of
an ImageNet-64 model for a batch of 64 would take ~13 GB). The model runs with the null label (the mean
class embedding): giving it the true label would hand the label to the features. The input is the clean
image or x + sigma * eps ("train", the default, as in `rrepa classify`: the inputs the model and its
alignment were trained on).

Probe (rrepa.eval.linear.linear_probe, docs/DESIGN.md section 8): multinomial logistic regression on
standardised features, its L2 strength chosen on a held-out part of the training split; the test split never
takes part in the choice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from rrepa import utils
from rrepa.eval.classify import DEFAULT_NOISE, add_noise, batches
from rrepa.eval.linear import DEFAULT_L2_GRID, linear_probe
from rrepa.flow.config import Position
from rrepa.flow.tarflow import TARFlow

POOLS = ("mean", "max", "flatten-small")


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def all_positions(model: TARFlow) -> list[Position]:
    """Every 1-indexed (block t, layer l), block-major: layers 1..L_t of each block (blocks may differ)."""
    return model.cfg.positions


def pool_tokens(h: Tensor, grid: tuple[int, int], pool: str = "mean") -> Tensor:
    """Hidden states (B, N, width) in raster order -> features (B, F)."""
    if pool == "mean":
        return h.mean(1)
    if pool == "max":
        return h.amax(1)
    if pool == "flatten-small":
        B, N, width = h.shape
        gh, gw = grid
        cells = F.adaptive_avg_pool2d(h.transpose(1, 2).reshape(B, width, gh, gw), (min(2, gh), min(2, gw)))
        return cells.flatten(2).transpose(1, 2).reshape(B, -1)  # (B, cells * width), cell-major
    raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")


@torch.no_grad()
def extract_features(model: TARFlow, x: Tensor, pool: str = "mean",
                     positions: Iterable[Position] | None = None) -> Tensor:
    """Pooled features (B, P, F) of images x (B, C, H, W) at `positions` (default all, block-major), from
    one forward pass with the null label. x is used as given (add noise first if wanted)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    positions = all_positions(model) if positions is None else list(positions)
    wanted = set(positions)
    model.cfg.check_positions(sorted(wanted))
    grid = model.cfg.grid
    feats: dict[Position, Tensor] = {}
    handles = []

    def hook_for(t: int, l: int, block):
        def hook(module, inputs, output):
            feats[(t, l)] = pool_tokens(block.permute(output), grid, pool)  # back to raster order
        return hook

    for t, block in enumerate(model.blocks, start=1):
        for l, layer in enumerate(block.layers, start=1):
            if (t, l) in wanted:
                handles.append(layer.register_forward_hook(hook_for(t, l, block)))
    was_training = model.training
    model.eval()
    try:
        model(x.to(next(model.parameters()).dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.stack([feats[p] for p in positions], dim=1)


def collect_features(model: TARFlow, dataset, limit: int | None = None, batch_size: int = 128, pool: str = "mean",
                     noise: str = DEFAULT_NOISE, seed: int = 0, positions: Sequence[Position] | None = None,
                     desc: str = "features", progress: bool = True) -> tuple[Tensor, Tensor]:
    """Features (n, P, F) float32 on the CPU and labels (n,) of the first `limit` items of dataset."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    n = len(dataset) if limit is None else min(len(dataset), limit)
    if n == 0:
        raise ValueError("the dataset is empty")
    device = next(model.parameters()).device
    feats, labels = [], []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for lo, x, y in batches(dataset, n, batch_size):
            x = add_noise(model, x, noise, utils.generator(seed, lo)).to(device)
            feats.append(extract_features(model, x, pool, positions).float().cpu())
            labels.append(y)
            bar.update(len(y))
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


def probe_features(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], positions: Sequence[Position],
                   num_classes: int, grid: Sequence[float] = DEFAULT_L2_GRID, val_fraction: float = 0.1,
                   seed: int = 0, max_iter: int = 100, device: torch.device | str = "cpu",
                   progress: bool = True) -> list[dict]:
    """One probe per position: features (n, P, F) of the train and test splits -> [{"block", "layer", ...}]."""
    (Ftr, ytr), (Fte, yte) = train, test
    if int(ytr.max()) >= num_classes or int(yte.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    out = []
    for p, (t, l) in enumerate(tqdm(positions, desc="probes", unit="position", disable=not progress)):
        r = linear_probe(Ftr[:, p].to(device), ytr.to(device), Fte[:, p].to(device), yte.to(device), num_classes,
                         grid, val_fraction, seed, max_iter)
        out.append({"block": t, "layer": l, **r, "val_acc": {str(k): v for k, v in r["val_acc"].items()}})
    return out


def probe_model(model: TARFlow, train_set, test_set, *, limit_train: int | None = None, limit_test: int | None = None,
                batch_size: int = 128, pool: str = "mean", noise: str = "train", seed: int = 0,
                l2_grid: Sequence[float] = DEFAULT_L2_GRID, val_fraction: float = 0.1, max_iter: int = 100,
                device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Linear probes at every (block, layer) of model: fit on the first limit_train images of train_set, tested on
    the first limit_test of test_set. The test images get the noise `rrepa classify --seed S` gives them, the
    training images other noise. Returns {"best": {"block", "layer", "test_acc"}, "positions": rows, ...}."""
    for name, value in (("limit_train", limit_train), ("limit_test", limit_test)):
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if max_iter < 1:
        raise ValueError(f"--max-iter must be >= 1, got {max_iter}")
    positions = all_positions(model)
    t0 = time.perf_counter()
    train = collect_features(model, train_set, limit_train, batch_size, pool, noise, seed + 1, positions,
                             desc="features (train)", progress=progress)
    test = collect_features(model, test_set, limit_test, batch_size, pool, noise, seed, positions,
                            desc="features (test)", progress=progress)
    t1 = time.perf_counter()
    rows = probe_features(train, test, positions, train_set.num_classes, l2_grid, val_fraction, seed, max_iter,
                          device)
    best = best_position(rows)
    return {"pool": pool, "noise": noise, "sigma": model.cfg.sigma, "seed": seed, "train_images": len(train[1]),
            "test_images": len(test[1]), "num_classes": train_set.num_classes, "l2_grid": list(l2_grid),
            "val_fraction": val_fraction, "max_iter": max_iter, "feature_seconds": t1 - t0,
            "probe_seconds": time.perf_counter() - t1,
            "best": {"block": best["block"], "layer": best["layer"], "test_acc": best["test_acc"], "l2": best["l2"]},
            "positions": rows}


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def best_position(rows: Sequence[dict]) -> dict:
    """The row with the highest test accuracy (the first in block-major order on ties)."""
    return max(rows, key=lambda r: r["test_acc"])


def layer_counts(num_blocks: int, layers: int | Sequence[int]) -> list[int]:
    """Layers of every block: `layers` (FlowConfig.layers_per_block) is one count for all or one per block."""
    counts = [int(layers)] * num_blocks if isinstance(layers, int) else [int(v) for v in layers]
    if len(counts) != num_blocks:
        raise ValueError(f"got {len(counts)} layer counts {counts} for {num_blocks} blocks; give one per block")
    return counts


def markdown_table(rows: Sequence[dict], num_blocks: int, layers: int | Sequence[int]) -> str:
    """Test accuracy (%) as blocks x layers; the best position in bold. layers: FlowConfig.layers_per_block (one
    count, or one per block: a block's row shows "—" under the layers it lacks)."""
    best = best_position(rows)
    acc = {(r["block"], r["layer"]): r["test_acc"] for r in rows}
    counts = layer_counts(num_blocks, layers)
    columns = max(counts)
    lines = ["| block \\ layer | " + " | ".join(str(l) for l in range(1, columns + 1)) + " |",
             "|---|" + "---|" * columns]
    for t in range(1, num_blocks + 1):
        cells = []
        for l in range(1, columns + 1):
            if l > counts[t - 1]:
                cells.append("—")
                continue
            if (t, l) not in acc:
                cells.append("")
                continue
            v = f"{100 * acc[(t, l)]:.2f}"
            cells.append(f"**{v}**" if (t, l) == (best["block"], best["layer"]) else v)
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_heatmap(rows: Sequence[dict], num_blocks: int, layers: int | Sequence[int], path: str | os.PathLike,
                 title: str) -> None:
    """blocks x layers heatmap of test accuracy, values written in the cells, the best one boxed. layers as in
    markdown_table: the cells of layers a block lacks are grey and marked "—"."""
    import matplotlib  # heavy; only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = layer_counts(num_blocks, layers)
    columns = max(counts)
    grid = np.full((num_blocks, columns), np.nan)
    for r in rows:
        grid[r["block"] - 1, r["layer"] - 1] = 100 * r["test_acc"]
    best = best_position(rows)
    fig, ax = plt.subplots(figsize=(2.0 + 0.9 * columns, 1.5 + 0.6 * num_blocks))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # NaN: a layer the block lacks, or not probed
    im = ax.imshow(grid, cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    ax.set_xticks(range(columns), [str(l) for l in range(1, columns + 1)])
    ax.set_yticks(range(num_blocks), [str(t) for t in range(1, num_blocks + 1)])
    ax.set_xlabel("layer")
    ax.set_ylabel("block (forward order)")
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    for (t, l), v in np.ndenumerate(grid):
        if l >= counts[t]:
            ax.text(l, t, "—", ha="center", va="center", fontsize=8, color="dimgrey")
        elif not np.isnan(v):
            ax.text(l, t, f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="black" if hi > lo and (v - lo) / (hi - lo) > 0.6 else "white")
    ax.add_patch(plt.Rectangle((best["layer"] - 1.5, best["block"] - 1.5), 1, 1, fill=False, edgecolor="red",
                               linewidth=2.5))
    ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
