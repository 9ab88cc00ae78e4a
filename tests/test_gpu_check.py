"""benchmarks/gpu_check.sh, with a stand-in for python: which steps run, in which order, and which are skipped when
the device-time budget runs out (the GPU itself is exercised only on a GPU machine)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["pytest-cuda.txt", "bench_precision.md", "bench_align_paper_bf16.md", "bench_train_fmnist.md",
          "bench_sample.md", "bench_train_fmnist_compile.md", "bench_align_bench.md", "bench_latent_sd_float32.md",
          "bench_latent_sd_bfloat16.md"]  # in the order of what matters most


def run_check(tmp_path: Path, cuda: bool = True, **env: str) -> subprocess.CompletedProcess:
    """gpu_check.sh with PYTHON a script that prints its arguments (and says whether CUDA is there)."""
    stub = tmp_path / "python"
    stub.write_text(f"#!/bin/sh\necho \"$@\"\nexit {0 if cuda else 1}\n")
    stub.chmod(0o755)
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, "PYTHON": str(stub), **env}, timeout=60)


@pytest.mark.parametrize("budget, ran", [
    ("100000", CHECKS),
    ("100", [n for n in CHECKS if n not in ("bench_align_paper_bf16.md", "bench_align_bench.md")]),  # limits > 100 s
    ("0", []),
])
def test_steps_run_in_order_within_the_budget(tmp_path, budget, ran):
    r = run_check(tmp_path, BUDGET=budget)
    assert r.returncode == 0, r.stderr
    started = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("=== ") and "(limit" in line]
    assert started == ran
    for name in ran:  # each step's output is its own file: the stub's echo of the command
        assert (tmp_path / "out" / name).read_text().strip()
    skipped = tmp_path / "out" / "skipped.txt"
    listed = [line.split()[1] for line in skipped.read_text().splitlines()] if skipped.exists() else []
    assert listed == [name for name in CHECKS if name not in ran]


def test_the_sampling_goal_is_measured_on_the_gpu(tmp_path):
    r = run_check(tmp_path, BUDGET="100000", SAMPLE_CKPT="runs/default")
    command = (tmp_path / "out" / "bench_precision.md").read_text()
    assert "benchmarks/bench_precision.py --device cuda" in command and "--samples 100 1000" in command
    assert "--ckpt runs/default" in command and r.returncode == 0


@pytest.mark.parametrize("cuda, env, message", [
    (False, {}, "no CUDA device here"),
    (True, {"PART": "all"}, "PART must be checks (the default) or rehearse"),
])
def test_refuses_in_one_line(tmp_path, cuda, env, message):
    r = run_check(tmp_path, cuda=cuda, **env)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
