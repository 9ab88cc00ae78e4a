"""The networks rrepa ships as package data, so that no command trains one on first use and every user measures
with the same ones: the evaluator ``fmnist-cnn`` (FID, precision / recall, class accuracy), the alignment encoder
``fmnist-ssl`` and the autoencoder ``fmnist-vae`` of latent Fashion-MNIST; and the same evaluator and encoder
designs trained on the cluttered variant (``fmnist-clutter-cnn``, ``fmnist-clutter-ssl``; rrepa.data.clutter, the
fmnist-clutter preset). Their model cards are ``weights/README.md`` beside this file. Wherever a run or command
takes an evaluator or encoder weights file (``train.eval_weights``, ``--evaluator-weights``,
``align.encoder_weights``), a shipped network's name is accepted too (``resolve_weights``).

Each lives under ``rrepa/fmnist/weights/`` with its content hash in its name, and its files' SHA-256 are recorded
here: ``shipped(name)`` checks them (once per process) and returns the path, so a missing or damaged package file
is a one-line error that names the command which trains a replacement (``rrepa evaluator train``, ``rrepa encoder
train``, ``rrepa vae train``; those write into the cache, and ``--evaluator-weights`` / ``train.eval_weights``,
``align.encoder_weights`` and ``data.vae`` pick such a file instead of the shipped one). The grids' pinned copies
under ``results/*/weights/`` are links to these files, so there is one copy to keep.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ShippedNetwork:
    """One shipped network: where it is and what its files hash to."""

    name: str  # the name the library and the commands know it by
    path: str  # a file or a folder under WEIGHTS, named with its content hash
    files: tuple[tuple[str, str], ...]  # (file relative to path, "" for path itself; its sha256)
    retrain: str  # the command that trains a replacement (into the cache)
    use_other: str  # how a run or command takes another file


SHIPPED = {n.name: n for n in (
    ShippedNetwork("fmnist-cnn", "fmnist-cnn-a46eda2ff3.safetensors",
                   (("", "a05ca318e3d4ca39c4a758e17e1122efe4a6fbbb6b2ee3d28b29b654bfa9ceaf"),),
                   "rrepa evaluator train", "--evaluator-weights PATH (train.eval_weights=PATH)"),
    ShippedNetwork("fmnist-ssl", "fmnist-ssl-ca873a8307.safetensors",
                   (("", "ca873a830709ea17462ac7861528e4553ab8141e15eebb7a83fcc0fe69c0cbab"),),
                   "rrepa encoder train", "align.encoder_weights=PATH"),
    ShippedNetwork("fmnist-vae", "fmnist-vae-e0900420b4",
                   (("config.json", "1ecaa61a2ad0bdd3a80b5ab286bb844b3eb4e7b149b354e865ac0957b3e5f5fc"),
                    ("diffusion_pytorch_model.safetensors",
                     "27533e2df782383d5f5d13e27fd3e43a0dcd6001c1c55d104f4dd19d875eae05")),
                   "rrepa vae train", "data.vae=PATH"),
    ShippedNetwork("fmnist-clutter-cnn", "fmnist-clutter-cnn-618a048268.safetensors",
                   (("", "187628b55e8aeb789175564a28f6404c1b5e9177332219bd635ad0926a160061"),),
                   "rrepa evaluator train --data fmnist-clutter --epochs 10",
                   "--evaluator-weights PATH (train.eval_weights=PATH)"),
    ShippedNetwork("fmnist-clutter-ssl", "fmnist-clutter-ssl-f623a3c78f.safetensors",
                   (("", "f623a3c78f306d051497778a0eb628a073dcc379e8260c0d752f42a1bd9a4369"),),
                   "rrepa encoder train --data fmnist-clutter", "align.encoder_weights=PATH"),
)}


def shipped(name: str) -> Path:
    """The path of the shipped network `name` (a file, or the VAE's folder), its files checked against their
    recorded SHA-256; FileNotFoundError / ValueError in one line naming the retrain command otherwise."""
    if name not in SHIPPED:
        raise KeyError(f"rrepa ships no network named {name!r}; it ships {', '.join(SHIPPED)}")
    net = SHIPPED[name]
    root = WEIGHTS / net.path
    for rel, digest in net.files:
        f = root / rel if rel else root
        fix = f"reinstall rrepa, or train a replacement with `{net.retrain}` and pass it with {net.use_other}"
        if not f.is_file():
            raise FileNotFoundError(f"the shipped {name} file {f} is missing from the rrepa package; {fix}")
        stat = f.stat()
        if _sha256(str(f), stat.st_size, stat.st_mtime_ns) != digest:
            raise ValueError(f"the shipped {name} file {f} is damaged (its SHA-256 is not the recorded one); {fix}")
    return root


def resolve_weights(weights: str | os.PathLike | None) -> str | os.PathLike | None:
    """A weights setting as a path: a shipped network's name becomes its checked file; anything else is returned
    as given (a path, or None for the caller's default)."""
    return shipped(str(weights)) if weights is not None and str(weights) in SHIPPED else weights


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, computed once per (path, size, mtime) in a process."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
