"""The `rrepa` command line: one sub-command per task, each a thin wrapper over the library."""

from __future__ import annotations

import argparse
import sys


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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # A user error: one clear line, no traceback.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"rrepa {args.command}: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
