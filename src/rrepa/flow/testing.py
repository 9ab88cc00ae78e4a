"""What tests and benchmarks share: models far from the identity (a fresh TARFlow is the identity, its output
projections start at zero, so a check made at initialisation proves nothing), a diverging model, and a fake
Fashion-MNIST (random images in the IDX files' layout)."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch

from rrepa.flow.config import FlowConfig
from rrepa.flow.tarflow import TARFlow


def random_flow(cfg: FlowConfig, seed: int = 0, scale: float = 0.3, bias: float = 0.1,
                dtype: torch.dtype = torch.float64) -> TARFlow:
    """A TARFlow whose proj_out weights (std scale / sqrt(width)), biases (std bias) and class embeddings
    (std 1) are random, seeded by `seed`; float64 by default (for the math tests)."""
    torch.manual_seed(seed)
    model = TARFlow(cfg).to(dtype)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, scale / math.sqrt(cfg.width))
            block.proj_out.bias.normal_(0, bias)
            if block.class_embed is not None:
                block.class_embed.normal_(0, 1.0)
    return model


def diverge_where_first_prior_positive() -> None:
    """Make TARFlow.reverse return NaN for every sample whose first prior value is positive (about half of them),
    whichever process draws it: a model that diverges on some samples, for the tests and benchmarks/faults.py of
    what sampling does with them. It patches the class (a test restores it, e.g. monkeypatch.setattr(TARFlow,
    "reverse", TARFlow.reverse) first); a script run under torchrun calls it before the command."""
    reverse = TARFlow.reverse

    def diverging(self, z, *args, **kwargs):
        x, stats = reverse(self, z, *args, **kwargs)
        return x.masked_fill((z.flatten(1)[:, 0] > 0)[:, None, None, None], float("nan")), stats

    TARFlow.reverse = diverging


def write_fake_fmnist(folder: Path, n_train: int = 64, n_test: int = 32) -> Path:
    """Fashion-MNIST-shaped IDX files with random images: a few KB instead of 30 MB."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        image_header = b"\0\0\x08\x03" + np.array([n, 28, 28], ">u4").tobytes()  # IDX: uint8, 3 dims
        label_header = b"\0\0\x08\x01" + np.array([n], ">u4").tobytes()
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(image_header + images.tobytes()))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(label_header + labels.tobytes()))
    return folder
