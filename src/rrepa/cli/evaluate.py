"""`rrepa evaluate` (FID, sFID, IS, precision / recall of samples; rrepa.eval.samples) and `rrepa evaluator
{train,info}` (the embedded Fashion-MNIST evaluator; rrepa.fmnist.evaluator)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rrepa.cli.options import (
    add_data_dir,
    add_device,
    add_fmnist_variant,
    add_output,
    add_overwrite,
    add_precision,
    add_vae,
    finite_float,
    fmnist_variant_config,
    output_path,
    refuse_existing,
)
from rrepa.distributed import resolve_device
from rrepa.eval.inception import INCEPTION_FILENAME
from rrepa.eval.npz import read_samples_npz
from rrepa.eval.reference import CLUTTER_REF, DEFAULT_PR_MAX, reference_stats
from rrepa.eval.samples import build_feature_network, evaluate_samples, format_markdown
from rrepa.fmnist.evaluator import default_evaluator_path, load_evaluator, train_and_save_evaluator
from rrepa.training.run import samples_from_checkpoint
from rrepa.utils import atomic_write


def cmd_evaluate(args: argparse.Namespace) -> None:
    """`rrepa evaluate`: ADM's metrics of a samples npz or of samples drawn from a run, as a Markdown table."""

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    if (args.samples is None) == (args.ckpt is None):
        raise ValueError("give exactly one of --samples S.npz and --ckpt")
    if args.splits < 1 or args.k < 1:
        raise ValueError("--splits and --k must be >= 1")
    if args.out:
        refuse_existing(args, Path(args.out))
    device = resolve_device(args.device)
    # FID needs 2 samples for a covariance, precision / recall k + 1 for k neighbours: refused before any feature
    # network is loaded (or trained).
    least = max(2, args.k + 1)
    if args.ckpt is not None:
        if args.num_samples is None or args.num_samples < least:
            raise ValueError(f"--ckpt needs --num-samples N with N >= {least} (FID needs 2, precision / recall with "
                             f"--k {args.k} need {args.k + 1}; FID is biased upwards for small N: compare runs at "
                             f"the same N)")
        log(f"drawing {args.num_samples} samples from {args.ckpt} ({args.weights} weights, seed {args.seed}, "
            f"guidance {args.guidance}, temperature {args.temperature})")
        drawn: dict = {}  # the precision the samples were drawn in (--precision, else the run's own)
        images, labels = samples_from_checkpoint(
            args.ckpt, args.num_samples, batch_size=args.sample_batch_size, seed=args.seed, device=device,
            weights=args.weights, progress=True, precision=args.precision, guidance=args.guidance,
            temperature=args.temperature, log=log, vae=args.vae, report=drawn)
        if images.shape[0] < least:
            raise ValueError(f"only {images.shape[0]} of the {args.num_samples} samples are finite, the metrics need "
                             f"at least {least}; the model (or sampler) diverged: try another checkpoint or a lower "
                             f"--guidance or --temperature")
    else:
        images, labels = read_samples_npz(args.samples)
        if images.shape[0] < least:
            raise ValueError(f"{args.samples} holds {images.shape[0]} samples; the metrics need at least {least} "
                             f"(FID needs 2, precision / recall with --k {args.k} need {args.k + 1}; thousands give "
                             f"stable figures)")
    clutter = CLUTTER_REF.fullmatch(args.ref)
    side = int(clutter.group(1)) if clutter else 28
    if (args.ref.startswith("fmnist:") or clutter) and tuple(images.shape[1:]) != (side, side, 1):
        N, H, W, C = images.shape
        raise ValueError(f"the samples are {C} x {H} x {W} images but --ref {args.ref} holds 1 x {side} x {side} "
                         f"images; compare samples with a reference of their own shape (--ref an npz of such images)")
    net = build_feature_network(args.features, inception_weights=args.inception_weights,
                                evaluator_weights=args.evaluator_weights, device=device,
                                batch_size=args.batch_size, log=log)
    ref = reference_stats(args.ref, net, cache=not args.no_cache, pr_max=args.pr_max, batch_size=args.batch_size,
                          data_dir=args.data_dir, progress=True)
    if args.save_ref_stats:
        ref.save(args.save_ref_stats)
        log(f"wrote reference statistics to {args.save_ref_stats}")
    res = evaluate_samples(images, net, ref, labels=labels, splits=args.splits, k=args.k,
                           batch_size=args.batch_size, progress=True, fid_method=args.fid_method)
    if args.ckpt is not None:
        res.update(ckpt=str(args.ckpt), weights=args.weights, seed=args.seed, guidance=args.guidance,
                   temperature=args.temperature, dtype=drawn["dtype"], diverged=args.num_samples - images.shape[0])
    else:
        res.update(samples=str(args.samples))
    res.update(ref=str(args.ref))
    if getattr(net, "test_accuracy", None) is not None:
        res["evaluator_test_accuracy"] = net.test_accuracy
    print(format_markdown(res))
    if args.out:
        text = json.dumps(res, indent=2) + "\n"

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(args.out, write)
        log(f"wrote {args.out}")


def cmd_evaluator_train(args: argparse.Namespace) -> None:
    """Train the embedded Fashion-MNIST evaluator and cache it; print its name and test accuracy as JSON."""
    variant = default_evaluator_path().with_name(f"{args.data}-cnn.safetensors")
    out = output_path(args, default_evaluator_path() if args.data == "fmnist" else variant)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Ctrl-C keeps the progress beside `out`: the same command continues from there.
    train_and_save_evaluator(out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             data_dir=args.data_dir, data=fmnist_variant_config(args),
                             log=lambda m: print(m, file=sys.stderr))
    ev = load_evaluator(out)
    print(json.dumps({"feature_network": ev.name, "path": str(out), "test_accuracy": ev.info["test_accuracy"],
                      "train_seconds": ev.info["train_seconds"], "epochs": ev.info["epochs"]}))


def cmd_evaluator_info(args: argparse.Namespace) -> None:
    """Print the cached evaluator's name, test accuracy and training settings as JSON."""
    ev = load_evaluator(args.path)  # default: the shipped evaluator
    print(json.dumps({"feature_network": ev.name, **ev.info}, indent=2))


def register(sub: argparse._SubParsersAction) -> None:
    """Register ``evaluate`` and ``evaluator {train,info}`` on rrepa's sub-command parser."""
    p = sub.add_parser("evaluate", help="FID, sFID, IS, precision/recall (ADM's metrics) of samples or a run",
                       description="Compare samples (ADM npz: arr_0 (N, H, W, C) uint8 [+ labels], or N samples "
                                   "drawn from a run with --ckpt RUN --num-samples N) with a reference. "
                                   "Prints a Markdown table; --out also writes JSON.")
    p.add_argument("--samples", help="samples npz in ADM's layout (from `rrepa sample --format npz`)")
    p.add_argument("--ckpt", help="instead of --samples: draw the samples from this run folder, ckpt-*.pt or "
                                  ".safetensors (as `rrepa sample`, labels cycling through the classes)")
    p.add_argument("--num-samples", type=int, default=None, help="with --ckpt: how many samples to draw")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="with --ckpt: which weights")
    p.add_argument("--seed", type=int, default=0, help="with --ckpt: sampling seed (as `rrepa sample --seed`)")
    p.add_argument("--guidance", type=finite_float, default=0.0, help="with --ckpt: guidance weight w")
    p.add_argument("--temperature", type=finite_float, default=1.0, help="with --ckpt: std of the prior noise")
    p.add_argument("--sample-batch-size", type=int, default=100, help="with --ckpt: samples per batch")
    p.add_argument("--ref", required=True,
                   help="fmnist:train, fmnist:test, a split of fmnist-clutter (fmnist-clutter-32px-seed0:train), an "
                        "npz of images (arr_0) or of statistics (mu, sigma[, mu_s, "
                        "sigma_s]; ADM's reference batches hold both)")
    p.add_argument("--features", choices=("fmnist", "inception"), default="fmnist",
                   help="feature network: the embedded Fashion-MNIST CNN (default, offline) or FID-Inception")
    p.add_argument("--inception-weights", metavar="PATH",
                   help=f"torch-fidelity's {INCEPTION_FILENAME} (default: the torch hub cache; downloaded when online)")
    p.add_argument("--evaluator-weights", metavar="PATH",
                   help="embedded evaluator weights (default $RREPA_CACHE_DIR/evaluator/fmnist-cnn.safetensors; "
                        "trained there first when missing)")
    p.add_argument("--batch-size", type=int, default=None, help="images per feature batch")
    p.add_argument("--splits", type=int, default=10, help="Inception Score splits")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours for precision / recall")
    p.add_argument("--pr-max", type=int, default=DEFAULT_PR_MAX,
                   help="at most this many reference features (seeded subset) for precision / recall; 0 = all")
    p.add_argument("--fid-method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="sqrtm: scipy's matrix square root, the standard (ADM's) computation; eigh: the same "
                        "trace from symmetric eigenvalues, ~3x faster at 2048-d")
    add_data_dir(p, help="Fashion-MNIST folder for --ref fmnist:*")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached reference statistics")
    p.add_argument("--save-ref-stats", metavar="PATH", help="also write the reference statistics to this npz")
    p.add_argument("--out", help="write the results as JSON here")
    add_overwrite(p, "--out file")
    add_device(p)
    add_precision(p)
    add_vae(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("evaluator", help="the embedded Fashion-MNIST evaluator (train, info)")
    esub = p.add_subparsers(dest="evaluator_command", required=True, metavar="ACTION")
    t = esub.add_parser("train", help="train another Fashion-MNIST CNN into the cache (the shipped one stays the "
                                      "default; about 12 minutes on 2 idle cores; Ctrl-C keeps its progress)")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    add_data_dir(t, help="Fashion-MNIST folder (default: the usual search)")
    add_fmnist_variant(t)
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_output(t, "$RREPA_CACHE_DIR/evaluator/fmnist-cnn.safetensors", what="weights file")
    t.set_defaults(func=cmd_evaluator_train)
    i = esub.add_parser("info", help="print the cached evaluator's name, test accuracy and training settings")
    i.add_argument("path", nargs="?", help="weights file (default: the shipped fmnist-cnn)")
    i.set_defaults(func=cmd_evaluator_info)
