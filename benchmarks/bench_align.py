"""Cost and gradient fidelity of the R-REPA reverse paths (naive, pseudo, jacobi-K) on a 256-token TARFlow.

Model (--scale bench, default): 32 x 32 x 3 images, patch 2 (N = 256 tokens of D = 12), T = 8 blocks of L = 2
layers, width 128, head_dim 64, 10 classes; aligned at (block 7, layer 2) and (block 8, layer 2), the last layer of
the last two blocks (see docs/DESIGN.md section 2). --scale paper keeps the 256 tokens but takes the paper's
transformer (width 768, L = 8 layers per block, as the imagenet64 preset) aligned where the imagenet64 run preset
aligns (layer 6 of blocks 7 and 8): a GPU size, refused on a CPU (there one naive call took 67 s at batch 1, and
the CPU memory profiler's event log outgrew 24 GiB). Default batch 8. Everything is
measured in ONE run on one device (--device, CUDA when available), so the ratios are comparable; absolute times
depend on the machine and its load (printed).

Tables
  1. One alignment step: the alignment loss (features by the reverse path, read from the training forward's
     FlowOutput, which is computed with gradients and kept alive outside the measured region, as in training)
     plus its backward, for naive, pseudo and jacobi-K (K = 1, 2, 4), at each --batch. Time: the MINIMUM over
     --repeats calls after a warm-up, the paths interleaved round by round (pseudo, jacobi-1, jacobi-2, jacobi-4,
     pseudo, ...), so that load from other processes on a shared machine hits every path alike and the minimum
     drops its spikes; naive is timed ONCE (it is the slow one: at batch 8 and N = 256 it took 2.7 s with 1 CPU
     thread). Time and memory are printed as ratios to naive, next to the paper's pseudo-reverse figures (~50x
     faster than naive, ~50 % of its memory). The FLOPs of each path (torch.utils.flop_counter: matrix products
     and attention, forward and backward) and the rate they run at show where the speed-up comes from: naive and
     pseudo do the SAME arithmetic; naive does it in 2 (N - 1) sequential one-token steps (the reversed blocks),
     pseudo in a few parallel passes. The speed-up is therefore the sequential steps' loss of efficiency: modest
     where small matrix products run near full rate (a CPU core), large where each step is bound by kernel-launch
     latency (a GPU). The same is measured for the reverse path alone (the loss a fixed linear functional of the
     features: the projector and the cosine, which cost the same on every path, left out). A summary over the
     batches follows.
  2. Cosine similarity of the flow's gradient (all flow parameters; block 7 only; block 8 only) of pseudo,
     jacobi-K, detach (D-REPA, for contrast) and, with --exact-check (always with --quick), jacobi-N (exact: a
     check of the naive reference; 2N block passes kept in the graph: ~35 s and ~2 GiB per sample at N = 256,
     so pair it with a small --batch) against naive, on a TRAINED model: --ckpt (run folder, .pt training
     checkpoint or .safetensors, loaded with rrepa.training.run.load_run; aligned at the last layer of its last
     two blocks), otherwise the benchmark's own model after a short NLL training inside this script
     (--train-steps 200 AdamW steps at lr 1e-3, batch --train-batch 4: ~75 s with 1 thread on a shared 2-core
     machine) on synthetic structured images (oriented coloured gratings, one orientation/frequency/colour per
     class, plus a random Gaussian blob; sigma = 0.05 noise), so that proj_out is far from its zero
     initialisation (at zero proj_out every path gives the same gradient). Float32, no autocast, first --batch.
     The projector (fixed random init) and the target tokens (fixed standard normal, on the flow's 16 x 16 grid)
     are constants: the encoder is irrelevant for gradient agreement. The projector's own gradient is left out
     of the cosine: the feature VALUES are the same on every path, so it is identical by construction.
     On a trained model the truncated Neumann series need not approach naive monotonically in K (J is
     nilpotent but far from normal); only K = N is exact.
  3. An R-REPA training step (forward, NLL + 0.5 x pseudo alignment with cached target tokens, i.e. no encoder
     call, backward, grad clipping, AdamW on flow + projector) against a baseline NLL-only step (AdamW on the
     flow): time ratio and memory ratio, at the first --batch.

--bf16 runs tables 1 and 3 under bfloat16 autocast (as `train.precision=bf16` does; the alignment loss stays
float32). --tables picks the tables (e.g. --tables 1 3 at --scale paper, where the in-script training of table 2
would take long).

Peak memory. CUDA: torch.cuda.max_memory_allocated during the call minus the allocation at its start. CPU:
torch's allocator events. Each measured call runs once more under `torch.profiler.profile(profile_memory=True)`,
which records every tensor allocation and free of the CPU allocator with its size and timestamp (the raw kineto
"[memory]" events); their running sum, in time order, peaks at the largest number of tensor bytes the call held
at once ABOVE what was live when it started (the CPU analogue of torch.cuda.max_memory_allocated, counted from
the start of the call; it includes the gradient buffers the backward allocates). It is exact and deterministic,
unlike the process RSS, which glibc's heap reuse, fragmentation and the first-touch of freed pages make coarse
and history-dependent. It counts tensor bytes only (no allocator overhead or Python objects). The profiled run
is separate from the timed runs, so profiling overhead does not enter the times. Table 3 adds the tensors live
at the start of a step (parameters, AdamW state, the batch and cached targets) to give the total.

Projector: REPA's 3-layer MLP with hidden width --projector-hidden (default 512 at --scale bench: REPA's 2048
is for a width 1152 flow; 2048 on a width 128 flow would make the projector, not the reverse path, dominate the
step; 2048 at --scale paper) and output 768 (DINOv2-B's width).

    python benchmarks/bench_align.py [--batch 8 [4 ...]] [--threads 2] [--repeats 3] [--ckpt RUN] [--quick]
    python benchmarks/bench_align.py --device cuda --bf16 --scale paper --tables 1 3 --batch 8 16

Threads (CPU): when another process is busy on the same cores, use --threads 1. torch's OpenMP threads spin at
their barriers and collapse when a core is taken away: on a 2-core machine shared with one other busy process,
--quick took 130 s with 2 threads and 7 s with 1, and single paths were timed 3x apart between identical calls.
--quick therefore defaults to 1 thread.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from rrepa.align.head import AlignConfig, AlignHead
from rrepa.align.reverse import detach_features, jacobi_reverse, naive_reverse, pseudo_reverse
from rrepa.distributed import resolve_device
from rrepa.flow.config import FlowConfig, FlowOutput, Position
from rrepa.flow.tarflow import TARFlow
from rrepa.training.run import load_run

CFG = FlowConfig(in_channels=3, image_height=32, image_width=32, patch_size=2, width=128, num_blocks=8,
                 layers_per_block=2, head_dim=64, num_classes=10)
PAPER_CFG = replace(CFG, width=768, layers_per_block=8)  # the imagenet64 preset's transformer, 256 tokens
PAPER_LAYER = 6  # the imagenet64 run preset aligns layer 6 of blocks 7 and 8
QUICK_CFG = replace(CFG, image_height=16, image_width=16, width=64, head_dim=32, num_blocks=4)
ENC_DIM = 768  # DINOv2-B patch-token width
PAPER_SPEEDUP, PAPER_MEMORY = 50.0, 0.5  # the paper's pseudo-reverse vs naive: ~50x faster, ~50 % memory
JACOBI_KS = (1, 2, 4)


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that wall time covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                      before: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Minimum wall time (s) of each fn over `repeats` rounds, one call of each fn per round (round-robin);
    before() runs untimed ahead of each call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            before()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def peak_bytes(fn: Callable[[], object], device: torch.device, before: Callable[[], None] = lambda: None) -> int:
    """Peak tensor bytes held by fn() above the level at its start (see the docstring: CUDA's allocator
    statistics, or the CPU allocator's events)."""
    before()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for _, n in sorted(events, key=lambda e: e[0]):
        level += n
        peak = max(peak, level)
    return peak


def flops(fn: Callable[[], object], before: Callable[[], None] = lambda: None) -> int:
    """Floating-point operations of fn() (matrix products and attention, forward and backward)."""
    before()
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
            zero: Callable[[], None]) -> dict[str, tuple[float, int, int]]:
    """{name: (time s, peak bytes, FLOPs)} of each fn, zero() run ahead of every call. "naive", the slow one, is
    timed once; the others after a warm-up, as the minimum of `repeats` interleaved rounds."""
    fast = {m: fn for m, fn in fns.items() if m != "naive"}
    for fn in fast.values():  # warm-up
        zero()
        fn()
    times = timed_interleaved(fast, repeats, device, zero)
    times.update(timed_interleaved({"naive": fns["naive"]}, 1, device, zero))
    rows = {m: (times[m], peak_bytes(fns[m], device, zero), flops(fns[m], zero)) for m in fns}
    zero()
    return rows


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among tensors."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Data, model, training
# --------------------------------------------------------------------------------------------


def synthetic_batch(cfg: FlowConfig, n: int, g: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """Structured images in [-1, 1]: a coloured grating whose orientation, frequency and colour depend on the
    class, with a random phase, plus a Gaussian blob of random position, size and colour."""
    K = max(cfg.num_classes, 1)
    y = torch.randint(0, K, (n,), generator=g)
    palette = torch.Generator().manual_seed(1234)
    colours = torch.rand(K, cfg.in_channels, generator=palette) * 2 - 1
    H, W = cfg.image_height, cfg.image_width
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    theta = (math.pi * y / K)[:, None, None]
    freq = (1.5 + (y % 3))[:, None, None].float()
    phase = (torch.rand(n, generator=g) * 2 * math.pi)[:, None, None]
    grating = torch.sin(freq * math.pi * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    centre = torch.rand(n, 2, generator=g) * 1.4 - 0.7
    radius = torch.rand(n, generator=g) * 0.3 + 0.15
    d2 = (xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2
    blob = torch.exp(-d2 / (2 * radius[:, None, None] ** 2))
    blob_colour = torch.rand(n, cfg.in_channels, generator=g) * 2 - 1
    x = 0.6 * grating[:, None] * colours[y][:, :, None, None] + 0.5 * blob[:, None] * blob_colour[:, :, None, None]
    return x.clamp(-1, 1), (y if cfg.num_classes else None)


def on(device: torch.device, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return x.to(device), (None if y is None else y.to(device))


def train_briefly(model: TARFlow, steps: int, batch: int, device: torch.device,
                  seed: int = 0) -> tuple[float, float, float]:
    """NLL training on synthetic_batch data (+ sigma noise), float32. Returns (first NLL, last NLL) in bits/dim
    (per-dim NLL / ln 2, dequantisation term left out) and the wall time."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = synthetic_batch(cfg, batch, g)
        x, y = on(device, x + cfg.sigma * torch.randn(x.shape, generator=g), y)
        loss = model.nll(x, y, label_drop=0.1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item() / math.log(2))
    k = max(1, steps // 10)
    return statistics.mean(losses[:k]), statistics.mean(losses[-k:]), time.perf_counter() - t0


def proj_out_rms(model: TARFlow, blocks: list[int]) -> str:
    return ", ".join(f"block {t}: {model.blocks[t - 1].proj_out.weight.pow(2).mean().sqrt().item():.3g}"
                     for t in blocks)


def make_head(model: TARFlow, positions: list[Position], hidden: int, seed: int = 1) -> AlignHead:
    torch.manual_seed(seed)
    head = AlignHead(AlignConfig(positions=positions, projector_hidden=hidden, weight=0.5), model.cfg.width, ENC_DIM)
    return head.to(next(model.parameters()).device)


def table_inputs(model: TARFlow, positions: list[Position], batch: int, hidden: int, seed: int):
    """A table's fixed inputs on the model's device: (device, images x, labels y, target tokens (B, N, ENC_DIM),
    standing in for cached encoder tokens, the projector head, and the generator, to draw more from)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x, y = on(device, *synthetic_batch(model.cfg, batch, g))
    target = torch.randn(batch, model.cfg.num_tokens, ENC_DIM, generator=g).to(device)
    return device, x, y, target, make_head(model, positions, hidden), g


def last_positions(cfg: FlowConfig, layer: int | None = None) -> list[Position]:
    """Layer `layer` (default: the last) of the last two blocks (1-indexed)."""
    T = cfg.num_blocks
    return [(t, layer or cfg.layers(t)) for t in range(max(1, T - 1), T + 1)]


def sequential_steps(cfg: FlowConfig, positions: list[Position]) -> int:
    """One-token steps of the naive reverse: N - 1 for each block from T down to the lowest aligned one."""
    return (cfg.num_blocks - min(t for t, _ in positions) + 1) * (cfg.num_tokens - 1)


# --------------------------------------------------------------------------------------------
# The alignment paths
# --------------------------------------------------------------------------------------------


def features(method: str, model: TARFlow, out: FlowOutput, positions: list[Position]) -> dict[Position, Tensor]:
    if method == "naive":
        return naive_reverse(model, out, positions).features
    if method == "pseudo":
        return pseudo_reverse(model, out, positions).features
    if method == "detach":
        return detach_features(model, out, positions)
    if method.startswith("jacobi-"):
        return jacobi_reverse(model, out, positions, int(method.split("-")[1])).features
    raise ValueError(method)


def align_step(method: str, model: TARFlow, head: AlignHead | None, out: FlowOutput, target: Tensor,
               positions: list[Position], bf16: bool = False) -> None:
    """The alignment loss by `method` and its backward. head None: the reverse path alone, the loss a fixed
    linear functional of the features, sum(h * target[..., :width]) (no projector, no cosine)."""
    with autocast(target.device, bf16):
        feats = features(method, model, out, positions)
        if head is None:
            loss = sum((h.float() * target[..., :h.shape[-1]]).sum() for h in feats.values())
        else:
            loss = head.loss_from_features(feats, target, model.cfg.grid).loss
    loss.backward()


def flow_grads(model: TARFlow) -> dict[str, Tensor]:
    """Flattened float64 gradient of every flow parameter, on the CPU (zeros where the path gives none)."""
    return {n: p.grad.detach().flatten().double().cpu() if p.grad is not None
            else torch.zeros(p.numel(), dtype=torch.float64) for n, p in model.named_parameters()}


def cosine(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 or nb == 0:
        return float("nan")
    return float((a @ b).item() / (na * nb))


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def table_cost(model: TARFlow, positions: list[Position], batch: int, repeats: int, hidden: int,
               bf16: bool) -> dict:
    cfg = model.cfg
    device, x, y, target, head, _ = table_inputs(model, positions, batch, hidden, seed=10)
    with autocast(device, bf16):
        out = model(x, y)  # the training forward: its graph stays alive, as during a training step
    params = list(model.parameters()) + list(head.parameters())

    def zero() -> None:
        for p in params:
            p.grad = None

    methods = ["naive", "pseudo", *[f"jacobi-{k}" for k in JACOBI_KS]]
    rows = measure({m: (lambda m=m: align_step(m, model, head, out, target, positions, bf16)) for m in methods},
                   repeats, device, zero)
    t0, m0, f0 = rows["naive"]
    steps = sequential_steps(cfg, positions)
    print(f"### 1. One alignment step (loss + backward), batch {batch}, positions {positions}"
          f"{', bf16 autocast' if bf16 else ''}; time: min of {repeats} interleaved calls (naive: 1 call)\n")
    print("| reverse path | time (s) | time / naive | speed-up vs naive | peak memory (MiB) | memory / naive "
          "| GFLOP | GFLOP / naive | GFLOP/s | timed calls |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, (t, mem, fl) in rows.items():
        print(f"| {m} | {t:.3f} | {t / t0:.4f} | {t0 / t:.1f}x | {mib(mem)} | {mem / m0:.3f} | {fl / 1e9:.1f} | "
              f"{fl / f0:.3f} | {fl / t / 1e9:.1f} | {1 if m == 'naive' else repeats} |")
    print(f"\nNaive runs {steps} sequential one-token steps (forward and backward): {1e3 * t0 / steps:.2f} ms "
          f"per step.\n")

    # The same without the projector and the cosine, which cost the same on every path: the reverse path alone.
    bare_rows = measure({m: (lambda m=m: align_step(m, model, None, out, target, positions, bf16))
                         for m in ("naive", "pseudo")}, repeats, device, zero)
    (tn, mn, _), (tb, mb, _) = bare_rows["naive"], bare_rows["pseudo"]
    print("Reverse path alone (the loss a fixed linear functional of the features: no projector, no cosine):\n")
    print("| reverse path | time (s) | speed-up vs naive | peak memory (MiB) | memory / naive | GFLOP | GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for m, (t, mem, fl) in bare_rows.items():
        print(f"| {m} | {t:.3f} | {tn / t:.1f}x | {mib(mem)} | {mem / mn:.3f} | {fl / 1e9:.1f} | {fl / t / 1e9:.1f} |")
    tp, mp, _ = rows["pseudo"]
    print(f"\n| pseudo vs naive | speed-up | memory |\n|---|---|---|\n"
          f"| paper (its ImageNet setting, GPU) | ~{PAPER_SPEEDUP:.0f}x | ~{PAPER_MEMORY:.0%} |\n"
          f"| this run ({device.type}, N = {cfg.num_tokens}, batch {batch}): alignment step | {t0 / tp:.1f}x | "
          f"{mp / m0:.1%} |\n"
          f"| this run ({device.type}, N = {cfg.num_tokens}, batch {batch}): reverse path alone | {tn / tb:.1f}x | "
          f"{mb / mn:.1%} |\n", flush=True)
    rows["bare"] = bare_rows
    return rows


def table_summary(results: dict[int, dict], device: torch.device) -> None:
    print(f"### 1b. Pseudo vs naive across batches ({device.type})\n")
    print("| batch | naive (s) | pseudo (s) | speed-up | memory / naive | naive GFLOP/s | pseudo GFLOP/s | "
          "reverse path alone: speed-up | memory / naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, rows in results.items():
        (tn, mn, fn), (tp, mp, fp) = rows["naive"], rows["pseudo"]
        (bn, bmn, _), (bp, bmp, _) = rows["bare"]["naive"], rows["bare"]["pseudo"]
        print(f"| {batch} | {tn:.3f} | {tp:.3f} | {tn / tp:.1f}x | {mp / mn:.1%} | {fn / tn / 1e9:.1f} | "
              f"{fp / tp / 1e9:.1f} | {bn / bp:.1f}x | {bmp / bmn:.1%} |")
    print(flush=True)


def table_grads(model: TARFlow, positions: list[Position], batch: int, hidden: int, source: str,
                exact_check: bool) -> None:
    cfg = model.cfg
    device, x, y, target, head, _ = table_inputs(model, positions, batch, hidden, seed=20)
    out = model(x, y)
    blocks = sorted({t for t, _ in positions})
    exact = [f"jacobi-{cfg.num_tokens}"] if exact_check else []
    methods = ["naive", "pseudo", *[f"jacobi-{k}" for k in JACOBI_KS], *exact, "detach"]
    grads = {}
    for m in methods:
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        align_step(m, model, head, out, target, positions)
        grads[m] = flow_grads(model)
    model.zero_grad(set_to_none=True)
    names = list(grads["naive"])

    def flat(m: str, prefix: str = "") -> Tensor:
        return torch.cat([grads[m][n] for n in names if n.startswith(prefix)])

    print(f"### 2. Gradient agreement with naive, {source}\n")
    print(f"Batch {batch}, positions {positions}; proj_out weight RMS: {proj_out_rms(model, blocks)}; "
          f"fixed random projector and targets; flow parameters only; float32.\n")
    cols = " | ".join(f"cos, block {t}" for t in blocks)
    print(f"| reverse path | cos, all flow params | {cols} | rel. error ||g - g_naive|| / ||g_naive|| |")
    print("|---|---|" + "---|" * len(blocks) + "---|")
    ref = flat("naive")
    for m in methods[1:]:
        per = " | ".join(f"{cosine(flat(m, f'blocks.{t - 1}.'), flat('naive', f'blocks.{t - 1}.')):.6f}"
                         for t in blocks)
        rel = (flat(m) - ref).norm().item() / ref.norm().item()
        label = f"{m} (exact, K = N)" if m == f"jacobi-{cfg.num_tokens}" else m
        print(f"| {label} | {cosine(flat(m), ref):.6f} | {per} | {rel:.3g} |")
    print(flush=True)


def table_train_step(model: TARFlow, positions: list[Position], batch: int, repeats: int, hidden: int,
                     bf16: bool) -> None:
    cfg = model.cfg
    device, x, y, target, head, g = table_inputs(model, positions, batch, hidden, seed=30)

    def adamw(params: list) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.95), weight_decay=1e-4)

    opt_base = adamw(list(model.parameters()))
    opt_repa = adamw(list(model.parameters()) + list(head.parameters()))
    drop = (torch.rand(batch, generator=g) < 0.1).to(device)

    def step(align: bool) -> None:
        opt = opt_repa if align else opt_base
        opt.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            out = model(x, y, drop=drop)
            z = out.z.flatten(1).float()
            log_prob = -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi)) + out.logdet
            loss = (-log_prob / cfg.num_dims).mean()
            if align:
                feats = pseudo_reverse(model, out, positions).features
                loss = loss + head.loss_from_features(feats, target, cfg.grid).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
        opt.step()

    kinds = {"NLL only": False, "NLL + R-REPA (pseudo)": True}
    for align in kinds.values():
        step(align)  # warm-up; creates the AdamW state
    times = timed_interleaved({name: (lambda align=align: step(align)) for name, align in kinds.items()}, repeats,
                              device)
    res = {}
    for name, align in kinds.items():
        opt = opt_repa if align else opt_base
        t = times[name]
        opt.zero_grad(set_to_none=True)
        live = tensor_bytes([*opt.param_groups[0]["params"], *(v for s in opt.state.values() for v in s.values()),
                             x, target])
        peak = peak_bytes(lambda align=align: step(align), device)
        res[name] = (t, peak, live)
    (t0, p0, l0) = res["NLL only"]
    print(f"### 3. Training step: NLL + pseudo R-REPA (cached targets) vs NLL only, batch {batch}"
          f"{', bf16 autocast' if bf16 else ''}, min of {repeats} interleaved calls\n")
    print("| step | time (s) | time ratio | images/s | activations + grads peak (MiB) | ratio | total peak incl. "
          "params, AdamW state (MiB) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (t, p, live) in res.items():
        print(f"| {name} | {t:.3f} | {t / t0:.2f} | {batch / t:.1f} | {mib(p)} | {p / p0:.2f} | {mib(p + live)} | "
              f"{(p + live) / (p0 + l0):.2f} |")
    print(flush=True)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[8],
                    help="batch size(s) of table 1; tables 2 and 3 use the first")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast in tables 1 and 3")
    ap.add_argument("--scale", default="bench", choices=("bench", "paper"),
                    help="bench: width 128, 2 layers per block; paper: width 768, 8 layers per block (a GPU size)")
    ap.add_argument("--tables", type=int, nargs="+", default=[1, 2, 3], choices=(1, 2, 3))
    ap.add_argument("--threads", type=int, default=None, help="CPU torch threads (default 2; 1 with --quick)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of every path but naive (timed once)")
    ap.add_argument("--ckpt", default=None, help="trained run folder / .pt / .safetensors for table 2")
    ap.add_argument("--ckpt-weights", default="ema", choices=("ema", "raw"))
    ap.add_argument("--train-steps", type=int, default=200, help="NLL steps of the in-script training (no --ckpt)")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--projector-hidden", type=int, default=None, help="default 512 (bench), 2048 (paper)")
    ap.add_argument("--exact-check", action="store_true",
                    help="also compare jacobi-N (exact) with naive in table 2 (2N block passes; on with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes, a smoke test (< 60 s)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    if args.scale == "paper" and device.type == "cpu" and not args.quick:
        # Measured on the 2-core machine: one naive call took 67 s at batch 1, and the CPU memory profiler's
        # event log grew the process past its 24 GiB.
        ap.error("--scale paper is a GPU size: on a CPU the naive reverse takes minutes and the memory profiler "
                 "needs more than 24 GiB; run it with --device cuda, or use --scale bench on a CPU")
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    cfg = QUICK_CFG if args.quick else PAPER_CFG if args.scale == "paper" else CFG
    batches = [min(b, 4) for b in args.batch] if args.quick else args.batch
    repeats = 1 if args.quick else args.repeats
    train_steps = 10 if args.quick else args.train_steps
    hidden = 64 if args.quick else args.projector_hidden or (2048 if args.scale == "paper" else 512)
    positions = last_positions(cfg, PAPER_LAYER if args.scale == "paper" and not args.quick else None)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}, load average at start {load}"
          f"{' (QUICK smoke test: tiny sizes)' if args.quick else ''}\n")
    print(f"Model: {cfg.image_height}x{cfg.image_width}x{cfg.in_channels}, patch {cfg.patch_size}, "
          f"N = {cfg.num_tokens} tokens, {cfg.num_blocks} blocks x {cfg.layers_per_block} layers, width {cfg.width}, "
          f"{cfg.num_classes} classes; aligned at {positions}; projector {cfg.width}-{hidden}-{hidden}-{ENC_DIM}\n",
          flush=True)

    torch.manual_seed(0)
    model = TARFlow(cfg).to(device)
    if 2 in args.tables and args.ckpt is None:
        first, last, secs = train_briefly(model, train_steps, args.train_batch, device)
        source = (f"benchmark model trained IN THIS SCRIPT for {train_steps} NLL steps (batch {args.train_batch}, "
                  f"{secs:.0f} s) on synthetic structured images: {first:.2f} -> {last:.2f} bits/dim "
                  f"(continuous, without the 8-bit term)")
        print(f"Trained: {source}; proj_out weight RMS {proj_out_rms(model, [t for t, _ in positions])}\n",
              flush=True)
        trained, grad_positions = model, positions
    else:
        if 2 in args.tables:
            trained, info = load_run(args.ckpt, args.ckpt_weights)
            trained = trained.to(device)
            source = f"checkpoint {info['file']} (step {info['step']}, {args.ckpt_weights} weights)"
            grad_positions = last_positions(trained.cfg)
        with torch.no_grad():  # the timed model: values do not change the cost, a non-zero proj_out does no harm
            for block in model.blocks:
                block.proj_out.weight.normal_(0, 0.01)

    if 1 in args.tables:
        results = {b: table_cost(model, positions, b, repeats, hidden, args.bf16) for b in batches}
        if len(results) > 1:
            table_summary(results, device)
    if 2 in args.tables:
        table_grads(trained, grad_positions, batches[0], hidden, source, args.exact_check or args.quick)
    if 3 in args.tables:
        table_train_step(model, positions, batches[0], repeats, hidden, args.bf16)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"Load average at end {load}; whole run {time.perf_counter() - t_start:.0f} s.")


if __name__ == "__main__":
    main()
