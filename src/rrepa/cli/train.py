"""`rrepa train`: train a TARFlow (preset + YAML + --set), or continue a run with --resume."""

from __future__ import annotations

import argparse

from rrepa.cli.options import add_data_dir, add_device
from rrepa.training.branch import branch
from rrepa.training.config import DEFAULT_PRESET, resolve
from rrepa.training.loop import train
from rrepa.training.run import stored_config


def cmd_train(args: argparse.Namespace) -> None:
    """Train a TARFlow: preset + YAML + --set overrides; or continue a run with --resume."""
    # Shorthands for two keys, applied after the other overrides.
    if args.data_dir:
        args.set = [*args.set, f"data.path={args.data_dir}"]
    if args.encoder_weights:
        args.set = [*args.set, f"align.encoder_weights={args.encoder_weights}"]
    if args.vae:
        args.set = [*args.set, f"data.vae={args.vae}"]
    if args.branch_from and (args.resume or args.init_from or not args.out):
        raise ValueError("--branch-from starts a new run (--out NEW, required) at another run's checkpoint; it does "
                         "not combine with --resume or --init-from")
    if args.resume:
        if args.init_from:
            raise ValueError("--init-from starts a new run from given weights; --resume continues a run with its own")
        if args.out:
            raise ValueError(f"--resume continues {args.resume} in place, so --out {args.out} would be ignored; drop "
                             f"--out, or start a new run from its weights with --init-from {args.resume} --out "
                             f"{args.out}")
        if args.preset or args.config:
            raise ValueError("--resume continues the run's own config.yaml; drop --preset/--config "
                             "(--set still applies, e.g. --set train.steps=20000)")
        cfg = stored_config(args.resume, args.set)
    else:
        cfg = resolve(args.preset or DEFAULT_PRESET, args.config, args.set)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    if args.branch_from:  # a new run folder made at the checkpoint, then resumed from there
        print(f"branched {args.out} from {args.branch_from} at step {branch(args.branch_from, cfg, args.out)}")
        train(stored_config(args.out), args.out, resume=True, device=args.device)
        return
    train(cfg, args.resume or args.out, resume=bool(args.resume), overwrite=args.overwrite,
          init_from=args.init_from, device=args.device)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a TARFlow (preset + --config YAML + --set key=value)",
                       description="Train a TARFlow. The config is the preset, then --config, then each --set; "
                                   "runs under torchrun as DDP.")
    p.add_argument("--preset", default=None, help=f"model and run preset (default {DEFAULT_PRESET}: the default job, "
                                                     f"latent Fashion-MNIST; see `rrepa presets`)")
    p.add_argument("--config", help="YAML file with sections model:, data:, optim:, train: (only what differs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set optim.lr=3e-4 --set model.width=256 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--out", help="run folder (default runs/<date-time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest loadable checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--branch-from", metavar="CKPT",
                   help="start the new run --out at this checkpoint of another run (ckpt-*.pt, or a run folder for "
                        "its newest), where this config trained from step 0 would have reached it (the same config "
                        "but for train.steps and the evaluation, grid and checkpoint cadence, and the same learning "
                        "rate at every step so far: e.g. a longer wsd run before the shorter one's cool-down)")
    p.add_argument("--init-from", help="start from these weights (run folder, ckpt-*.pt or .safetensors); "
                                       "optimiser and step start afresh")
    add_data_dir(p, help="the dataset (Fashion-MNIST folder, image folder or .npz); the same as --set data.path=PATH")
    p.add_argument("--encoder-weights", metavar="PATH",
                   help="local weights of the alignment encoder (DINOv2: Meta's .pth or timm's .safetensors); "
                        "the same as --set align.encoder_weights=PATH")
    p.add_argument("--vae", metavar="PATH_OR_ID",
                   help="train on this VAE's latents (a diffusers AutoencoderKL folder, a hub id, or fmnist-vae); the "
                        "same as --set data.vae=PATH_OR_ID (latent presets name theirs; offline, give a local copy)")
    add_device(p)
    p.set_defaults(func=cmd_train)
