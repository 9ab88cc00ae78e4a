"""Models for tests and benchmarks. A fresh TARFlow is the identity (its output projections start at zero),
so a check made at initialisation proves nothing: these are far from it."""

from __future__ import annotations

import math

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
