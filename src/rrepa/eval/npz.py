"""ADM's samples npz layout, read and written in one place: ``arr_0`` (N, H, W, C) uint8 with C = 1 or 3
(ADM also writes grey images as (N, H, W)) and, for class-conditional samples, ``labels`` (N,) int64.
`rrepa sample --format npz` writes it, `rrepa evaluate --samples` and the reference batches read it."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from torch import Tensor

from rrepa.utils import as_nchw_uint8, check_nhwc_uint8, save_npz, to_uint8


def open_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    """np.load of an .npz archive (no pickles), with one-line errors for a missing, unreadable or .npy file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:4] != b"PK\x03\x04" and magic != b"\x93NUMPY":  # numpy would advise unpickling anything else
        raise ValueError(f"{path} is not an .npz archive (it does not start like a zip file); give the samples npz "
                         f"of `rrepa sample --format npz` (ADM's layout: arr_0 (N, H, W, C) uint8)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz file: {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a .npy array, not an .npz archive")
    return npz


def check_labels(labels, n: int, where: str) -> np.ndarray:
    """Labels (N,) = (n,) of an integer dtype, as int64; ValueError naming `where` otherwise."""
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be (N,) = ({n},) integers, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def read_samples_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(images (N, H, W, C) uint8, labels (N,) int64 or None) of an ADM-layout samples npz."""
    with open_npz(path) as npz:
        if "arr_0" not in npz.files:
            raise ValueError(f"{path}: no arr_0 (ADM's sample layout is arr_0 (N, H, W, C) uint8 [+ labels])")
        images = check_nhwc_uint8(npz["arr_0"], f"{path}: arr_0")
        labels = check_labels(npz["labels"], images.shape[0], str(path)) if "labels" in npz.files else None
    return images, labels


def write_samples_npz(path: str | os.PathLike, images, labels=None) -> Path:
    """Write ADM's layout atomically (utils.save_npz; the name is kept as given): arr_0 (N, H, W, C) uint8,
    plus labels (N,) int64 when given. Returns the path.

    images: a tensor (N, C, H, W) (or (N, H, W)), floats in [-1, 1] (the flow's output; rounded to uint8 by
    utils.to_uint8, NaN or inf refused) or uint8, on any device; or a uint8 numpy array in ADM's (N, H, W, C)
    or (N, H, W) layout. labels: None, or N integers (a tensor on any device, an array or a list)."""
    if isinstance(images, Tensor):
        images = to_uint8(images.detach().cpu())
    x = as_nchw_uint8(images).permute(0, 2, 3, 1).contiguous().numpy()
    arrays = {"arr_0": x}
    if labels is not None:
        arrays["labels"] = check_labels(labels, x.shape[0], "labels")
    return save_npz(path, **arrays)
