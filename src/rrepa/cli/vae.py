"""`rrepa vae train` / `rrepa vae eval`: train the embedded Fashion-MNIST autoencoder (fmnist-vae) and measure
the reconstructions of a VAE on the Fashion-MNIST test split."""

from __future__ import annotations

import argparse

from rrepa.cli.options import add_data_dir, add_device, add_output, output_path
from rrepa.data.cache import dataset_images
from rrepa.data.datasets import DataConfig, build_dataset
from rrepa.data.vae import DTYPES
from rrepa.distributed import resolve_device
from rrepa.eval.samples import build_feature_network, evaluate_samples
from rrepa.fmnist.vae import (
    FMNIST_VAE_NAME,
    VAETrainConfig,
    default_vae_path,
    load_vae,
    reconstruct,
    reconstruction_quality,
    train_and_save_vae,
)


def cmd_vae_train(args: argparse.Namespace) -> None:
    """Train fmnist-vae, save it in diffusers layout and report its test PSNR."""
    out = output_path(args, default_vae_path())
    cfg = VAETrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         kl_weight=args.kl_weight, loss=args.loss, max_images=args.max_images)
    info = train_and_save_vae(out, cfg, data_path=args.data_dir, device=resolve_device(args.device))
    test = info["test"]
    print(f"test reconstruction PSNR {test['psnr']:.2f} dB (MSE {test['mse']:.2f} on 0..255, {test['images']} "
          f"images)")
    print(f"wrote {out} (diffusers layout; pass it as --vae): scaling_factor {info['scaling_factor']:.5g}, "
          f"shift_factor {info['shift_factor']:.4g}, fingerprint {info['fingerprint'][:16]}")


def cmd_vae_eval(args: argparse.Namespace) -> None:
    """PSNR of a VAE's reconstructions of the test split, and the embedded evaluator's FID of some of them."""
    if args.limit is not None and args.limit < 1 or args.fid_images < 0:
        raise ValueError(f"need --limit >= 1 (or none: all test images) and --fid-images >= 0 (0: no FID), got "
                         f"{args.limit} and {args.fid_images}")
    device = resolve_device(args.device)
    vae = load_vae(args.vae, device=device, dtype=args.dtype, data_path=args.data_dir)
    test = build_dataset(DataConfig(name="fmnist", path=args.data_dir), "test")
    q = reconstruction_quality(vae, test, limit=args.limit, batch_size=args.batch_size, progress=True)
    print(f"{vae.name}: test reconstruction PSNR {q['psnr']:.2f} dB (MSE {q['mse']:.2f} on 0..255, "
          f"{q['images']} images)")
    if args.fid_images:
        net = build_feature_network("fmnist", evaluator_weights=args.evaluator_weights, device=device)
        real = dataset_images(test)[:args.fid_images]
        recon = reconstruct(vae, real, args.batch_size, progress=True)
        kw = dict(batch_size=args.batch_size, data_dir=args.data_dir)
        fid = evaluate_samples(recon, net, "fmnist:test", **kw)["fid"]
        floor = evaluate_samples(real, net, "fmnist:test", **kw)["fid"]
        print(f"{net.name} FID of {real.shape[0]} test reconstructions against the test split: {fid:.3f} "
              f"(the same {real.shape[0]} real images: {floor:.3f})")


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rrepa vae train` and `rrepa vae eval` on the top-level sub-parsers."""
    p = sub.add_parser("vae", help="the VAE of latent flows (train the embedded Fashion-MNIST autoencoder)")
    vsub = p.add_subparsers(dest="vae_command", required=True, metavar="ACTION")
    t = vsub.add_parser("train", help="train the embedded Fashion-MNIST autoencoder (diffusers AutoencoderKL)",
                        description="Train fmnist-vae (a small diffusers AutoencoderKL, 1 x 28 x 28 -> 4 x 7 x 7, "
                                    "L2 + KL, no GAN / LPIPS) on the Fashion-MNIST training split, set its "
                                    "scaling to unit-variance latents, save it in diffusers layout and report "
                                    "its test PSNR. Ctrl-C keeps its progress: the same command continues.")
    add_output(t, f"<cache>/vae/{FMNIST_VAE_NAME}, cache = $RREPA_CACHE_DIR or ~/.cache/rrepa; an existing one "
                  f"is replaced once the new one is saved", what="folder")
    t.add_argument("--steps", type=int, default=VAETrainConfig.steps, help="optimiser steps")
    t.add_argument("--batch-size", type=int, default=VAETrainConfig.batch_size, help="images per step")
    t.add_argument("--lr", type=float, default=VAETrainConfig.lr, help="AdamW learning rate")
    t.add_argument("--kl-weight", type=float, default=VAETrainConfig.kl_weight, help="weight of the KL per pixel")
    t.add_argument("--loss", choices=("l2", "l1"), default=VAETrainConfig.loss, help="reconstruction loss")
    t.add_argument("--seed", type=int, default=VAETrainConfig.seed)
    t.add_argument("--max-images", type=int, help="train on the first this many images only")
    add_data_dir(t)
    add_device(t)
    t.set_defaults(func=cmd_vae_train)
    e = vsub.add_parser("eval", help="PSNR and FID of a VAE's reconstructions of the Fashion-MNIST test split",
                        description="Reconstruct the Fashion-MNIST test split (posterior mean, decoded, 8-bit) and "
                                    "report PSNR over all pixels, and the embedded evaluator's FID of the first "
                                    "--fid-images reconstructions against the test split beside that of the same "
                                    "real images (the floor).")
    e.add_argument("--vae", default=FMNIST_VAE_NAME,
                   help=f"a folder in diffusers layout, a hub id (online only) or {FMNIST_VAE_NAME} (the embedded "
                        f"one, trained first if missing)")
    e.add_argument("--limit", type=int, help="PSNR over the first this many test images (default all)")
    e.add_argument("--fid-images", type=int, default=2000, help="reconstructions for the FID (0: no FID)")
    e.add_argument("--evaluator-weights", help="the embedded evaluator's file (default: cache, trained if missing)")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    add_data_dir(e)
    add_device(e)
    e.set_defaults(func=cmd_vae_eval)
