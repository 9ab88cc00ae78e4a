"""Reading images from disk, for rrepa.data: the 8-bit checks every source shares, ADM's centre crop, image
folders in ImageNet layout (one sub-folder per class) and downsampled-ImageNet npz batches. The layouts are
described in rrepa.data's docstring; the Fashion-MNIST files are read by rrepa.fmnist.dataset.

Everything here returns uint8 pixels: images (N, C, S, S) or (H, W[, C]) arrays, labels 0-based."""

from __future__ import annotations

import math
import os
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
IMAGENET_CLASSES = 1000


# --------------------------------------------------------------------------------------------
# 8-bit checks shared by every source
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
# Image folders
# --------------------------------------------------------------------------------------------


def _class_dirs(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def folder_split(root: Path, split: str) -> tuple[Path, list[str]]:
    """(folder to scan, class names) for a split; see rrepa.data's docstring for the two layouts."""
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


def scan_folder(root: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """(path, label) of every image file under root/<class>/ (recursively, in sorted order); label is the
    class's index in `classes`."""
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
