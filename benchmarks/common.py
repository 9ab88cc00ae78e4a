"""Shared by the benchmark scripts (run them as `python benchmarks/NAME.py`; this folder is then on sys.path)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from rrepa.flow import FlowConfig, TARFlow


def timed(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall time of fn() in seconds over `repeats` calls, after one warm-up call (when warmup)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def trained_like(cfg: FlowConfig, class_embed_std: float = 0.0) -> TARFlow:
    """A model whose proj_out (and, when class_embed_std > 0, class embeddings) are not at their
    initialisation, so the flow does the arithmetic of a trained one: a fresh model is the identity."""
    torch.manual_seed(0)
    model = TARFlow(cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.01)
            if class_embed_std > 0 and block.class_embed is not None:
                block.class_embed.normal_(0, class_embed_std)
    return model.eval()
