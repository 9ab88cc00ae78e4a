"""Arguments that several commands share, defined once so that they are spelled and explained alike everywhere."""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import torch

from rrepa.data.datasets import DataConfig, build_dataset
from rrepa.precision import PRECISIONS, autocast, resolve_for_run


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite (NaN passes every `< 0` check and would only
    surface as non-finite samples)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_device(p: argparse.ArgumentParser) -> None:
    """--device: auto (CUDA if available), cuda or cpu (read with rrepa.distributed.resolve_device)."""
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda or cpu")


def add_data_dir(p: argparse.ArgumentParser, help: str = "folder with the Fashion-MNIST IDX files "
                                                         "(default: system / cache)") -> None:
    """--data-dir (args.data_dir), where the dataset is; --data-path, its older spelling, still works."""
    p.add_argument("--data-dir", "--data-path", dest="data_dir", metavar="PATH", help=help)


def add_fmnist_variant(p: argparse.ArgumentParser) -> None:
    """--data (fmnist | fmnist-clutter), --image-size (fmnist-clutter's canvas, default 32) and --clutter-seed,
    for the commands that train or probe the embedded Fashion-MNIST networks; read with fmnist_variant."""
    p.add_argument("--data", choices=("fmnist", "fmnist-clutter"), default="fmnist",
                   help="Fashion-MNIST, or its cluttered variant (rrepa.data.clutter)")
    p.add_argument("--image-size", type=int, help="fmnist-clutter's canvas in px (default 32)")
    p.add_argument("--clutter-seed", type=int, default=0, help="fmnist-clutter's placement and clutter seed")


def fmnist_variant_config(args: argparse.Namespace) -> DataConfig:
    """The DataConfig add_fmnist_variant's options (and --data-dir) name."""
    size = args.image_size or (32 if args.data == "fmnist-clutter" else 28)
    return DataConfig(name=args.data, path=args.data_dir, image_size=size, clutter_seed=args.clutter_seed)


def fmnist_variant(args: argparse.Namespace, split: str):
    """The split of the dataset add_fmnist_variant's options (and --data-dir) name."""
    return build_dataset(fmnist_variant_config(args), split)


def add_output(p: argparse.ArgumentParser, default: str, what: str = "file") -> None:
    """--out (default `default`, described) and --overwrite (--force, its older spelling), read with output_path."""
    p.add_argument("--out", help=f"output {what} (default {default})")
    p.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                   help=f"replace an existing {what}")


def output_path(args: argparse.Namespace, default: Path) -> Path:
    """args.out or the default, refused in one line when it exists and --overwrite was not given."""
    out = Path(args.out) if args.out else Path(default)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to retrain and replace it (or --out elsewhere)")
    return out


def add_overwrite(p: argparse.ArgumentParser, what: str = "output") -> None:
    """--overwrite (--force, its older spelling) for a command whose --out has no default helper; read with
    refuse_existing."""
    p.add_argument("--overwrite", "--force", dest="overwrite", action="store_true", help=f"replace an existing {what}")


def refuse_existing(args: argparse.Namespace, *paths: Path, flag: str = "--out") -> None:
    """A result file is never replaced silently: one line when one of `paths` exists and --overwrite was not
    given. Called before any work, so that a refusal costs nothing."""
    for path in paths:
        if Path(path).exists() and not args.overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it, or {flag} to write elsewhere")


# Options naming a path: an empty value would mean the current folder (or nothing), never what was meant.
PATH_OPTIONS = ("out", "json", "ckpt", "resume", "config", "data_dir", "init_from", "samples", "save_ref_stats",
                "evaluator_weights", "inception_weights", "encoder_weights", "vae", "runs", "ref")


def refuse_empty_paths(args: argparse.Namespace) -> None:
    """An empty path option (`--out ''`, e.g. from an unset shell variable) is an error, not the current folder."""
    for dest in PATH_OPTIONS:
        if getattr(args, dest, None) == "":
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} is empty; give a path (an unset shell variable?)")


def add_precision(p: argparse.ArgumentParser) -> None:
    """--precision auto | fp32 | bf16 (rrepa.precision), read with precision_scope; default: the run's own."""
    p.add_argument("--precision", choices=PRECISIONS,
                   help="bf16: bfloat16 autocast for the flow (samples are denoised, and measured, in float32); auto: "
                        "bf16 where the device computes it natively, else fp32 (default: the precision the run "
                        "trained in, as its config stores it; fp32 for weights without one)")


def precision_scope(args: argparse.Namespace, device: torch.device | str, info: dict | None = None,
                    ) -> tuple[contextlib.AbstractContextManager, str]:
    """(the autocast context of --precision, else of the run's own precision (info: load_run's), on device; the
    resolved precision: fp32 or bf16)."""
    resolved = resolve_for_run(args.precision, info, device)
    return autocast(resolved, device), resolved


def add_vae(p: argparse.ArgumentParser) -> None:
    """--vae: a latent run's VAE from another place (read with rrepa.data.latent_run.with_vae)."""
    p.add_argument("--vae", metavar="PATH_OR_ID",
                   help="a latent run's VAE from another folder or hub id than the one its config names (its weights "
                        "must be the run's own: the fingerprint is checked)")
