"""What the on-disk caches of a dataset share (the latent cache, the encoder-target cache): the dataset's tag and
fingerprint and its clean images."""

from __future__ import annotations

import hashlib
import os

import torch
from torch import Tensor

from rrepa.data.datasets import TensorImageDataset
from rrepa.utils import to_uint8


def clean_uint8(dataset, i: int) -> Tensor:
    """The i-th image, unflipped, as uint8 (C, H, W)."""
    if hasattr(dataset, "uint8"):
        return dataset.uint8(i)
    if getattr(dataset, "hflip", False):
        raise ValueError(f"{type(dataset).__name__} flips at random and has no uint8(i); pass an rrepa "
                         f"ImageDataset or a dataset built with hflip off")
    return to_uint8(dataset[i][0])


def dataset_tag(dataset) -> str:
    """A short description of the dataset (its name / root / type), used to name the cache folder."""
    for attr in ("name", "root"):
        v = getattr(dataset, attr, None)
        if isinstance(v, str | os.PathLike) and str(v):
            return f"{type(dataset).__name__}:{v}"
    return type(dataset).__name__


FULL_HASH_BYTES = 2**30  # in-memory datasets up to this size are hashed whole


def dataset_fingerprint(dataset, samples: int = 64) -> str:
    """sha256 of the dataset's type, length, image shape, and its pixels: all of them for an in-memory
    TensorImageDataset of at most 1 GiB, else `samples` evenly spaced images (first and last included)."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty; nothing to cache")
    h = hashlib.sha256(f"{type(dataset).__name__}|{n}|".encode())
    first = clean_uint8(dataset, 0)
    h.update(f"{tuple(first.shape)}|{first.dtype}|".encode())
    if (isinstance(dataset, TensorImageDataset) and dataset.images.shape[-1] == dataset.image_size
            and dataset.images.numel() <= FULL_HASH_BYTES):
        h.update(b"all|")
        h.update(dataset.images.contiguous().numpy())
    else:
        for i in sorted({round(k * (n - 1) / max(1, samples - 1)) for k in range(samples)}):
            h.update(f"{i}|".encode())
            h.update(clean_uint8(dataset, i).contiguous().numpy().tobytes())
    return h.hexdigest()


def dataset_images(dataset) -> Tensor:
    """All images of an rrepa ImageDataset as (N, C, H, W) uint8, unflipped, WITHOUT reading labels
    (uses the in-memory tensor of a TensorImageDataset, else dataset.uint8(i))."""
    if isinstance(dataset, TensorImageDataset) and dataset.images.shape[-1] == dataset.image_size:
        return dataset.images
    if not hasattr(dataset, "uint8"):
        raise ValueError(f"{type(dataset).__name__} has no uint8(i); pass an rrepa ImageDataset (rrepa.data)")
    return torch.stack([dataset.uint8(i) for i in range(len(dataset))])
