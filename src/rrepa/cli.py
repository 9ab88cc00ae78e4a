"""The `rrepa` command line: one sub-command per task, each a thin wrapper over the library."""

from __future__ import annotations

import argparse
import os
import sys

# Idle OpenMP threads sleep instead of spinning. Beside two busy processes on 2 cores a spinning thread burns the
# time slices its partner thread needs: the fmnist step went from 0.59 to 2.47 s (4.2x), against 0.75 to 1.29 s
# with PASSIVE, which costs ~13 % on an idle machine (benchmarks/bench_contention.py). Fewer threads do not help:
# 1 thread beside them took 1.8 s. Only effective before torch is imported, hence here; only a default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cmd_presets(args: argparse.Namespace) -> None:
    """Print every model preset with its shape and parameter count (Markdown table)."""
    from rrepa.flow import PRESETS, TARFlow

    print("| preset | input C x H x W | patch | tokens N | token dim D | blocks x layers | width | classes | params |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cfg in PRESETS.items():
        if args.name and name not in args.name:
            continue
        n = TARFlow(cfg).num_params()
        print(f"| {name} | {cfg.in_channels} x {cfg.image_height} x {cfg.image_width} | {cfg.patch_size} | "
              f"{cfg.num_tokens} | {cfg.token_dim} | {cfg.num_blocks} x {cfg.layers_per_block} | {cfg.width} | "
              f"{cfg.num_classes} | {n / 1e6:.2f} M |")


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert an apple/ml-tarflow checkpoint to rrepa's safetensors weights."""
    from rrepa.convert import convert_file

    cfg = convert_file(args.src, args.dst, in_channels=args.in_channels, head_dim=args.head_dim,
                       sigma=args.sigma)
    print(f"wrote {args.dst}: {cfg}")


def cmd_train(args: argparse.Namespace) -> None:
    """Train a TARFlow: preset + YAML + --set overrides; or continue a run with --resume."""
    from pathlib import Path

    from rrepa.config import RunConfig, load_yaml, merge, parse_overrides, resolve

    # Shorthands for two keys, applied after the other overrides.
    if args.data_dir:
        args.set = [*args.set, f"data.path={args.data_dir}"]
    if args.encoder_weights:
        args.set = [*args.set, f"align.encoder_weights={args.encoder_weights}"]
    if args.resume:
        if args.init_from:
            raise ValueError("--init-from starts a new run from given weights; --resume continues a run with its own")
        if args.preset or args.config:
            raise ValueError("--resume continues the run's own config.yaml; drop --preset/--config "
                             "(--set still applies, e.g. --set train.steps=20000)")
        run = Path(args.resume)
        if run.is_file():
            hint = f" (its run folder is {run.parent})" if run.parent.joinpath("config.yaml").is_file() else ""
            raise ValueError(f"--resume takes a run folder (the --out of `rrepa train`), not the file {run}{hint}")
        if not run.is_dir():
            raise FileNotFoundError(f"--resume {run}: no such run folder")
        stored = run / "config.yaml"
        if not stored.is_file():
            raise FileNotFoundError(f"--resume {run}: not a run folder of `rrepa train` (it has no config.yaml)")
        cfg = merge(RunConfig.from_dict(load_yaml(stored)), parse_overrides(args.set), source="--set")
        cfg.validate()
    else:
        cfg = resolve(args.preset or "fmnist", args.config, args.set)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    from rrepa.train import train

    train(cfg, args.resume or args.out, resume=bool(args.resume), overwrite=args.overwrite,
          init_from=args.init_from, device=args.device)


def cmd_sample(args: argparse.Namespace) -> None:
    """Draw samples from a checkpoint: PNG grid and/or ADM-layout npz; sharded under torchrun."""
    from pathlib import Path

    import torch

    from rrepa import distributed
    from rrepa.checkpoint import load_flow
    from rrepa.flow import Jacobi, as_sampler
    from rrepa.sample import generate, save_grid, save_npz

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
    with distributed.process_group(args.device) as d:
        model, info = load_flow(args.ckpt, args.weights, d.device)
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
        mine = generate(model, labels, args.num_samples, args.batch_size, args.seed, d, guidance=args.guidance,
                        anneal=args.anneal, attn_temp=args.attn_temp, temperature=args.temperature,
                        denoise=not args.no_denoise, sampler=sampler or "sequential", return_stats=True)
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
        ckpt = Path(args.ckpt)
        out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / f"samples-seed{args.seed}"
        if "npz" in formats:
            save_npz(out.with_suffix(".npz"), x, labels)
            N, C, H, W = x.shape
            print(f"wrote {out.with_suffix('.npz')}: arr_0 ({N}, {H}, {W}, {C}) uint8"
                  f"{', labels' if labels is not None else ''}")
        if "png" in formats:
            save_grid(x, out.with_suffix(".png"), K if K and args.class_label is None else 10)
            print(f"wrote {out.with_suffix('.png')}")


def cmd_bpd(args: argparse.Namespace) -> None:
    """Bits/dim of a dataset split with uniform dequantization; the null label unless --conditional."""
    import json
    from pathlib import Path

    from rrepa import distributed
    from rrepa.checkpoint import load_flow
    from rrepa.data import DataConfig, build_dataset
    from rrepa.sample import evaluate_bpd

    with distributed.process_group(args.device) as d:
        model, info = load_flow(args.ckpt, args.weights, d.device)
        data = DataConfig(**info["config"].get("data", {}))
        if args.data_path:
            data.path = args.data_path
        dataset = build_dataset(data, args.split)
        if args.conditional and args.unconditional:
            raise ValueError("give --conditional or --unconditional (the default), not both")
        result = evaluate_bpd(model, dataset, args.batch_size, d, seed=args.seed,
                              conditional=args.conditional, max_images=args.max_images)
        result.update(split=args.split, weights=args.weights, step=info["step"], ckpt=info["file"],
                      # None: unknown (weights without a run config); runs from before the option did not dequantize
                      train_dequantize=(info["config"]["train"].get("dequantize", False)
                                        if "train" in info["config"] else None))
        if d.is_main:
            print(json.dumps(result))
            if args.json:
                from rrepa.checkpoint import atomic_write

                atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))


def cmd_experiment(args: argparse.Namespace) -> None:
    """Run an experiment grid (arms x seeds, resumable) or write its report."""
    if args.action == "run":
        import signal

        from rrepa.experiment import run_grid

        # SIGTERM (kill, a cluster's scheduler) stops the grid as Ctrl-C does: the cells save checkpoints.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            failed = run_grid(args.grid, args.out, runs=args.runs, jobs=args.jobs, threads=args.threads,
                              only=args.only.split(",") if args.only else None)
        except KeyboardInterrupt:
            sys.exit(130)
        if failed:
            sys.exit(1)
        if not args.no_report:
            from rrepa.report import write_report

            print(f"wrote {write_report(args.out)}")
    elif args.action == "probe":
        from rrepa.experiment import probe_grid

        probe_grid(args.folder, runs=args.runs, limit_train=args.limit_train, limit_test=args.limit_test)
    else:
        from rrepa.report import write_report

        print(f"wrote {write_report(args.folder, baseline=args.baseline)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rrepa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("presets", help="list model presets and their parameter counts")
    p.add_argument("name", nargs="*", help="only these presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("convert", help="convert an apple/ml-tarflow checkpoint to rrepa weights")
    p.add_argument("src", help="their checkpoint (.pth / .pt state_dict)")
    p.add_argument("dst", help="output .safetensors file (the config is stored in its metadata)")
    p.add_argument("--in-channels", type=int, default=3, help="image channels C (4 for SD-VAE latents)")
    p.add_argument("--head-dim", type=int, default=64, help="attention head dimension of the checkpoint")
    p.add_argument("--sigma", type=float, default=0.05, help="training noise std the checkpoint was trained with")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train a TARFlow (preset + --config YAML + --set key=value)",
                       description="Train a TARFlow. The config is the preset, then --config, then each --set; "
                                   "runs under torchrun as DDP.")
    p.add_argument("--preset", default=None, help="model and run preset (default fmnist; see `rrepa presets`)")
    p.add_argument("--config", help="YAML file with sections model:, data:, optim:, train: (only what differs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set optim.lr=3e-4 --set model.width=256 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--out", help="run folder (default runs/<date-time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest loadable checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--init-from", help="start from these weights (run folder, ckpt-*.pt or .safetensors); "
                                       "optimiser and step start afresh")
    p.add_argument("--data-dir", metavar="PATH", help="the dataset (Fashion-MNIST folder, image folder or .npz); "
                                                      "the same as --set data.path=PATH")
    p.add_argument("--encoder-weights", metavar="PATH",
                   help="local weights of the alignment encoder (DINOv2: Meta's .pth or timm's .safetensors); "
                        "the same as --set align.encoder_weights=PATH")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda or cpu")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples from a checkpoint (PNG grid and/or ADM npz)")
    p.add_argument("--ckpt", required=True, help="run folder, ckpt-*.pt or .safetensors")
    # Not --n: torchrun would take that for an abbreviation of its own --nnodes / --nproc-per-node.
    p.add_argument("--num-samples", type=int, default=100, help="number of samples")
    p.add_argument("--batch-size", type=int, default=100, help="samples per batch")
    p.add_argument("--seed", type=int, default=0, help="same seed, same samples (whatever the process count)")
    p.add_argument("--class", dest="class_label", type=int, help="draw only this class (default: cycle through all)")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance weight w (0 = none)")
    p.add_argument("--anneal", action="store_true", help="ramp the guidance linearly along the token index")
    p.add_argument("--attn-temp", type=float, default=1.0, help="attention temperature of the unconditional branch")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="std of the prior noise z (1 = the model's distribution; 0.8: cleaner, less varied images)")
    p.add_argument("--no-denoise", action="store_true", help="skip the one-step (Tweedie) denoising")
    p.add_argument("--sampler", default="sequential",
                   help="sequential (one token per transformer pass, KV cache) or jacobi (parallel iterations, "
                        "chunked; prints its iterations per block)")
    from rrepa.flow import Jacobi

    jacobi = Jacobi()
    p.add_argument("--tol", type=float,
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
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bpd", help="bits/dim of a dataset split (uniform dequantization, null label)",
                       description="Bits/dim with uniform dequantization and, by default, the null label: "
                                   "TARFlow's protocol, comparable with published figures for models trained with "
                                   "train.dequantize=true and model.sigma=0. The JSON names the protocol and the "
                                   "model's training noise sigma.")
    p.add_argument("--ckpt", required=True, help="run folder, ckpt-*.pt or .safetensors")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--max-images", type=int, help="only the first this many images")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which weights of a checkpoint")
    p.add_argument("--conditional", action="store_true", help="use the true labels instead of the null label")
    p.add_argument("--unconditional", action="store_true", help="the null label (the default; kept for old scripts)")
    p.add_argument("--data-path", help="dataset location (default: the run's data.path)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dequantization noise")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.set_defaults(func=cmd_bpd)

    p = sub.add_parser("experiment", help="experiment grids: arms x seeds of runs, resumable; and their report")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("run", help="train every unfinished cell of a grid (finished ones are skipped, killed "
                                       "ones resume) and log every evaluation to OUT/evals.jsonl",
                           description="A grid YAML names preset, seeds, common `set` overrides and arms (lists of "
                                       "overrides); see rrepa.experiment and results/*/grid.yaml.")
    q.add_argument("grid", help="the grid YAML file")
    q.add_argument("--out", required=True, help="results folder (evals.jsonl, configs/, README.md, plots)")
    q.add_argument("--runs", help="where the cells' run folders go (default OUT/runs; checkpoints are large)")
    q.add_argument("--jobs", type=int, default=2, help="cells trained at once")
    q.add_argument("--threads", type=int, default=1, help="intra-op threads per cell")
    q.add_argument("--only", help="only these arms, comma-separated")
    q.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    q.set_defaults(func=cmd_experiment)
    q = actions.add_parser("probe", help="linear probes of every finished cell (once each) into FOLDER/probes.jsonl")
    q.add_argument("folder", help="the results folder of `rrepa experiment run`")
    q.add_argument("--runs", help="the cells' run folders (default FOLDER/runs)")
    q.add_argument("--limit-train", type=int, default=10_000, help="fit on the first N training images")
    q.add_argument("--limit-test", type=int, default=2000,
                   help="test on the first N test images (those of the in-training one-step and Bayes top-1)")
    q.set_defaults(func=cmd_experiment)
    q = actions.add_parser("report", help="write FOLDER/README.md and plots from FOLDER/evals.jsonl")
    q.add_argument("folder", help="the results folder of `rrepa experiment run`")
    q.add_argument("--baseline", default="baseline", help="the arm the others are compared with")
    q.set_defaults(func=cmd_experiment)

    # Sub-commands whose arguments live beside their code: classify, probe, evaluate, evaluator, encoder.
    from rrepa import classify, encoders, metrics, probe

    for module in (classify, probe, metrics, encoders):
        module.add_cli(sub)
    return parser


def describe_os_error(err: OSError) -> str:
    """An OSError as one line: the path, the system's cause and what to do about it."""
    import errno

    if err.filename is None or err.strerror is None:
        return str(err)  # our own messages (CheckpointWriteError, FileNotFoundError("... does not exist ..."))
    where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
    fix = {errno.EROFS: "choose a writable location", errno.EACCES: "check its permissions or choose another path",
           errno.EPERM: "check its permissions and attributes (chattr) or choose another path",
           errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
           errno.EFBIG: "the file exceeds a size limit; write elsewhere", errno.ENOENT: "check the path"}
    return f"{where}: {err.strerror}" + (f" ({fix[err.errno]})" if err.errno in fix else "")


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> None:
    try:
        parser = build_parser()  # imports torch: seconds, during which Ctrl-C is likely
        from rrepa.checkpoint import Interrupted
    except KeyboardInterrupt:
        print("rrepa: interrupted", file=sys.stderr)
        sys.exit(130)
    args = parser.parse_args(argv)

    try:
        args.func(args)
    except Interrupted as err:
        # Saved at a step boundary: one line saying where and how to continue.
        if _is_rank0():
            print(err.message, file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        if _is_rank0():
            print(f"rrepa {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, KeyError, OSError) as err:
        # A user error or an I/O failure: one clear line, no traceback.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, OSError):
            msg = describe_os_error(err)
        print(f"rrepa {args.command}: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
