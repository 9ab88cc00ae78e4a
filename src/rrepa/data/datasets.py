"""Datasets for training, evaluation and classification: what the trainer sees.

Every dataset yields ``(x, y)``: ``x`` a ``(C, H, W)`` float32 image in [-1, 1] (``uint8 / 127.5 - 1``,
the scaling the flow expects, see docs/DESIGN.md section 1) and ``y`` an int64 scalar label.
``ImageDataset.uint8(i)`` gives the same image as 8-bit values, never flipped, for bits/dim with uniform
dequantization.

Three sources, chosen by ``DataConfig.name``; the files are read by rrepa.fmnist.dataset (Fashion-MNIST) and
rrepa.data.image_io (the other two):

``fmnist``
    Fashion-MNIST (1 x 28 x 28, 10 classes), read from IDX files and held in memory as one uint8 tensor.
    ``DataConfig.path`` names the folder of the IDX files; without it they are searched for in the system's
    and rrepa's cache folders, then downloaded unless offline (see rrepa.fmnist.dataset). Only size 28 is
    accepted.

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

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rrepa.data.clutter import MIN_CANVAS, cluttered
from rrepa.data.image_io import (
    IMAGE_EXTENSIONS,
    IMAGENET_CLASSES,
    as_uint8_images,
    center_crop_adm,
    check_labels,
    folder_split,
    load_npz,
    npz_files,
    scan_folder,
)
from rrepa.fmnist.dataset import find_fashion_mnist, load_fashion_mnist
from rrepa.utils import from_uint8

logger = logging.getLogger(__name__)

DATASET_NAMES = ("fmnist", "fmnist-clutter", "folder", "npz")
SPLITS = ("train", "test")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Which images to load and how. See the module docstring for each source's layout."""

    name: str = "fmnist"  # fmnist | fmnist-clutter | folder | npz
    path: str | None = None  # fmnist: folder with the IDX files; folder: ImageNet-layout root; npz: file or folder
    image_size: int = 28  # folder / npz: size after the ADM centre crop; fmnist-clutter: canvas (>= 32); fmnist: 28
    clutter_seed: int = 0  # fmnist-clutter: the seed of the placements and the clutter (rrepa.data.clutter)
    hflip: bool = False  # random horizontal flip (training split only)
    strict: bool = False  # raise on an unreadable / corrupt image instead of skipping it
    # Latent runs (rrepa.data.latent_run): the fields above name the IMAGES; with `vae` set the flow is trained on their
    # VAE latents (the model's in_channels / image size are the latent grid), and everything shown is decoded.
    vae: str | None = None  # None: pixels; else a diffusers AutoencoderKL folder, a hub id, or fmnist-vae (embedded)
    # Set by training from the VAE it loaded (sha256 of weights + config): sampling, evaluation and resuming refuse
    # a VAE that is not the one the run was trained with. None: not pinned yet.
    vae_fingerprint: str | None = None
    latent_cache: str | None = None  # caches in <it>/train, <it>/test; None: <cache>/latents/<vae>-<split>-<data>...
    latent_sample: bool = False  # cache one posterior sample per image instead of the posterior mean
    latent_dtype: str = "float16"  # storage dtype of the latent cache: float16 | float32

    def __post_init__(self) -> None:
        self._check_fields()

    def _check_fields(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ValueError(f"DataConfig.name must be one of {', '.join(DATASET_NAMES)}, got {self.name!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"DataConfig.image_size must be a positive int, got {self.image_size!r}")
        if self.latent_dtype not in ("float16", "float32"):
            raise ValueError(f"DataConfig.latent_dtype must be float16 or float32, got {self.latent_dtype!r}")

    def validate(self) -> None:
        """Cross-field checks, run by build_dataset (fields may be set one by one before that)."""
        self._check_fields()
        if self.name == "fmnist" and self.image_size != 28 and not self.vae:  # latents: resized for the VAE
            raise ValueError(f"Fashion-MNIST images are 28 x 28; got image_size={self.image_size} "
                             f"(use image_size=28, or a folder / npz dataset for other sizes)")
        if self.name == "fmnist-clutter" and self.image_size < MIN_CANVAS:
            raise ValueError(f"fmnist-clutter draws the 28 px items on a larger canvas: set data.image_size >= "
                             f"{MIN_CANVAS} (e.g. 32), got {self.image_size}")
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
        x = from_uint8(img)
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
    if cfg.name in ("fmnist", "fmnist-clutter"):
        images, labels = load_fashion_mnist(find_fashion_mnist(cfg.path), split)
        if cfg.name == "fmnist":
            return TensorImageDataset(images, labels, num_classes=10, hflip=hflip, name=f"fashion-mnist/{split}")
        canvases = cluttered(images.squeeze(1).numpy(), cfg.clutter_seed, split, cfg.image_size)
        return TensorImageDataset(canvases, labels, num_classes=10, hflip=hflip,
                                  name=f"fmnist-clutter-{cfg.image_size}px-seed{cfg.clutter_seed}/{split}")
    if cfg.name == "folder":
        root, classes = folder_split(Path(cfg.path), split)
        samples = scan_folder(root, classes)
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
