"""Arguments that several commands share, defined once so that they are spelled and explained alike everywhere."""

from __future__ import annotations

import argparse


def add_device(p: argparse.ArgumentParser) -> None:
    """--device: auto (CUDA if available), cuda or cpu (read with rrepa.distributed.resolve_device)."""
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda or cpu")


def add_data_dir(p: argparse.ArgumentParser, help: str = "folder with the Fashion-MNIST IDX files "
                                                         "(default: system / cache)") -> None:
    """--data-dir (args.data_dir), where the dataset is; --data-path, its older spelling, still works."""
    p.add_argument("--data-dir", "--data-path", dest="data_dir", metavar="PATH", help=help)
