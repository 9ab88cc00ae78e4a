"""Shared test set-up: offline, and one thread (tiny tensors run fastest single-threaded, and the
2-core machines are often shared)."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RREPA_OFFLINE", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` check the GPU paths (bf16 autocast, CUDA kernels); without a GPU they are skipped.
    On a GPU machine: `pytest -m cuda`."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m cuda` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A fake Fashion-MNIST (random images in the IDX files' layout) for the tests of one module."""
    from helpers import write_fake_fmnist  # after HF_HUB_OFFLINE is set above: huggingface_hub reads it on import

    return write_fake_fmnist(tmp_path_factory.mktemp("fmnist"))
