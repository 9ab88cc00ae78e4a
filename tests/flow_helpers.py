"""Models for the math tests, and what the test modules share (pytest puts this folder on sys.path)."""

import math

import pytest
import torch

from rrepa.flow import FlowConfig, TARFlow

# The GPU variant of a device-parametrised test is marked `cuda` and skipped without a GPU (conftest.py).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Why the tests that need the real Fashion-MNIST are skipped without it (`make test` installs it where it can).
NEEDS_FMNIST = ("needs Fashion-MNIST in /usr/share/datasets/fashion-mnist: run `make data` (Debian, as root) or "
                "`apt-get install dataset-fashion-mnist`")


def random_flow(cfg: FlowConfig, seed: int = 0, scale: float = 0.3) -> TARFlow:
    """A float64 model far from the identity: proj_out weights and biases and the class embeddings random.
    (A fresh model is the identity, so a test at initialisation proves nothing.)"""
    torch.manual_seed(seed)
    model = TARFlow(cfg).double()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, scale / math.sqrt(cfg.width))
            block.proj_out.bias.normal_(0, 0.1)
            if block.class_embed is not None:
                block.class_embed.normal_(0, 1.0)
    return model
