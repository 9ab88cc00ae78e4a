"""Fashion-MNIST (1 x 28 x 28, 10 classes): the IDX reader, where the files are found, and the download.

The four IDX files (each gzip-compressed ``*.gz`` or raw) are read from ``DataConfig.path`` (or
``path/fashion-mnist``) when it is given (anything else there is an error that says what the folder holds);
without it they are searched for in /usr/share/datasets/fashion-mnist (Debian's ``dataset-fashion-mnist``),
then in the cache directory (rrepa.utils.cache_dir() + ``/fashion-mnist``), and are downloaded into that cache
as a last resort unless offline (RREPA_OFFLINE=1 or HF_HUB_OFFLINE=1). rrepa.data.datasets.build_dataset("fmnist")
holds a split in memory as one uint8 tensor."""

from __future__ import annotations

import gzip
import http.client
import logging
import math
import os
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rrepa.data.image_io import IMAGE_EXTENSIONS
from rrepa.utils import cache_dir, is_offline

logger = logging.getLogger(__name__)

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# --------------------------------------------------------------------------------------------
# IDX files (the MNIST format)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw (detected from the content).

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, then one big-endian uint32 per dimension. Raises ValueError
    naming the file for a bad magic number, a truncated or over-long payload, a corrupt gzip stream, or
    NaN in float data."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or code not in _IDX_DTYPES or ndim < 1:
        raise ValueError(f"{path}: bad IDX magic number 0x{magic:08X} (expected 0x0000TTNN with type TT in "
                         f"{{08, 09, 0B, 0C, 0D, 0E}} and NN >= 1 dimensions); not an IDX file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {header} expected)")
    shape = tuple(int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header
    if found < expected:
        raise ValueError(f"{path}: truncated IDX file: shape {shape} needs {expected} data bytes, found {found}")
    if found > expected:
        raise ValueError(f"{path}: IDX file has {found - expected} unexpected trailing bytes after shape {shape}")
    arr = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=header).reshape(shape)
    arr = arr.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{path}: IDX data contains NaN")
    return arr


# --------------------------------------------------------------------------------------------
# Finding, downloading and loading Fashion-MNIST
# --------------------------------------------------------------------------------------------


def idx_file(folder: Path, stem: str) -> Path | None:
    """folder/stem.gz or folder/stem, whichever exists (the .gz first); None if neither does."""
    for name in (stem + ".gz", stem):
        p = folder / name
        if p.is_file():
            return p
    return None


def _has_fashion_mnist(folder: Path) -> bool:
    return all(idx_file(folder, s) is not None for pair in FASHION_MNIST_FILES.values() for s in pair)


def fashion_mnist_cache_dir() -> Path:
    """Where the files are downloaded to (and searched for after the system folder)."""
    return cache_dir() / "fashion-mnist"


def download_fashion_mnist(dest: Path, timeout: float = 10.0) -> Path:
    """Download the four Fashion-MNIST .gz files into ``dest`` (each checked with read_idx before it is
    moved into place). Raises OSError (urllib's URLError included) or http.client.HTTPException on
    failure. Tests replace this function, so that they never reach the network."""
    dest.mkdir(parents=True, exist_ok=True)
    for pair in FASHION_MNIST_FILES.values():
        for stem in pair:
            target = dest / (stem + ".gz")
            if target.is_file():
                continue
            part = target.with_name(target.name + ".part")
            logger.info("downloading %s%s.gz", FASHION_MNIST_URL, stem)
            with urllib.request.urlopen(FASHION_MNIST_URL + stem + ".gz", timeout=timeout) as r:
                part.write_bytes(r.read())
            try:
                read_idx(part)
            except ValueError as e:
                part.unlink(missing_ok=True)
                raise OSError(f"downloaded {stem}.gz is corrupt: {e}") from e
            part.replace(target)
    return dest


def find_fashion_mnist(data_dir: str | os.PathLike | None) -> Path:
    """Folder holding the four Fashion-MNIST IDX files (each ``.gz`` or raw): ``data_dir`` (or
    ``data_dir/fashion-mnist``) when given, else /usr/share/datasets/fashion-mnist, then the cache directory,
    then a download into the cache unless offline (utils.is_offline). Raises a one-line FileNotFoundError
    otherwise (for a given data_dir: what it holds instead and which data.name would read it)."""
    looked: list[str] = []
    if data_dir is not None:
        # A path the user gave is used or refused: falling back to another copy would train on other data.
        for folder in (Path(data_dir), Path(data_dir) / "fashion-mnist"):
            if _has_fashion_mnist(folder):
                return folder
        raise FileNotFoundError(_not_fashion_mnist(Path(data_dir)))
    cache = fashion_mnist_cache_dir()
    for folder in (FASHION_MNIST_SYSTEM_DIR, cache):
        if _has_fashion_mnist(folder):
            return folder
        looked.append(str(folder))
    if is_offline():
        reason = "RREPA_OFFLINE=1 or HF_HUB_OFFLINE=1, no download tried"
    else:
        try:
            folder = download_fashion_mnist(cache)
            if _has_fashion_mnist(folder):
                return folder
            reason = f"download into {folder} left files missing"
        except (OSError, http.client.HTTPException) as e:
            reason = f"download failed: {e}".replace("\n", " ")
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files ({', '.join(s for p in FASHION_MNIST_FILES.values() for s in p)}[.gz]) "
        f"not found in {', '.join(looked)} ({reason}); install them with `apt-get install "
        f"dataset-fashion-mnist` or pass their folder with --data-dir")


def _not_fashion_mnist(path: Path) -> str:
    """Why `path` (data.path / --data-dir) is not a Fashion-MNIST folder, and what to pass instead."""
    files = ", ".join(f"{s}[.gz]" for pair in FASHION_MNIST_FILES.values() for s in pair)
    where = f"data path {path} (--data-dir / data.path)"
    if not path.exists():
        return (f"{where} does not exist; give the folder holding {files}, or leave it out to use "
                f"{FASHION_MNIST_SYSTEM_DIR}")
    if path.is_file():
        kind = " (an npz file: set data.name=npz for downsampled ImageNet)" if path.suffix == ".npz" else ""
        return f"{where} is a file{kind}; Fashion-MNIST (data.name=fmnist) needs the folder holding {files}"
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    if not entries:
        return f"{where} is an empty folder; Fashion-MNIST (data.name=fmnist) needs the folder holding {files}"
    images = any(e.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in e.rglob("*")) for e in entries[:50])
    if images or any(e.suffix.lower() in IMAGE_EXTENSIONS for e in entries):
        return (f"{where} holds image files, not Fashion-MNIST's IDX files; for an image folder (one sub-folder per "
                f"class) set data.name=folder (--set data.name=folder)")
    if any(e.suffix == ".npz" for e in entries):
        return f"{where} holds .npz files, not Fashion-MNIST's IDX files; for downsampled ImageNet set data.name=npz"
    stems = [s for pair in FASHION_MNIST_FILES.values() for s in pair]
    missing = [s for s in stems if idx_file(path, s) is None]
    if len(missing) < len(stems):  # some but not all: name the missing ones
        return (f"{where} holds {len(stems) - len(missing)} of Fashion-MNIST's 4 IDX files but not "
                f"{', '.join(f'{s}[.gz]' for s in missing)}; add the missing ones (or give the folder holding all 4)")
    return f"{where} holds none of Fashion-MNIST's IDX files ({files}); give the folder that holds them"


def load_fashion_mnist(folder: str | os.PathLike, split: str) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 28, 28) uint8 and labels (N,) int64 of a split, validated."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(folder)
    img_stem, lab_stem = FASHION_MNIST_FILES[split]
    img_path, lab_path = idx_file(folder, img_stem), idx_file(folder, lab_stem)
    if img_path is None or lab_path is None:
        raise FileNotFoundError(f"{folder}: missing {img_stem}[.gz] or {lab_stem}[.gz]")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected uint8 images of shape (N, 28, 28) (IDX magic 0x00000803), got "
                         f"{images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{lab_path}: expected uint8 labels of shape (N,) (IDX magic 0x00000801), got "
                         f"{labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lab_path}: Fashion-MNIST labels must lie in 0..9, found max {labels.max()}")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


