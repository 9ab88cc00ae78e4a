"""`rrepa convert`: an apple/ml-tarflow checkpoint to rrepa's safetensors weights."""

from __future__ import annotations

import argparse

from rrepa.convert import convert_file


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert an apple/ml-tarflow checkpoint to rrepa's safetensors weights."""
    cfg = convert_file(args.src, args.dst, in_channels=args.in_channels, head_dim=args.head_dim,
                       sigma=args.sigma)
    print(f"wrote {args.dst}: {cfg}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an apple/ml-tarflow checkpoint to rrepa weights")
    p.add_argument("src", help="their checkpoint (.pth / .pt state_dict)")
    p.add_argument("dst", help="output .safetensors file (the config is stored in its metadata)")
    p.add_argument("--in-channels", type=int, default=3, help="image channels C (4 for SD-VAE latents)")
    p.add_argument("--head-dim", type=int, default=64, help="attention head dimension of the checkpoint")
    p.add_argument("--sigma", type=float, default=0.05, help="training noise std the checkpoint was trained with")
    p.set_defaults(func=cmd_convert)
