"""`rrepa sample` (PNG grids and ADM npz, sharded under torchrun) and `rrepa bpd` (bits/dim of a split)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rrepa import distributed
from rrepa.cli.options import (
    add_data_dir,
    add_device,
    add_overwrite,
    add_precision,
    add_vae,
    finite_float,
    precision_scope,
    refuse_existing,
)
from rrepa.data.latent_run import ImageSpace, data_config, eval_dataset, is_latent, load_run_vae, with_vae
from rrepa.eval.bpd import describe_bpd, evaluate_bpd
from rrepa.flow.jacobi import Jacobi, as_sampler
from rrepa.flow.sample import generate, save_grid, save_npz
from rrepa.training.run import load_run
from rrepa.utils import atomic_write, drop_diverged, finite_rows


def cmd_sample(args: argparse.Namespace) -> None:
    """Draw samples from a checkpoint: PNG grid and/or ADM-layout npz; sharded under torchrun."""
    formats = set(args.format.split(","))
    if not formats <= {"png", "npz"}:
        raise ValueError(f"--format takes png, npz or png,npz, got {args.format!r}")
    options = {k: v for k, v in (("tol", args.tol), ("chunk", args.chunk), ("max_iters", args.max_iters),
                                 ("sequential_blocks", args.sequential_blocks)) if v is not None}
    sampler = as_sampler(args.sampler)
    if sampler is None and options:
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise ValueError(f"{flags}: only for --sampler jacobi")
    sampler = None if sampler is None else Jacobi(**options)
    ckpt = Path(args.ckpt)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / f"samples-seed{args.seed}"
    refuse_existing(args, *(out.with_suffix(f".{f}") for f in sorted(formats)))  # before drawing anything
    with distributed.process_group(args.device) as d:
        model, info = load_run(args.ckpt, args.weights, d.device)
        info = with_vae(info, args.vae)
        T = model.cfg.num_blocks
        if sampler is not None and not 0 <= sampler.sequential_blocks <= T:
            raise ValueError(f"--sequential-blocks must lie in 0..{T} for this {T}-block model, got "
                             f"{sampler.sequential_blocks} ({T}: every block sequential, as --sampler sequential)")
        # A sample that diverges (NaN or inf) must not end the run in the denoising step's input check: the finite
        # ones are written and the diverged ones reported below. The labels are built here, in range.
        model.validate_inputs = False
        space = ImageSpace.for_run(info["config"], d.device)  # a latent run: its VAE decodes the samples
        K = model.cfg.num_classes
        if args.class_label is not None and not 0 <= args.class_label < max(K, 1):
            raise ValueError(f"--class must lie in [0, {K}) for this model" if K else
                             "--class was given but the model is unconditional")
        if args.num_samples < 1 or args.batch_size < 1:
            raise ValueError("--num-samples and --batch-size must be >= 1")
        if K == 0:
            labels = None
        elif args.class_label is not None:
            labels = torch.full((args.num_samples,), args.class_label, dtype=torch.int64)
        else:
            labels = torch.arange(args.num_samples) % K  # one column per class in the grid
        scope, precision = precision_scope(args, d.device, info)
        with scope:
            mine = generate(model, labels, args.num_samples, args.batch_size, args.seed, d, guidance=args.guidance,
                            anneal=args.anneal, attn_temp=args.attn_temp, temperature=args.temperature,
                            denoise=not args.no_denoise, sampler=sampler or "sequential", return_stats=True,
                            to_images=space)
        parts: dict = {}
        stats = None
        for shard, shard_stats in distributed.gather_objects(mine, d):
            parts.update(shard)
            if shard_stats is not None:
                stats = shard_stats if stats is None else stats.merge(shard_stats)
        if not d.is_main:
            return
        if sampler is not None:
            print(f"jacobi sampler ({sampler}), passes of the transformer per block and batch "
                  f"(sequential: {model.cfg.num_tokens - 1}):\n{stats.summary()}")
        x = torch.cat([parts[j] for j in sorted(parts)])
        finite, finite_labels, diverged = drop_diverged(x, labels)
        if diverged and not len(finite):
            raise ValueError(f"{diverged}: the model (or sampler) diverged on every sample, nothing was written; "
                             f"try another checkpoint, a lower --guidance or --temperature, or --sampler sequential")
        if diverged:
            print(f"warning: {diverged}", file=sys.stderr)
        if "npz" in formats:
            save_npz(out.with_suffix(".npz"), finite, finite_labels)
            N, C, H, W = finite.shape
            print(f"wrote {out.with_suffix('.npz')}: arr_0 ({N}, {H}, {W}, {C}) uint8"
                  f"{', labels' if labels is not None else ''}{' (decoded latents)' if space.latent else ''}, "
                  f"drawn in {precision}{f' ({len(x) - N} diverged samples left out)' if diverged else ''}")
        if "png" in formats:
            # The grid keeps every sample in its place (a column per class); a diverged one is a black tile.
            bad = ~finite_rows(x)
            save_grid(x.masked_fill(bad[:, None, None, None], -1.0), out.with_suffix(".png"),
                      K if K and args.class_label is None else 10)
            print(f"wrote {out.with_suffix('.png')}{' (diverged samples as black tiles)' if diverged else ''}")


def cmd_bpd(args: argparse.Namespace) -> None:
    """Bits/dim of a dataset split with uniform dequantization; the null label unless --conditional."""
    if args.batch_size < 1 or args.max_images is not None and args.max_images < 1:
        raise ValueError(f"need --batch-size >= 1 and --max-images >= 1 (or none: the whole split), got "
                         f"{args.batch_size} and {args.max_images}")
    if args.json:
        refuse_existing(args, Path(args.json), flag="--json")
    with distributed.process_group(args.device) as d:
        model, info = load_run(args.ckpt, args.weights, d.device)
        info = with_vae(info, args.vae)
        data = data_config(info["config"].get("data", {}))
        if args.data_dir:
            data.path = args.data_dir
        if args.conditional and args.unconditional:
            raise ValueError("give --conditional or --unconditional (the default), not both")
        # A latent run: the split's latents (cached on first use) under the training noise, per latent dimension.
        vae = load_run_vae(data, d.device) if is_latent(data) else None
        dataset = eval_dataset(data, args.split, vae, device=d.device, progress=d.is_main)
        scope, precision = precision_scope(args, d.device, info)
        with scope:
            result = evaluate_bpd(model, dataset, args.batch_size, d, seed=args.seed,
                                  conditional=args.conditional, max_images=args.max_images)
        result.update(dtype=precision, split=args.split, weights=args.weights, step=info["step"], ckpt=info["file"],
                      # None: unknown (weights without a run config); runs from before the option did not dequantize
                      train_dequantize=(info["config"]["train"].get("dequantize", False)
                                        if "train" in info["config"] else None))
        if d.is_main:
            if vae is not None:
                print(describe_bpd(result), file=sys.stderr)
            print(json.dumps(result))
            if args.json:
                atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw samples from a checkpoint (PNG grid and/or ADM npz)")
    p.add_argument("--ckpt", required=True, help="run folder, ckpt-*.pt or .safetensors")
    # Not --n: torchrun would take that for an abbreviation of its own --nnodes / --nproc-per-node.
    p.add_argument("--num-samples", type=int, default=100, help="number of samples")
    p.add_argument("--batch-size", type=int, default=100, help="samples per batch")
    p.add_argument("--seed", type=int, default=0, help="same seed, same samples (whatever the process count)")
    p.add_argument("--class", dest="class_label", type=int, help="draw only this class (default: cycle through all)")
    p.add_argument("--guidance", type=finite_float, default=0.0, help="guidance weight w (0 = none)")
    p.add_argument("--anneal", action="store_true", help="ramp the guidance linearly along the token index")
    p.add_argument("--attn-temp", type=finite_float, default=1.0,
                   help="attention temperature of the unconditional branch")
    p.add_argument("--temperature", type=finite_float, default=1.0,
                   help="std of the prior noise z (1 = the model's distribution; 0.8: cleaner, less varied images)")
    p.add_argument("--no-denoise", action="store_true", help="skip the one-step (Tweedie) denoising")
    p.add_argument("--sampler", default="sequential",
                   help="sequential (one token per transformer pass, KV cache) or jacobi (parallel iterations, "
                        "chunked; prints its iterations per block)")
    jacobi = Jacobi()
    p.add_argument("--tol", type=finite_float,
                   help=f"jacobi: a chunk stops when max |dx| < TOL (default {jacobi.tol:g}; 0 = exact)")
    p.add_argument("--chunk", type=int, help="jacobi: tokens per chunk (default "
                   f"{jacobi.chunk or 'None: a whole block at once'})")
    p.add_argument("--max-iters", type=int, help="jacobi: iterations per chunk at most (default "
                   f"{jacobi.max_iters or 'None: the chunk length, where it is exact'})")
    p.add_argument("--sequential-blocks", type=int, help="jacobi: invert the first this many generated blocks "
                   f"sequentially (default {jacobi.sequential_blocks})")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which weights of a checkpoint")
    p.add_argument("--format", default="png,npz", help="png, npz or png,npz")
    p.add_argument("--out", help="output path without extension (default <run>/samples-seed<seed>)")
    add_overwrite(p, "samples file")
    add_device(p)
    add_vae(p)
    add_precision(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bpd", help="bits/dim of a dataset split (uniform dequantization, null label)",
                       description="Bits/dim with uniform dequantization and, by default, the null label: "
                                   "TARFlow's protocol, comparable with published figures for models trained with "
                                   "train.dequantize=true and model.sigma=0. The JSON names the protocol and the "
                                   "model's training noise sigma. A latent run (data.vae) reports nats and bits per "
                                   "LATENT dimension of the split's VAE latents under the training noise, without "
                                   "dequantization (\"unit\": \"bits per latent dimension\").")
    p.add_argument("--ckpt", required=True, help="run folder, ckpt-*.pt or .safetensors")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--max-images", type=int, help="only the first this many images")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which weights of a checkpoint")
    p.add_argument("--conditional", action="store_true", help="use the true labels instead of the null label")
    p.add_argument("--unconditional", action="store_true", help="the null label (the default; kept for old scripts)")
    add_data_dir(p, help="dataset location (default: the run's data.path)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dequantization noise")
    p.add_argument("--json", help="also write the result to this JSON file")
    add_overwrite(p, "--json file")
    add_device(p)
    add_vae(p)
    add_precision(p)
    p.set_defaults(func=cmd_bpd)
