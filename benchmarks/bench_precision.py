"""float32 against bfloat16 autocast (train.precision), measured in one run, interleaved, for what a run spends its
time on: the training step (fmnist, fmnist-latent, a 32 x 32 x 3 patch-2 model, a width-768 paper-shaped model with
few layers), the R-REPA step, the one-step and Bayes classifiers, and sampling (sequential and Jacobi).

    python benchmarks/bench_precision.py                       # threads: all cores
    OMP_NUM_THREADS=1 python benchmarks/bench_precision.py --repeats 5
    python benchmarks/bench_precision.py --ckpt results/fmnist-precision/runs/baseline_bf16-s0   # a trained flow
    python benchmarks/bench_precision.py --device cuda --samples 100 1000   # on a GPU (bench_precision in gpu_check.sh)
    python benchmarks/bench_precision.py --ckpt RUN --skip-train --coarse-tols 0.01 0.03 0.1   # Jacobi's bf16 tolerance

Times are medians of --repeats calls, fp32 and bf16 alternating call by call (so that load on a shared machine
hits both alike), after one warm-up call each; on a GPU each call ends with a synchronize. Ratios are bf16 / fp32
(< 1: bf16 is faster). Sampling also prints how far the bf16 images lie from the float32 sequential sampler's on the
same z (max |dx| in [-1, 1] units; one uint8 level is 0.0078); on the CPU the sequential sampler stays float32 under
bf16 by design (docs/DESIGN.md section 13), on a GPU it runs in bf16. Without --ckpt the flows are random with a
perturbed proj_out (the arithmetic of a trained flow, not its values): give a trained run for the drift figures
that matter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from common import trained_like
from rrepa.align.head import AlignHead
from rrepa.eval.classify import class_log_likelihoods, one_step_scores
from rrepa.flow.config import FlowConfig
from rrepa.flow.jacobi import Jacobi
from rrepa.flow.sample import draw
from rrepa.flow.tarflow import TARFlow
from rrepa.precision import autocast, cpu_has_native_bf16, native_bf16
from rrepa.training.config import preset_model, resolve
from rrepa.training.objective import Objective
from rrepa.training.run import load_run

BOTH = ("fp32", "bf16")


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, device: str = "cpu") -> dict[str, float]:
    """Median seconds of each call, the calls alternating, after one warm-up each."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(model: TARFlow, batch: int, head: AlignHead | None = None, dim: int = 0,
               device: str = "cpu") -> Callable[[str], None]:
    """One AdamW step of the objective (NLL, plus R-REPA pseudo when head is given) on a random batch."""
    cfg = model.cfg
    objective = Objective(model, head).to(device)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, cfg.in_channels, cfg.image_height, cfg.image_width, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,), generator=g).to(device) if cfg.num_classes else None
    tokens = torch.randn(batch, cfg.num_tokens, dim, generator=g).to(device) if head is not None else None
    hw = cfg.grid if head is not None else None

    def step(precision: str) -> None:
        with autocast(precision, device):
            loss, _ = objective(x + cfg.sigma * torch.randn_like(x), y, 0.1, tokens, hw)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sampling_rows(model: TARFlow, n: int, repeats: int, device: str, coarse_tols: list[float]) -> None:
    """Sequential and Jacobi sampling of n images, fp32 against bf16, and the images' distance to the float32
    sequential sampler's on the same z; one Jacobi row per coarse_tol (the bf16 iterations' tolerance)."""
    cfg = model.cfg
    z = torch.randn(n, cfg.in_channels, cfg.image_height, cfg.image_width,
                    generator=torch.Generator().manual_seed(2)).to(device)
    y = (torch.arange(n) % cfg.num_classes).to(device) if cfg.num_classes else None
    exact = draw(model, z, y)  # float32, sequential: the reference images

    def sample(precision: str, sampler, stats: bool = False):
        with autocast(precision, device):
            return draw(model, z, y, sampler=sampler, return_stats=stats)

    sequential = interleaved({p: (lambda p=p: sample(p, "sequential")) for p in BOTH}, repeats, device)
    drift = (sample("bf16", "sequential") - exact).abs().max().item()
    same = " (float32 on the CPU by design)" if torch.device(device).type == "cpu" else ""
    print(row(f"sample {n}, sequential{same}", sequential, f"bf16 max abs dx {drift:.4f}"), flush=True)
    for coarse_tol in coarse_tols:
        jac = Jacobi(coarse_tol=coarse_tol)
        t = interleaved({p: (lambda p=p, jac=jac: sample(p, jac)) for p in BOTH}, repeats, device)
        (x32, s32), (x16, s16) = (sample(p, jac, stats=True) for p in BOTH)
        print(row(f"sample {n}, jacobi (tol {jac.tol:g}; bf16 to {coarse_tol:g}, then float32)", t,
                  f"max abs dx: fp32 {(x32 - exact).abs().max():.4f}, bf16 {(x16 - exact).abs().max():.4f}; passes "
                  f"per block fp32 {passes(s32)}, bf16 + float32 {passes(s16)}; bf16 jacobi / fp32 sequential "
                  f"{t['bf16'] / sequential['fp32']:.2f}x"), flush=True)


def passes(stats) -> str:
    """Transformer passes per block, in generation order, e.g. "28/9/10/7"."""
    return "/".join(f"{p:.0f}" for p in stats.passes())


def row(name: str, t: dict[str, float], extra: str = "") -> str:
    return f"| {name} | {1000 * t['fp32']:.1f} | {1000 * t['bf16']:.1f} | {t['bf16'] / t['fp32']:.2f}x | {extra} |"


def training_rows(batch_size: int, skip_large: bool, repeats: int, device: str) -> None:
    """The training steps' rows: the Fashion-MNIST models (and, unless skip_large, two larger ones), then R-REPA."""
    shapes: list[tuple[str, FlowConfig, int]] = [
        (f"train step, fmnist (batch {batch_size})", preset_model("fmnist"), batch_size),
        (f"train step, fmnist-latent (batch {batch_size})", preset_model("fmnist-latent"), batch_size)]
    if not skip_large:
        shapes += [("train step, 32 x 32 x 3 patch 2, width 256, 4 x 2 (batch 32)",
                    FlowConfig(in_channels=3, image_height=32, image_width=32, patch_size=2, width=256,
                               num_blocks=4, layers_per_block=2, num_classes=10), 32),
                   ("train step, width 768, 64 x 64 patch 2, 2 x 1 layers (batch 4)",
                    preset_model("imagenet64", num_blocks=2, layers_per_block=1), 4)]
    for name, cfg, batch in shapes:
        step = train_step(trained_like(cfg), batch, device=device)
        print(row(name, interleaved({p: (lambda p=p, step=step: step(p)) for p in BOTH}, repeats, device)),
              flush=True)
    cfg = resolve("fmnist", overrides=["align.enabled=true"])
    model = trained_like(cfg.model)
    head = AlignHead(cfg.align, cfg.model.width, 128)
    step = train_step(model, batch_size, head, 128, device)
    print(row(f"R-REPA (pseudo) step, fmnist (batch {batch_size})",
              interleaved({p: (lambda p=p: step(p)) for p in BOTH}, repeats, device)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128, help="training batch of the Fashion-MNIST models")
    ap.add_argument("--samples", type=int, nargs="+", default=[100], help="images drawn by the sampling rows "
                                                                           "(one pair of rows per number)")
    ap.add_argument("--ckpt", help="a trained fmnist run (folder, ckpt or safetensors) for the classifier and "
                                   "sampling rows (default: a random fmnist-shaped flow)")
    ap.add_argument("--skip-large", action="store_true", help="leave out the 32 x 32 and width-768 training rows")
    ap.add_argument("--skip-train", action="store_true", help="leave out every training row")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--coarse-tols", type=float, nargs="+", default=[Jacobi.coarse_tol],
                    help="the Jacobi rows' bf16 tolerances (Jacobi.coarse_tol; default: its default), a row each")
    args = ap.parse_args()
    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_precision.py: --device cuda needs a CUDA GPU (torch.cuda.is_available() is false); "
                         "leave --device out to measure the CPU")
    torch.manual_seed(0)
    if torch.device(device).type == "cuda":
        print(f"{torch.cuda.get_device_name()}; native bf16: {native_bf16(device)}; torch {torch.__version__}\n")
    else:
        print(f"{torch.get_num_threads()} thread(s); native bf16 on this CPU: {cpu_has_native_bf16()}; "
              f"torch {torch.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print("| what | fp32 ms | bf16 ms | bf16 / fp32 | notes |")
    print("|---|---|---|---|---|")

    if not args.skip_train:
        training_rows(args.batch, args.skip_large, args.repeats, device)

    # ---- classifiers and sampling, on a trained flow when given -------------------------------
    if args.ckpt:
        model, info = load_run(args.ckpt, "ema", device)
        what = f"{args.ckpt} (EMA, step {info['step']})"
    else:
        model, what = trained_like(preset_model("fmnist"), class_embed_std=0.02), "a random fmnist-shaped flow"
    model = model.to(device).requires_grad_(False)
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(64, cfg.in_channels, cfg.image_height, cfg.image_width, generator=g) * 2 - 1).to(device)

    def classify(fn, precision):
        with autocast(precision, device):
            return fn(model, x).float()

    for name, fn in (("one-step classifier, 64 images", one_step_scores),
                     ("Bayes classifier, 64 images x 10 classes", class_log_likelihoods)):
        t = interleaved({p: (lambda p=p, fn=fn: classify(fn, p)) for p in BOTH}, args.repeats, device)
        ref, low = classify(fn, "fp32"), classify(fn, "bf16")
        agree = (ref.argmax(1) == low.argmax(1)).float().mean().item()
        print(row(name, t, f"argmax agreement {100 * agree:.1f} %"), flush=True)

    for n in args.samples:
        sampling_rows(model, n, args.repeats, device, args.coarse_tols)
    print(f"\nclassifiers and sampling on {what}")


if __name__ == "__main__":
    main()
