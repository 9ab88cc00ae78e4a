"""Shared by the benchmark scripts (run them as `python benchmarks/NAME.py`; this folder is then on sys.path)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rrepa.flow.config import FlowConfig
from rrepa.flow.tarflow import TARFlow


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


def train_images_per_s(preset: str, out: Path, steps: int, log_every: int, device: str, sets: list[str],
                       threads: int, launcher: list[str] | None = None, what: str = "") -> tuple[float, float]:
    """Run `rrepa train --preset PRESET` for `steps` steps into `out` (no sample grids, bits/dim or checkpoints
    before the end; `sets` are further --set overrides; `launcher` e.g. torch.distributed.run's arguments) with
    `threads` intra-op threads per process. Returns (the mean images/s of its log windows after the first: start-up
    and warm-up excluded, the command's wall seconds); exits with its output if it fails (`what` names it)."""
    cmd = ["-m", "rrepa.cli", "train", "--preset", preset, "--out", str(out), "--overwrite", "--device", device,
           "--set", f"train.steps={steps}", "--set", f"train.log_every={log_every}", "--set", "train.sample_every=0",
           "--set", "train.eval_bpd=false", "--set", f"train.ckpt_every={steps}",
           *sum((["--set", s] for s in sets), [])]
    t0 = time.time()
    done = subprocess.run([sys.executable, *(launcher or []), *cmd], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        sys.exit(f"{what or preset} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "images_per_s" in r][1:]
    if not rows:
        sys.exit(f"need more than one log window: raise the steps above log_every ({log_every})")
    return statistics.mean(r["images_per_s"] for r in rows), time.time() - t0
