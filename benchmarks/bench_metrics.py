"""Evaluation throughput on CPU: feature extraction (images/s) for the Inception path (torch-fidelity's
FID-Inception, random weights: the timing does not depend on them) and for the embedded Fashion-MNIST
evaluator (untrained weights unless --evaluator-weights), plus the cost of the metrics themselves
(Fréchet distance at the networks' feature sizes, precision / recall). Prints one Markdown table.

    .venv/bin/python benchmarks/bench_metrics.py [--threads 1] [--inception-images 32] [--fmnist-images 10000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: oversubscribed BLAS threads are very slow

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rrepa.eval import fid, inception  # noqa: E402
from rrepa.fmnist.evaluator import FMNISTCNN, FMNISTEvaluator, load_evaluator_file  # noqa: E402


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--inception-images", type=int, default=32)
    ap.add_argument("--inception-batch", type=int, default=16)
    ap.add_argument("--fmnist-images", type=int, default=10000)
    ap.add_argument("--evaluator-weights", help="a trained evaluator (default: random weights)")
    ap.add_argument("--skip-sqrtm", action="store_true", help="skip the 2048-d scipy sqrtm timing (slow)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        weights = inception.make_random_inception_weights(Path(tmp) / "random-inception.pth")
        inc = inception.InceptionFeatures(weights, batch_size=args.inception_batch)
    for size, ch in ((28, 1), (64, 3)):
        imgs = rng.integers(0, 256, (args.inception_images, size, size, ch), dtype=np.uint8)
        inc.extract(imgs[: args.inception_batch])  # warm-up
        dt = timed(lambda imgs=imgs: inc.extract(imgs))
        rows.append((f"Inception features (pool + sFID + logits), {size}x{size}x{ch} -> 299, "
                     f"batch {args.inception_batch}", f"{args.inception_images / dt:.1f} img/s",
                     f"{args.inception_images} images in {dt:.1f} s"))

    ev = load_evaluator_file(args.evaluator_weights) if args.evaluator_weights else FMNISTEvaluator(FMNISTCNN())
    imgs = rng.integers(0, 256, (args.fmnist_images, 28, 28, 1), dtype=np.uint8)
    ev.extract(imgs[:500])
    dt = timed(lambda: ev.extract(imgs), 2)
    rows.append((f"{ev.name} features + softmax, 28x28x1, batch {ev.batch_size}",
                 f"{args.fmnist_images / dt:.0f} img/s", f"{args.fmnist_images} images in {dt:.2f} s"))

    for d, n in ((128, 10000), (2048, 4000)):
        x = rng.normal(size=(n, d))
        y = rng.normal(size=(n, d)) + 0.1
        (m1, s1), (m2, s2) = fid.feature_stats(x), fid.feature_stats(y)
        methods = ("eigh",) if (d == 2048 and args.skip_sqrtm) else ("sqrtm", "eigh")
        for method in methods:
            dt = timed(lambda m=method, a=(m1, s1, m2, s2): fid.frechet_distance(*a, method=m))
            rows.append((f"Fréchet distance, {d}-d, method={method}", f"{dt:.2f} s", "one call"))

    for d, n in ((128, 10000), (2048, 5000)):
        real = rng.normal(size=(n, d)).astype(np.float32)
        fake = rng.normal(size=(n, d)).astype(np.float32)
        dt = timed(lambda real=real, fake=fake: fid.precision_recall(real, fake, k=3))
        rows.append((f"precision / recall, k=3, {n} vs {n}, {d}-d", f"{dt:.2f} s", "blocks of 2048 x 2048"))

    print(f"torch {torch.__version__}, {args.threads} thread(s), OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS')}, {os.cpu_count()} CPUs\n")
    print("| what | throughput / time | notes |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
