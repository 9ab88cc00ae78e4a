"""`rrepa encoder train` trains the embedded fmnist-ssl encoder, caches it and reports its linear probe; `rrepa encoder
probe` measures the probe of encoder files, or of random weights of their architecture (the floor training lifts)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import torch

from rrepa.cli.options import add_data_dir, add_device, add_fmnist_variant, add_output, fmnist_variant, output_path
from rrepa.distributed import resolve_device
from rrepa.fmnist.encoder import (
    EMBEDDED_FILE,
    EmbeddedEncoder,
    SSLBackbone,
    SSLConfig,
    SSLTrainConfig,
    embedded_encoder_path,
    linear_probe,
    load_embedded,
    pixel_probe,
    save_embedded,
    train_ssl_encoder,
)
from rrepa.utils import cache_dir


def cmd_encoder_train(args: argparse.Namespace) -> None:
    """Train the embedded fmnist-ssl encoder, cache it and report its linear-probe accuracy."""
    variant = cache_dir() / "encoders" / f"{args.data}-ssl.safetensors"
    default = embedded_encoder_path() if args.data == "fmnist" else variant
    out = output_path(args, default)
    device = resolve_device(args.device)
    cfg = SSLTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
                         crop_min=args.crop_min, cutout=args.cutout, seed=args.seed, max_images=args.max_images)
    train_set = fmnist_variant(args, "train")
    arch = SSLConfig(in_channels=train_set.channels, image_size=train_set.image_size, widths=tuple(args.widths),
                     convs_per_stage=args.convs_per_stage, dim=args.dim)
    backbone, info = train_ssl_encoder(train_set, cfg, arch, device=device)
    if not args.no_probe:
        test_set = fmnist_variant(args, "test")
        enc = EmbeddedEncoder(backbone)
        t = time.perf_counter()
        info.update(linear_probe(enc, train_set, test_set, max_train=args.probe_max_train))
        info["probe_seconds"] = round(time.perf_counter() - t, 1)
        print(f"linear probe (logistic regression on mean-pooled tokens, fit on {info['probe_train_images']} "
              f"train images): test accuracy {100 * info['probe_test_accuracy']:.2f} %")
    save_embedded(out, backbone, info)
    print(f"wrote {out}: fingerprint {EmbeddedEncoder(backbone).fingerprint[:16]}")


def cmd_encoder_probe(args: argparse.Namespace) -> None:
    """One JSON line per file: its linear probe on the test split (random weights of its architecture: --random);
    with --pixels, first a line for the raw pixels."""
    if not args.files and not args.pixels:
        raise ValueError("rrepa encoder probe needs encoder files, --pixels, or both")
    train_set, test_set = fmnist_variant(args, "train"), fmnist_variant(args, "test")
    if args.pixels:
        t = time.perf_counter()
        r = pixel_probe(train_set, test_set, max_train=args.probe_max_train)
        print(json.dumps({"file": None, "weights": "pixels", **r,
                          "probe_seconds": round(time.perf_counter() - t, 1)}), flush=True)
    for path in args.files:
        enc = load_embedded(path)
        if args.random:
            torch.manual_seed(args.seed)
            enc = EmbeddedEncoder(SSLBackbone(enc.backbone.cfg), info={"random_init_seed": args.seed})
        t = time.perf_counter()
        r = linear_probe(enc, train_set, test_set, max_train=args.probe_max_train)
        print(json.dumps({"file": str(path), "weights": "random" if args.random else "trained",
                          "fingerprint": enc.fingerprint[:16], "steps": enc.info.get("steps"),
                          "architecture": asdict(enc.backbone.cfg), **r,
                          "probe_seconds": round(time.perf_counter() - t, 1)}), flush=True)


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rrepa encoder train` and `rrepa encoder probe` on the top-level sub-parsers."""
    p = sub.add_parser("encoder", help="frozen target encoders (train and probe the embedded fmnist-ssl encoder)")
    esub = p.add_subparsers(dest="encoder_command", required=True, metavar="ACTION")
    t = esub.add_parser("train", help="train the embedded self-supervised Fashion-MNIST encoder (no labels)",
                        description="Train fmnist-ssl (SimCLR on the Fashion-MNIST training split, labels unused), "
                                    "cache it and report a linear-probe accuracy on the test split. With --data "
                                    "fmnist-clutter it trains on the cluttered variant (default output "
                                    "<cache>/encoders/fmnist-clutter-ssl.safetensors).")
    add_output(t, f"<cache>/encoders/{EMBEDDED_FILE}, cache = $RREPA_CACHE_DIR or ~/.cache/rrepa")
    t.add_argument("--steps", type=int, default=SSLTrainConfig.steps, help="optimiser steps")
    t.add_argument("--batch-size", type=int, default=SSLTrainConfig.batch_size, help="images per step (x2 views)")
    t.add_argument("--lr", type=float, default=SSLTrainConfig.lr, help="AdamW learning rate")
    t.add_argument("--widths", type=int, nargs="+", default=list(SSLConfig.widths), metavar="W",
                   help="channels of each stage (each halves the grid: two stages give 28 px -> 7 x 7)")
    t.add_argument("--convs-per-stage", type=int, default=SSLConfig.convs_per_stage, help="3 x 3 convs per stage")
    t.add_argument("--dim", type=int, default=SSLConfig.dim, help="token dimension (the alignment target's)")
    t.add_argument("--temperature", type=float, default=SSLTrainConfig.temperature, help="NT-Xent temperature")
    t.add_argument("--crop-min", type=float, default=SSLTrainConfig.crop_min,
                   help="smallest area fraction of the random resized crop (lower: stronger augmentation)")
    t.add_argument("--cutout", type=float, default=SSLTrainConfig.cutout, help="probability of the cutout rectangle")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-images", type=int, help="train on the first this many images only")
    t.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    t.add_argument("--probe-max-train", type=int, help="fit the probe on the first this many train images")
    add_data_dir(t)
    add_fmnist_variant(t)
    add_device(t)
    t.set_defaults(func=cmd_encoder_train)
    q = esub.add_parser("probe", help="linear-probe accuracy of encoder files (one JSON line each)",
                        description="The linear probe `rrepa encoder train` reports, for existing files: logistic "
                                    "regression on mean-pooled tokens of the training split, accuracy on the test "
                                    "split. --random probes freshly initialised weights of each file's architecture, "
                                    "--pixels the flattened raw pixels.")
    q.add_argument("files", nargs="*", metavar="FILE", help="encoder files written by `rrepa encoder train`")
    q.add_argument("--pixels", action="store_true",
                   help="also probe the raw pixels (flattened), the floor any representation is read against")
    q.add_argument("--random", action="store_true", help="probe random weights of the file's architecture instead")
    q.add_argument("--seed", type=int, default=0, help="seed of --random's initialisation")
    q.add_argument("--probe-max-train", type=int, help="fit the probe on the first this many train images")
    add_data_dir(q)
    add_fmnist_variant(q)
    q.set_defaults(func=cmd_encoder_probe)
