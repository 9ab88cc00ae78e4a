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

Probe: multinomial logistic regression on standardised features (mean and std of the fitting data),
mean cross-entropy + (l2 / 2) ||W||^2, fitted full-batch with L-BFGS (strong Wolfe line search). A
random `val_fraction` of the training split is held out; every l2 of the grid is fitted on the rest
(from the largest l2 down, each warm-started from the previous) and the one with the best validation
accuracy is chosen (ties: the larger l2). The probe is then refitted on the whole training split with
that l2 and evaluated once on the test split. The test split never takes part in the choice: the
selection function does not receive it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from rrepa.classify import (
    DEFAULT_NOISE,
    add_common_args,
    add_noise,
    batches,
    dataset_for,
    default_out_dir,
    load_model,
    noise_generator,
)
from rrepa.distributed import resolve_device
from rrepa.flow import Position, TARFlow

POOLS = ("mean", "max", "flatten-small")
DEFAULT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def all_positions(model: TARFlow) -> list[Position]:
    """Every 1-indexed (block, layer), block-major."""
    return [(t, l) for t in range(1, model.cfg.num_blocks + 1) for l in range(1, model.cfg.layers_per_block + 1)]


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
    outside = sorted(wanted - set(all_positions(model)))
    if outside:
        raise ValueError(f"position (block {outside[0][0]}, layer {outside[0][1]}) is outside this model's blocks "
                         f"1..{model.cfg.num_blocks} and layers 1..{model.cfg.layers_per_block} (1-indexed)")
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
            x = add_noise(model, x, noise, noise_generator(seed, lo)).to(device)
            feats.append(extract_features(model, x, pool, positions).float().cpu())
            labels.append(y)
            bar.update(len(y))
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------------------------
# Logistic regression
# --------------------------------------------------------------------------------------------


class Standardiser:
    """x -> (x - mean) / std with the statistics of the data it was built on (constant features -> 0)."""

    def __init__(self, X: Tensor):
        self.mean = X.mean(0)
        self.std = X.std(0, unbiased=False).clamp_min(1e-6)

    def __call__(self, X: Tensor) -> Tensor:
        return (X - self.mean) / self.std


def fit_logistic(X: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int = 100,
                 init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression: minimise mean CE(X W + b, y) + (l2 / 2) ||W||^2 (b unpenalised)
    full-batch with L-BFGS. X (n, F) float, y (n,) ints in [0, num_classes). Returns W (F, K), b (K,)."""
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if X.shape[0] != y.shape[0] or X.dim() != 2:
        raise ValueError(f"features must be (n, F) with n = len(labels), got {tuple(X.shape)} and {len(y)} labels")
    W = X.new_zeros(X.shape[1], num_classes) if init is None else init[0].detach().clone()
    b = X.new_zeros(num_classes) if init is None else init[1].detach().clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(X @ W + b, y) + 0.5 * l2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def accuracy(X: Tensor, y: Tensor, W: Tensor, b: Tensor) -> float:
    return ((X @ W + b).argmax(1) == y).float().mean().item()


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit indices, validation indices): a random val_fraction of range(n), at least one of each."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    n_val = round(val_fraction * n)
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"{n} training images are too few to hold out a validation part of {val_fraction}; "
                         f"use more training images (--limit-train) or another --val-fraction")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def select_l2(X: Tensor, y: Tensor, num_classes: int, grid: Sequence[float] = DEFAULT_L2_GRID,
              val_fraction: float = 0.1, seed: int = 0, max_iter: int = 100) -> tuple[float, dict[float, float]]:
    """The l2 of the grid with the best accuracy on a held-out part of the TRAINING data (X, y), and
    {l2: validation accuracy}. Ties go to the larger l2. Never sees test data."""
    if not grid:
        raise ValueError("the l2 grid is empty")
    fit, val = split_train_val(X.shape[0], val_fraction, seed)
    scale = Standardiser(X[fit])
    Xf, Xv = scale(X[fit]), scale(X[val])
    val_acc: dict[float, float] = {}
    params = None
    for l2 in sorted(grid, reverse=True):  # strongest first; each fit warm-starts the next
        params = fit_logistic(Xf, y[fit], num_classes, l2, max_iter, init=params)
        val_acc[l2] = accuracy(Xv, y[val], *params)
    best = max(sorted(grid, reverse=True), key=lambda l2: val_acc[l2])  # max keeps the first (larger l2) on ties
    return best, val_acc


def probe_position(Xtr: Tensor, ytr: Tensor, Xte: Tensor, yte: Tensor, num_classes: int,
                   grid: Sequence[float] = DEFAULT_L2_GRID, val_fraction: float = 0.1, seed: int = 0,
                   max_iter: int = 100) -> dict:
    """Choose l2 on the training data (select_l2), refit on all of it, then test once.
    Returns {"l2", "val_acc": {l2: acc}, "train_acc", "test_acc"}."""
    l2, val_acc = select_l2(Xtr, ytr, num_classes, grid, val_fraction, seed, max_iter)
    scale = Standardiser(Xtr)
    Xs = scale(Xtr)
    W, b = fit_logistic(Xs, ytr, num_classes, l2, max_iter)
    return {"l2": l2, "val_acc": val_acc, "train_acc": accuracy(Xs, ytr, W, b),
            "test_acc": accuracy(scale(Xte), yte, W, b)}


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
        r = probe_position(Ftr[:, p].to(device), ytr.to(device), Fte[:, p].to(device), yte.to(device), num_classes,
                           grid, val_fraction, seed, max_iter)
        out.append({"block": t, "layer": l, **r, "val_acc": {str(k): v for k, v in r["val_acc"].items()}})
    return out


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def best_position(rows: Sequence[dict]) -> dict:
    """The row with the highest test accuracy (the first in block-major order on ties)."""
    return max(rows, key=lambda r: r["test_acc"])


def markdown_table(rows: Sequence[dict], num_blocks: int, layers: int) -> str:
    """Test accuracy (%) as blocks x layers; the best position in bold."""
    best = best_position(rows)
    acc = {(r["block"], r["layer"]): r["test_acc"] for r in rows}
    lines = ["| block \\ layer | " + " | ".join(str(l) for l in range(1, layers + 1)) + " |",
             "|---|" + "---|" * layers]
    for t in range(1, num_blocks + 1):
        cells = []
        for l in range(1, layers + 1):
            if (t, l) not in acc:
                cells.append("")
                continue
            v = f"{100 * acc[(t, l)]:.2f}"
            cells.append(f"**{v}**" if (t, l) == (best["block"], best["layer"]) else v)
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_heatmap(rows: Sequence[dict], num_blocks: int, layers: int, path: str | os.PathLike, title: str) -> None:
    """blocks x layers heatmap of test accuracy, values written in the cells, the best one boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((num_blocks, layers), np.nan)
    for r in rows:
        grid[r["block"] - 1, r["layer"] - 1] = 100 * r["test_acc"]
    best = best_position(rows)
    fig, ax = plt.subplots(figsize=(2.0 + 0.9 * layers, 1.5 + 0.6 * num_blocks))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    ax.set_xticks(range(layers), [str(l) for l in range(1, layers + 1)])
    ax.set_yticks(range(num_blocks), [str(t) for t in range(1, num_blocks + 1)])
    ax.set_xlabel("layer")
    ax.set_ylabel("block (forward order)")
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    for (t, l), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(l, t, f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="black" if hi > lo and (v - lo) / (hi - lo) > 0.6 else "white")
    ax.add_patch(plt.Rectangle((best["layer"] - 1.5, best["block"] - 1.5), 1, 1, fill=False, edgecolor="red",
                               linewidth=2.5))
    ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_grid(text: str) -> list[float]:
    try:
        grid = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--l2-grid takes comma-separated numbers, e.g. 1e-4,1e-3,1e-2; got {text!r}") from err
    if not grid or any(v < 0 for v in grid):
        raise ValueError(f"--l2-grid needs at least one value >= 0, got {text!r}")
    return grid


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


def cmd_probe(args: argparse.Namespace) -> None:
    """`rrepa probe`: linear-probe accuracy at every (block, layer)."""
    grid = parse_grid(args.l2_grid)
    device = resolve_device(args.device)
    model, info = load_model(args.ckpt, args.weights, device)
    train_set = dataset_for(model, info, "train", args.data_dir, args.dataset)
    test_set = dataset_for(model, info, "test", args.data_dir, args.dataset)
    res = probe_model(model, train_set, test_set, limit_train=args.limit_train, limit_test=args.limit_test,
                      batch_size=args.batch_size, pool=args.pool, noise=args.noise, seed=args.seed, l2_grid=grid,
                      val_fraction=args.val_fraction, max_iter=args.max_iter, device=device)
    cfg = model.cfg
    rows, best = res["positions"], res["best"]
    table = markdown_table(rows, cfg.num_blocks, cfg.layers_per_block)
    print(f"linear-probe test accuracy (%), pool {args.pool}, noise {args.noise}, {res['train_images']} train / "
          f"{res['test_images']} test images; best in bold")
    print(table)
    print(f"best: block {best['block']}, layer {best['layer']}: {100 * best['test_acc']:.2f}% (l2 {best['l2']:g})")
    out = Path(args.out) if args.out else default_out_dir(args.ckpt, "probe")
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"probe-{args.pool}.png"
    save_heatmap(rows, cfg.num_blocks, cfg.layers_per_block, png,
                 f"linear probe ({args.pool}), best {100 * best['test_acc']:.1f}%")
    report = {"ckpt": info["file"], "step": info["step"], "weights": info["weights"], **res, "table": table,
              "heatmap_png": str(png)}
    report["best"] = {k: best[k] for k in ("block", "layer", "test_acc")}
    path = out / f"probe-{args.pool}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path} and {png}")


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `rrepa probe`."""
    p = sub.add_parser("probe", help="linear probes on frozen features at every (block, layer)",
                       description="Linear probes (multinomial logistic regression, L2 chosen on a held-out part "
                                   "of the training split) on pooled hidden states of every (block, layer), "
                                   "extracted in one pass per batch with the null label.")
    add_common_args(p)
    p.add_argument("--pool", choices=POOLS, default="mean",
                   help="token pooling: mean (default), max, or flatten-small (2 x 2 cells, flattened)")
    p.add_argument("--limit-train", type=int, help="only the first N training images")
    p.add_argument("--limit-test", type=int, help="only the first N test images")
    p.add_argument("--batch-size", type=int, default=128, help="images per feature-extraction batch")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="part of the training images held out to choose the L2 strength")
    p.add_argument("--l2-grid", default=",".join(f"{v:g}" for v in DEFAULT_L2_GRID),
                   help="L2 strengths to choose from (comma-separated)")
    p.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations per fit")
    p.add_argument("--out", help="output folder (default <run>/probe)")
    p.set_defaults(func=cmd_probe)


__all__ = ["POOLS", "add_cli", "all_positions", "collect_features", "extract_features", "fit_logistic",
           "markdown_table", "pool_tokens", "probe_features", "probe_position", "select_l2"]
