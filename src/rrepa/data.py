"""Datasets for training, evaluation and classification.

Every dataset yields ``(x, y)``: ``x`` a ``(C, H, W)`` float32 image in [-1, 1] (``uint8 / 127.5 - 1``,
the scaling the flow expects, see ../shared/DESIGN.md section 1) and ``y`` an int64 scalar label.
``ImageDataset.uint8(i)`` gives the same image as 8-bit values, never flipped, for bits/dim with uniform
dequantization.

Three sources, chosen by ``DataConfig.name``:

``fmnist``
    Fashion-MNIST (1 x 28 x 28, 10 classes), read from IDX files and held in memory as one uint8 tensor.
    The files are read from ``DataConfig.path`` (or ``path/fashion-mnist``) when it is given (anything else
    there is an error that says what the folder holds); without it they are searched for in
    /usr/share/datasets/fashion-mnist (Debian's ``dataset-fashion-mnist``), then in the cache directory
    (``$RREPA_CACHE_DIR``, else ``$XDG_CACHE_HOME/rrepa``, else ``~/.cache/rrepa``, + ``/fashion-mnist``),
    and are downloaded into that cache as a last resort unless ``RREPA_OFFLINE=1``. Each file may be
    gzip-compressed (``*.gz``) or raw. Only size 28 is accepted.

``folder``
    Images in ImageNet layout: one sub-folder per class (searched recursively for image files),
    classes sorted by folder name give the label indices. ``path`` is either

    - a root with a ``train/`` sub-folder (split "train") and a ``val/`` or ``test/`` sub-folder (split
      "test"); the class list is always taken from ``train/``, so both splits share the label indices,
      and the held-out folder may hold only some of the classes; or
    - a folder whose sub-folders are the classes themselves: it serves both splits (there is no
      held-out data then; the test split sees the training images, unflipped).

    Images are converted to RGB and cropped as in ADM (guided-diffusion): halve with a BOX filter while
    the short side is at least twice the target size, resize with BICUBIC so the short side equals the
    target size, then take the centre square. An unreadable or corrupt image is skipped: a warning
    names it once, it is counted in ``skipped``, and the next readable image (by index) is returned in
    its place. ``strict=True`` raises ``UnreadableImageError`` instead.

``npz``
    Downsampled ImageNet (Chrabaszcz et al. 2017, the official 8/16/32/64 px release): each ``.npz``
    holds ``data``, uint8 rows of ``3 * S * S`` values in channel-planar (CHW) order, and ``labels``,
    1-based class indices (1..1000). ``path`` is a single ``.npz`` file (used for whichever split is asked
    for) or a folder holding ``train_data_batch_<k>.npz`` (split "train", in numeric order of k) and
    ``val_data.npz`` (split "test"). Labels are shifted to 0-based; ``num_classes`` is 1000. The split
    is held in memory as one uint8 tensor. If ``S != image_size`` each image is resized on access with
    the same ADM transform as image folders.

Random horizontal flips (``hflip``) apply to the training split only and use torch's global RNG, so
DataLoader workers (which torch seeds differently) draw different flips.

``skipped`` counts the unreadable images this process has met: with DataLoader workers each worker
process keeps its own count.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import math
import os
import re
import urllib.request
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

logger = logging.getLogger(__name__)

DATASET_NAMES = ("fmnist", "folder", "npz")
SPLITS = ("train", "test")

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

IMAGENET_CLASSES = 1000

OFFLINE_ENV = "RREPA_OFFLINE"
CACHE_ENV = "RREPA_CACHE_DIR"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Which images to load and how. See the module docstring for each source's layout."""

    name: str = "fmnist"  # fmnist | folder | npz
    path: str | None = None  # fmnist: folder with the IDX files; folder: ImageNet-layout root; npz: file or folder
    image_size: int = 28  # folder / npz: output size after the ADM centre crop (fmnist: must be 28)
    hflip: bool = False  # random horizontal flip (training split only)
    strict: bool = False  # raise on an unreadable / corrupt image instead of skipping it

    def __post_init__(self) -> None:
        self._check_fields()

    def _check_fields(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ValueError(f"DataConfig.name must be one of {', '.join(DATASET_NAMES)}, got {self.name!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"DataConfig.image_size must be a positive int, got {self.image_size!r}")

    def validate(self) -> None:
        """Cross-field checks, run by build_dataset (fields may be set one by one before that)."""
        self._check_fields()
        if self.name == "fmnist" and self.image_size != 28:
            raise ValueError(f"Fashion-MNIST images are 28 x 28; got image_size={self.image_size} "
                             f"(use image_size=28, or a folder / npz dataset for other sizes)")
        if self.name in ("folder", "npz") and not self.path:
            raise ValueError(f"DataConfig.path (--data-dir) is required for the {self.name!r} dataset")


class UnreadableImageError(OSError):
    """An image file could not be decoded (raised only with ``strict=True``)."""


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset, ABC):
    """Base class: ``(x, y)`` pairs with x in [-1, 1], (C, H, W) float32, y an int64 scalar.

    Subclasses implement ``_load(i) -> (uint8 (C, H, W) tensor, int label)`` and may raise on an
    unreadable item; the base class handles skipping (or, with ``strict``, raising), flips and scaling.
    """

    num_classes: int
    channels: int
    image_size: int

    def __init__(self, *, num_classes: int, channels: int, image_size: int, hflip: bool = False,
                 strict: bool = False) -> None:
        self.num_classes = num_classes
        self.channels = channels
        self.image_size = image_size
        self.hflip = hflip
        self.strict = strict
        self._bad: set[int] = set()

    # -- to implement ------------------------------------------------------------------------
    @abstractmethod
    def __len__(self) -> int:
        ...

    @abstractmethod
    def _load(self, i: int) -> tuple[Tensor, int]:
        ...

    def _describe(self, i: int) -> str:
        return f"item {i}"

    # -- public ------------------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        """Number of unreadable images met so far in this process."""
        return len(self._bad)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img, label = self._get(i)
        if self.hflip and torch.rand(()).item() < 0.5:
            img = img.flip(-1)
        x = img.to(torch.float32) / 127.5 - 1.0
        return x, torch.tensor(label, dtype=torch.int64)

    def uint8(self, i: int) -> Tensor:
        """The i-th image as (C, H, W) uint8, never flipped."""
        return self._get(i)[0]

    def label(self, i: int) -> int:
        return self._get(i)[1]

    # -- internals ---------------------------------------------------------------------------
    def _index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} items")
        return i % n

    def _get(self, i: int) -> tuple[Tensor, int]:
        n = len(self)
        start = self._index(i)
        for k in range(n):
            j = (start + k) % n
            if j in self._bad:
                continue
            try:
                return self._load(j)
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
                what = self._describe(j)
                if self.strict:
                    raise UnreadableImageError(
                        f"cannot read {what}: {type(e).__name__}: {e} "
                        f"(strict=False skips unreadable images)") from e
                self._bad.add(j)
                logger.warning("skipping unreadable image %s: %s: %s", what, type(e).__name__, e)
        raise RuntimeError(f"no readable image left in {self!r}: all {n} items failed to load")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(items={len(self)}, channels={self.channels}, "
                f"image_size={self.image_size}, num_classes={self.num_classes}, hflip={self.hflip})")


class TensorImageDataset(ImageDataset):
    """Images held in memory: ``images`` (N, C, S, S) uint8 (or whole-valued floats in [0, 255], checked
    for NaN), ``labels`` (N,) ints in 0..num_classes-1. If ``image_size`` differs from S, each image is
    resized on access with the ADM centre crop."""

    def __init__(self, images: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int], *,
                 num_classes: int, image_size: int | None = None, hflip: bool = False,
                 name: str = "tensor") -> None:
        images = as_uint8_images(images, name)
        if images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"{name}: images must be (N, C, S, S), got shape {tuple(images.shape)}")
        labels = torch.as_tensor(np.asarray(labels)).to(torch.int64).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels")
        check_labels(labels, num_classes, name)
        stored = images.shape[-1]
        super().__init__(num_classes=num_classes, channels=images.shape[1],
                         image_size=stored if image_size is None else image_size, hflip=hflip)
        self.images = images
        self.targets = labels
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def _load(self, i: int) -> tuple[Tensor, int]:
        img = self.images[i]
        if img.shape[-1] != self.image_size:
            hwc = img.permute(1, 2, 0).numpy()
            pil = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
            out = center_crop_adm(pil, self.image_size)
            img = torch.from_numpy(out.reshape(self.image_size, self.image_size, -1)).permute(2, 0, 1).contiguous()
        return img, int(self.targets[i])

    def _describe(self, i: int) -> str:
        return f"{self.name}[{i}]"


class ImageFolderDataset(ImageDataset):
    """Images read from disk on access (RGB, ADM centre crop). ``samples`` lists (path, label)."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], *, image_size: int,
                 hflip: bool = False, strict: bool = False, root: str = "") -> None:
        if not samples:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        super().__init__(num_classes=len(classes), channels=3, image_size=image_size, hflip=hflip,
                         strict=strict)
        self.samples = list(samples)
        self.classes = list(classes)
        self.targets = torch.tensor([y for _, y in self.samples], dtype=torch.int64)
        self.root = root

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
        arr = center_crop_adm(rgb, self.image_size)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), label

    def _describe(self, i: int) -> str:
        return self.samples[i][0]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def build_dataset(cfg: DataConfig, split: str) -> ImageDataset:
    """The dataset ``cfg`` names, for ``split`` "train" or "test"; flips only on "train"."""
    cfg.validate()
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    hflip = cfg.hflip and split == "train"
    if cfg.name == "fmnist":
        images, labels = load_fashion_mnist(find_fashion_mnist(cfg.path), split)
        return TensorImageDataset(images, labels, num_classes=10, hflip=hflip, name=f"fashion-mnist/{split}")
    if cfg.name == "folder":
        root, classes = _folder_split(Path(cfg.path), split)
        samples = _scan_folder(root, classes)
        ds = ImageFolderDataset(samples, classes, image_size=cfg.image_size, hflip=hflip, strict=cfg.strict,
                                root=str(root))
        logger.info("image folder %s: %d images, %d classes", root, len(ds), len(classes))
        return ds
    files = npz_files(Path(cfg.path), split)
    images, labels = load_npz(files)
    if images.shape[-1] != cfg.image_size:
        logger.info("npz images are %d px; resizing to %d px on access", images.shape[-1], cfg.image_size)
    return TensorImageDataset(images, labels, num_classes=IMAGENET_CLASSES, image_size=cfg.image_size,
                              hflip=hflip, name=f"{cfg.path}/{split}")


# --------------------------------------------------------------------------------------------
# Checks shared by every source
# --------------------------------------------------------------------------------------------


def as_uint8_images(images: Tensor | np.ndarray, what: str) -> Tensor:
    """uint8 tensor of 8-bit pixel values. Integer input must lie in 0..255; float input must be free of
    NaN / inf and hold whole numbers in [0, 255]."""
    t = torch.as_tensor(images)
    if t.dtype == torch.uint8:
        return t
    if t.is_floating_point():
        if torch.isnan(t).any():
            raise ValueError(f"{what}: image data contains NaN")
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}: image data contains inf")
        if t.numel() and (t.min() < 0 or t.max() > 255 or (t != t.round()).any()):
            raise ValueError(f"{what}: float image data must hold 8-bit pixel values (whole numbers in 0..255)")
    elif t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{what}: image data has unsupported dtype {t.dtype}")
    elif t.numel() and (t.min() < 0 or t.max() > 255):
        raise ValueError(f"{what}: pixel values must lie in 0..255, found {int(t.min())}..{int(t.max())}")
    return t.to(torch.uint8)


def check_labels(labels: Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what}: labels must lie in 0..{num_classes - 1}, "
                         f"found {int(labels.min())}..{int(labels.max())}")


# --------------------------------------------------------------------------------------------
# ADM centre crop
# --------------------------------------------------------------------------------------------


def center_crop_adm(img: Image.Image, size: int) -> np.ndarray:
    """ADM's (guided-diffusion) crop: BOX-halve while the short side >= 2 * size, BICUBIC-resize the short
    side to ``size``, take the centre ``size`` x ``size`` square. Returns an (H, W[, C]) uint8 array."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    new_w = max(size, round(img.width * scale))
    new_h = max(size, round(img.height * scale))
    img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    arr = np.array(img)  # a writable copy
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


# --------------------------------------------------------------------------------------------
# IDX files and Fashion-MNIST
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


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = folder / name
        if p.is_file():
            return p
    return None


def _has_fashion_mnist(folder: Path) -> bool:
    return all(_idx_path(folder, s) is not None for pair in FASHION_MNIST_FILES.values() for s in pair)


def cache_dir() -> Path:
    """Where rrepa keeps what it downloads or trains once (datasets, the embedded encoder and evaluator,
    feature caches, reference statistics): $RREPA_CACHE_DIR, else $XDG_CACHE_HOME/rrepa, else ~/.cache/rrepa."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg, "rrepa") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "rrepa")
    return Path(base)


def fashion_mnist_cache_dir() -> Path:
    return cache_dir() / "fashion-mnist"


def is_offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


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
    then a download into the cache unless RREPA_OFFLINE=1. Raises a one-line FileNotFoundError otherwise (for
    a given data_dir: what it holds instead and which data.name would read it)."""
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
        reason = f"{OFFLINE_ENV}=1, no download tried"
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
    return f"{where} holds none of Fashion-MNIST's IDX files ({files}); give the folder that holds them"


def load_fashion_mnist(folder: str | os.PathLike, split: str) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 28, 28) uint8 and labels (N,) int64 of a split, validated."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(folder)
    img_stem, lab_stem = FASHION_MNIST_FILES[split]
    img_path, lab_path = _idx_path(folder, img_stem), _idx_path(folder, lab_stem)
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


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _class_dirs(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _folder_split(root: Path, split: str) -> tuple[Path, list[str]]:
    """(folder to scan, class names) for a split; see the module docstring for the two layouts."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if (root / "train").is_dir():
        classes = _class_dirs(root / "train")
        if not classes:
            raise FileNotFoundError(f"{root / 'train'} has no class sub-folders")
        if split == "train":
            return root / "train", classes
        for name in ("val", "test"):
            if (root / name).is_dir():
                extra = sorted(set(_class_dirs(root / name)) - set(classes))
                if extra:
                    raise ValueError(f"{root / name} has class folders absent from {root / 'train'}: "
                                     f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
                return root / name, classes
        raise FileNotFoundError(f"{root} has train/ but neither val/ nor test/ for the test split")
    classes = _class_dirs(root)
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders (expected root/<class>/<image> or "
                                f"root/train/<class>/<image> with root/val/<class>/<image>)")
    return root, classes


def _scan_folder(root: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue  # a held-out split may lack some classes
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), index))
    return samples


# --------------------------------------------------------------------------------------------
# Downsampled-ImageNet npz batches
# --------------------------------------------------------------------------------------------


def npz_files(path: Path, split: str) -> list[Path]:
    """The .npz files of a split: ``path`` itself if it is a file, else train_data_batch_<k>.npz (numeric
    order) for "train" and val_data.npz for "test"."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"npz path {path} does not exist")
    if split == "train":
        found = [(int(m.group(1)), p) for p in path.glob("train_data_batch_*.npz")
                 if (m := re.fullmatch(r"train_data_batch_(\d+)\.npz", p.name))]
        files = [p for _, p in sorted(found)]
        if not files and (path / "train_data.npz").is_file():
            files = [path / "train_data.npz"]
        expected = "train_data_batch_<k>.npz"
    else:
        files = [p for p in (path / "val_data.npz", path / "test_data.npz") if p.is_file()][:1]
        expected = "val_data.npz"
    if not files:
        raise FileNotFoundError(f"no {expected} in {path} for the {split} split")
    return files


def _npz_rows(path: Path) -> int | None:
    """Number of rows of ``data`` from the .npy header inside the zip, without decompressing it."""
    try:
        with zipfile.ZipFile(path) as z, z.open("data.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(f)
        return int(shape[0]) if shape else None
    except Exception:  # noqa: BLE001 - fall back to loading the array
        return None


def _read_npz(path: Path) -> tuple[Tensor, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: cannot read npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("data", "labels") if k not in z.files]
            if missing:
                raise ValueError(f"{path}: missing array(s) {', '.join(missing)} (found {', '.join(z.files)}); "
                                 f"expected Downsampled ImageNet's layout: data (N, 3*S*S) uint8 rows in CHW order "
                                 f"and labels (N,) 1-based")
            data, labels = z["data"], np.asarray(z["labels"])
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read npz file ({type(e).__name__}: {e})") from e
    data = as_uint8_images(data, str(path))
    if data.ndim == 2:
        side = math.isqrt(data.shape[1] // 3) if data.shape[1] % 3 == 0 else 0
        if side < 1 or 3 * side * side != data.shape[1]:
            raise ValueError(f"{path}: data rows have {data.shape[1]} values, not 3 * S * S for a square RGB image")
        data = data.reshape(-1, 3, side, side)
    elif not (data.ndim == 4 and data.shape[1] == 3 and data.shape[2] == data.shape[3]):
        raise ValueError(f"{path}: data must be (N, 3*S*S) rows in CHW order (or (N, 3, S, S)), "
                         f"got shape {tuple(data.shape)}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: labels must be (N,) with N = {data.shape[0]} images, got shape {labels.shape}")
    if labels.dtype.kind == "f":
        if np.isnan(labels).any():
            raise ValueError(f"{path}: labels contain NaN")
        if (labels != np.round(labels)).any():
            raise ValueError(f"{path}: labels must be whole numbers")
    elif labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels have unsupported dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > IMAGENET_CLASSES):
        raise ValueError(f"{path}: labels must be 1-based class indices in 1..{IMAGENET_CLASSES} (the official "
                         f"release's), found {labels.min()}..{labels.max()}")
    return data, labels - 1


def load_npz(files: Sequence[Path]) -> tuple[Tensor, Tensor]:
    """Images (N, 3, S, S) uint8 and 0-based labels (N,) int64 from downsampled-ImageNet npz files."""
    rows = [_npz_rows(p) for p in files]
    prealloc = len(files) > 1 and all(r is not None for r in rows)
    images: Tensor | None = None
    parts: list[Tensor] = []
    labels: list[np.ndarray] = []
    pos = 0
    for p in files:
        data, lab = _read_npz(p)
        if images is None and prealloc:  # one buffer for all files: no second copy when concatenating
            images = torch.empty((sum(rows), *data.shape[1:]), dtype=torch.uint8)
        ref = images if images is not None else (parts[0] if parts else None)
        if ref is not None and data.shape[1:] != ref.shape[1:]:
            raise ValueError(f"{p}: images are {tuple(data.shape[1:])}, other files hold {tuple(ref.shape[1:])}")
        if images is not None:
            if pos + data.shape[0] > images.shape[0]:
                raise ValueError(f"{p}: holds more rows than its header announced")
            images[pos:pos + data.shape[0]] = data
        else:
            parts.append(data)
        pos += data.shape[0]
        labels.append(lab)
    if images is None:
        images = parts[0] if len(parts) == 1 else torch.cat(parts)
    elif pos != images.shape[0]:
        raise ValueError(f"npz files hold {pos} rows, their headers announced {images.shape[0]}")
    return images, torch.from_numpy(np.concatenate(labels))
