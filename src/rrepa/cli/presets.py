"""`rrepa presets`: the preset registry's models, with their shapes and parameter counts."""

from __future__ import annotations

import argparse

from rrepa.flow.tarflow import TARFlow
from rrepa.training.config import PRESETS, resolve


def cmd_presets(args: argparse.Namespace) -> None:
    """Print every preset's model with its shape and parameter count (Markdown table)."""
    print("| preset | input C x H x W | patch | tokens N | token dim D | blocks x layers | width | classes | params |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in PRESETS:
        if args.name and name not in args.name:
            continue
        cfg = resolve(name).model
        n = TARFlow(cfg).num_params()
        # "4 x 2" when every block has 2 layers; "4 x [1, 1, 1, 5]" lists a deep-shallow model's counts, block 1 first.
        layers = list(cfg.layers_per_block) if isinstance(cfg.layers_per_block, tuple) else cfg.layers_per_block
        print(f"| {name} | {cfg.in_channels} x {cfg.image_height} x {cfg.image_width} | {cfg.patch_size} | "
              f"{cfg.num_tokens} | {cfg.token_dim} | {cfg.num_blocks} x {layers} | {cfg.width} | "
              f"{cfg.num_classes} | {n / 1e6:.2f} M |")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list model presets and their parameter counts")
    p.add_argument("name", nargs="*", help="only these presets")
    p.set_defaults(func=cmd_presets)
