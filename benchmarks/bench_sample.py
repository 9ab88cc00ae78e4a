"""Sampling: the sequential KV-cache sampler against the Jacobi sampler, at equal FID.

Two models:
  - fmnist: the default job's checkpoint (--ckpt; `rrepa train` writes it), 49 tokens, 4 blocks x 2 layers. Without
    --ckpt a model of that shape with random weights stands in (iteration counts are then not a trained model's).
  - 32x32x3 p2: 256 tokens, 4 blocks x 2 layers, width 128, random weights (proj_out N(0, 0.2^2 / width)); no FID.
For each sampler (sequential; Jacobi over several tolerances, chunk sizes and numbers of sequential blocks) it prints
  - the wall time of the reverse (the denoising step after it is the same for every sampler and left out) at each
    batch size, min over --repeats rounds timed round-robin (3x as many at batches <= 8, whose calls are short
    and noisier), and the speed-up over sequential in the same run;
  - the sequential transformer passes per block in generation order (sequential: N - 1 each), how many times
    fewer passes than sequential in all (what bounds the speed-up where each pass costs its latency, not its
    FLOPs: small batches, GPUs), and the iterations per chunk (mean and max over the Jacobi blocks' chunks), at the
    largest batch;
  - GFLOP of one reverse at the largest batch (torch.utils.flop_counter) and its ratio to sequential;
  - max |x - x_seq| of the final (denoised) images, same z, at the largest batch;
  - fmnist with --ckpt: the FID of --fid-samples samples (embedded Fashion-MNIST evaluator against fmnist:train;
    labels cycling, no guidance, the noise of `rrepa sample --seed s`) for the samplers marked for it. The
    sequential sampler is run with --seeds seeds: their spread is what "equal FID" is measured against. Jacobi
    runs use seed 0's noise, so their FID is compared with sequential seed 0's.

    python benchmarks/bench_sample.py --ckpt runs/x [--threads 1] [--device cpu|cuda] [--no-fid] [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from cpu import idle_cores
from rrepa.distributed import Dist, resolve_device
from rrepa.eval.reference import reference_stats
from rrepa.eval.samples import build_feature_network, evaluate_samples
from rrepa.flow.config import FlowConfig
from rrepa.flow.jacobi import Jacobi, SampleStats
from rrepa.flow.sample import draw, generate
from rrepa.flow.tarflow import TARFlow
from rrepa.flow.testing import random_flow
from rrepa.training.config import preset_model
from rrepa.training.run import load_run
from rrepa.utils import to_uint8

BIG = FlowConfig(in_channels=3, image_height=32, image_width=32, patch_size=2, width=128, num_blocks=4,
                 layers_per_block=2, num_classes=10)


def samplers(chunks: tuple[int, int]) -> list[tuple[str | Jacobi, bool]]:
    """(sampler, whether its FID is measured): sequential, then Jacobi variants around the default."""
    default = Jacobi()
    return [
        ("sequential", True),
        (Jacobi(tol=1e-2), True),
        (default, True),
        (Jacobi(tol=1e-4), False),
        (Jacobi(tol=1e-3, sequential_blocks=1), False),
        (Jacobi(tol=1e-3, chunk=chunks[0]), False),
        (Jacobi(tol=1e-3, chunk=chunks[0], sequential_blocks=1), False),
        (Jacobi(tol=1e-3, chunk=chunks[1], sequential_blocks=1), True),
    ]


def random_weights(cfg: FlowConfig, scale: float = 0.2) -> TARFlow:
    """A model with random proj_out and class embeddings (a fresh one is the identity: Jacobi would stop at once)."""
    return random_flow(cfg, seed=0, scale=scale, bias=0.05, dtype=torch.float32).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_round_robin(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Min wall time (s) of each fn over `repeats` rounds, one call of each per round: load changes hit all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            t.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def label(sampler: str | Jacobi) -> tuple[str, str, str, str]:
    """(sampler, tol, chunk, sequential blocks) columns."""
    if not isinstance(sampler, Jacobi):
        return "sequential", "—", "1", "all"
    tag = "jacobi (default)" if sampler == Jacobi() else "jacobi"
    chunk = "block" if sampler.chunk is None else str(sampler.chunk)
    return tag, f"{sampler.tol:g}", chunk, str(sampler.sequential_blocks)


def iteration_columns(stats: SampleStats) -> tuple[str, str]:
    passes = " · ".join(f"{p:.0f}" for p in stats.passes())
    its = [k for seq, it in zip(stats.sequential, stats.iters) if not seq for k in it]
    return passes, "—" if not its else f"{sum(its) / len(its):.1f} / {max(its)}"


def fid_of(model: TARFlow, sampler: str | Jacobi, seed: int, n: int, batch: int, net, ref) -> float:

    K = model.cfg.num_classes
    labels = torch.arange(n) % K if K else None
    parts = generate(model, labels, n, batch, seed, Dist(device=next(model.parameters()).device), progress=False,
                     sampler=sampler)
    x = to_uint8(torch.cat([parts[j] for j in sorted(parts)]))
    return float(evaluate_samples(x, net, ref, labels=None if labels is None else labels.numpy())["fid"])


def bench_model(name: str, model: TARFlow, batches: list[int], chunks: tuple[int, int], args, device,
                fid: tuple | None) -> None:
    cfg = model.cfg
    N = cfg.num_tokens
    rows = samplers(chunks)
    B = max(batches)
    g = torch.Generator().manual_seed(0)
    z_big = torch.randn((B, cfg.in_channels, cfg.image_height, cfg.image_width), generator=g).to(device)
    y_big = (torch.arange(B) % cfg.num_classes).to(device) if cfg.num_classes else None

    # One counted call per sampler (also the warm-up): FLOPs, iterations and the final images on the same z.
    flops, stats, images = [], [], []
    for sampler, _ in rows:
        with FlopCounterMode(display=False) as counter:
            _, s = model.reverse(z_big, y_big, args.guidance, sampler=sampler, return_stats=True)
        flops.append(counter.get_total_flops())
        stats.append(s)
        images.append(draw(model, z_big, y_big, args.guidance, sampler=sampler))
    times = {}
    for b in batches:
        z, y = z_big[:b], None if y_big is None else y_big[:b]
        fns = [lambda s=s, z=z, y=y: model.reverse(z, y, args.guidance, sampler=s) for s, _ in rows]
        times[b] = timed_round_robin(fns, args.repeats * (3 if b <= 8 else 1), device)

    fids = [None] * len(rows)
    spread = ""
    if fid is not None:
        net, ref = fid
        seq_fids = [fid_of(model, "sequential", seed, args.fid_samples, args.fid_batch, net, ref)
                    for seed in range(args.seeds)]
        spread = (f"; sequential FID over seeds 0..{args.seeds - 1}: " + ", ".join(f"{f:.3f}" for f in seq_fids)
                  + f" (spread max - min {max(seq_fids) - min(seq_fids):.3f})")
        for i, (sampler, measured) in enumerate(rows):
            if i == 0:
                fids[i] = seq_fids[0]
            elif measured:
                fids[i] = fid_of(model, sampler, 0, args.fid_samples, args.fid_batch, net, ref)

    print(f"\n### {name}: N = {N} tokens, {cfg.num_blocks} blocks x {cfg.layers_per_block} layers, width {cfg.width}, "
          f"guidance {args.guidance:g}{spread}\n")
    head = ["sampler", "tol", "chunk", "seq. blocks", "passes per block", "fewer passes", "iters per chunk mean / max"]
    head += [f"time B={b} (s)" for b in batches] + [f"speed-up B={b}" for b in batches]
    head += [f"GFLOP B={B}", "FLOP ratio", "max abs diff vs seq.", f"FID ({args.fid_samples})"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for i, (sampler, _) in enumerate(rows):
        passes, its = iteration_columns(stats[i])
        cells = [*label(sampler), passes, f"{sum(stats[0].passes()) / sum(stats[i].passes()):.1f}x", its]
        cells += [f"{times[b][i]:.3f}" for b in batches]
        cells += [f"{times[b][0] / times[b][i]:.2f}x" for b in batches]
        cells += [f"{flops[i] / 1e9:.2f}", f"{flops[i] / flops[0]:.1f}x",
                  f"{float((images[i] - images[0]).abs().max()):.1e}",
                  "—" if fids[i] is None else f"{fids[i]:.3f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="the default job's run folder (or its ema.safetensors)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[100, 1], help="batch sizes timed on fmnist")
    ap.add_argument("--batch-256", type=int, nargs="+", default=[8, 1], help="batch sizes timed on the 256-token model")
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--fid-samples", type=int, default=2000)
    ap.add_argument("--fid-batch", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3, help="sequential seeds for the FID spread")
    ap.add_argument("--no-fid", action="store_true")
    ap.add_argument("--models", default="fmnist,256", help="fmnist, 256 or both")
    ap.add_argument("--quick", action="store_true", help="one repeat, 200 FID samples, 2 seeds: a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.fid_samples, args.seeds = 1, 200, 2
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    idle = idle_cores(1.0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, idle cores at the start: {'?' if idle is None else f'{idle:.1f}'}; "
          f"min of {args.repeats} round-robin rounds; Jacobi defaults {Jacobi()}")
    models = args.models.split(",")
    with torch.no_grad():
        if "fmnist" in models:
            fid = None
            if args.ckpt:
                model, _ = load_run(args.ckpt, "ema", device)
                name = f"fmnist, default job's checkpoint ({args.ckpt})"
                if not args.no_fid:

                    net = build_feature_network("fmnist", device=device)
                    fid = (net, reference_stats("fmnist:train", net))
            else:
                model, name = random_weights(preset_model("fmnist")).to(device), "fmnist shape, random weights"
            bench_model(name, model.eval(), args.batch, (16, 8), args, device, fid)
        if "256" in models:
            bench_model("32x32x3 patch 2, random weights", random_weights(BIG).to(device), args.batch_256, (64, 16),
                        args, device, None)


if __name__ == "__main__":
    main()
