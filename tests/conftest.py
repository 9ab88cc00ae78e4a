"""Shared test set-up: offline, and one thread (tiny tensors run fastest single-threaded, and the
2-core machines are often shared)."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RREPA_OFFLINE", "1")
torch.set_num_threads(1)
