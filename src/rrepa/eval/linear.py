"""The linear probe, the one used everywhere (flow hidden states in rrepa.eval.probe, the embedded encoder's
features in rrepa.fmnist.encoder): multinomial logistic regression on standardised features (mean and std of
the fitting data), mean cross-entropy + (l2 / 2) ||W||^2, fitted full-batch with L-BFGS (strong Wolfe line
search). A random `val_fraction` of the training data is held out; every l2 of the grid is fitted on the
rest (from the largest l2 down, each warm-started from the previous) and the one with the best validation
accuracy is chosen (ties: the larger l2). The probe is then refitted on all the training data with that l2
and evaluated once on the test data, which never takes part in the choice."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


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


def linear_probe(Xtr: Tensor, ytr: Tensor, Xte: Tensor, yte: Tensor, num_classes: int,
                 grid: Sequence[float] = DEFAULT_L2_GRID, val_fraction: float = 0.1, seed: int = 0,
                 max_iter: int = 100) -> dict:
    """Features Xtr (n, F), Xte (m, F), labels (n,), (m,): choose l2 on the training data (select_l2), refit
    on all of it, then test once. Returns {"l2", "val_acc": {l2: acc}, "train_acc", "test_acc"}."""
    l2, val_acc = select_l2(Xtr, ytr, num_classes, grid, val_fraction, seed, max_iter)
    scale = Standardiser(Xtr)
    Xs = scale(Xtr)
    W, b = fit_logistic(Xs, ytr, num_classes, l2, max_iter)
    return {"l2": l2, "val_acc": val_acc, "train_acc": accuracy(Xs, ytr, W, b),
            "test_acc": accuracy(scale(Xte), yte, W, b)}
