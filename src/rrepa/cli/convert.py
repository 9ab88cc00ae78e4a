"""`rrepa convert` (an apple/ml-tarflow checkpoint to rrepa's safetensors weights) and `rrepa export` (a trained
model to a pretrained folder, shared like any hub model)."""

from __future__ import annotations

import argparse

from rrepa.flow.convert import convert_file
from rrepa.training.run import export_pretrained, load_run


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert an apple/ml-tarflow checkpoint to rrepa's safetensors weights."""
    cfg = convert_file(args.src, args.dst, in_channels=args.in_channels, head_dim=args.head_dim,
                       sigma=args.sigma)
    print(f"wrote {args.dst}: {cfg}")


def cmd_export(args: argparse.Namespace) -> None:
    """A run (or checkpoint) as a pretrained folder: config.json + model.safetensors (+ the run's config.yaml)."""
    model, info = load_run(args.ckpt, args.weights)
    out = export_pretrained(model, args.out, info["config"] if "train" in info["config"] else None)
    print(f"wrote {out}: {info['weights']} weights of {info['file']} (step {info['step']}); load it with "
          f"TARFlow.from_pretrained({str(out)!r}) or --ckpt {out}; upload it with `huggingface-cli upload`")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an apple/ml-tarflow checkpoint to rrepa weights")
    p.add_argument("src", help="their checkpoint (.pth / .pt state_dict)")
    p.add_argument("dst", help="output .safetensors file (the config is stored in its metadata)")
    p.add_argument("--in-channels", type=int, default=3, help="image channels C (4 for SD-VAE latents)")
    p.add_argument("--head-dim", type=int, default=64, help="attention head dimension of the checkpoint")
    p.add_argument("--sigma", type=float, default=0.05, help="training noise std the checkpoint was trained with")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="save a trained model as a pretrained folder (TARFlow.from_pretrained)")
    p.add_argument("--ckpt", required=True, help="run folder, ckpt-*.pt or .safetensors")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which weights of a checkpoint")
    p.set_defaults(func=cmd_export)
