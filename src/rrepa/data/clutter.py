"""fmnist-clutter: Fashion-MNIST items at a random position and scale on a larger canvas, over clutter made of
random crops of other items (issue #32). A testbed where the REPA premise can hold: the object is intact, so an
encoder that pools over positions still recognises it, while a linear read of the pixels, which on Fashion-MNIST
itself reaches 84.5 %, loses most of its grip because no pixel means the same thing from one image to the next.

Each split is derived from the same split of Fashion-MNIST, item for item (same labels, same order), and
deterministically from `seed`: the placement and the clutter of item i of a split depend on (seed, split) only,
never on the machine. One item is drawn as

    canvas  S x S zeros (S = data.image_size, at least 32)
    clutter CROPS squares cut at random from random other items of the same split, each CROP_SIZE px, scaled in
            brightness by a factor in CONTRAST, pasted at random positions (overlaps keep the brighter pixel)
    object  the item resized (bilinear, antialiased) to a side of round(28 x scale), scale uniform in SCALE,
            at a random position inside the canvas; its pixels above OBJECT_THRESHOLD replace the clutter's

A build takes seconds and is cached as uint8 arrays under <cache>/datasets/fmnist-clutter/, keyed by the recipe's
version, S, the seed and the source's hash; the write is atomic, so an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rrepa.utils import atomic_write, cache_dir, file_lock

VERSION = 1  # of the recipe below: a change makes a new cache entry
SCALE = (0.55, 0.9)  # the object's side as a fraction of its 28 px
CROPS = 4  # clutter squares per image
CROP_SIZE = (8, 14)  # their side in px, inclusive
CONTRAST = (0.4, 1.0)  # brightness factor of each clutter square
OBJECT_THRESHOLD = 16  # object pixels (uint8) above this cover the clutter: the item's own dark background does not
MIN_CANVAS = 32
SPLIT_IDS = {"train": 0, "test": 1}


def draw(images: np.ndarray, seed: int, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The cluttered split: images (N, 28, 28) uint8 of the source split -> ((N, 1, size, size) uint8 canvases,
    (N, 3) int64 placements (x0, y0, side) of each object, for tests and figures)."""
    if size < MIN_CANVAS:
        raise ValueError(f"fmnist-clutter needs a canvas of at least {MIN_CANVAS} px, got data.image_size={size}")
    n, src = images.shape[0], images.shape[-1]
    rng = np.random.default_rng([seed, SPLIT_IDS[split], VERSION])
    sides = np.rint(src * rng.uniform(*SCALE, n)).astype(np.int64)
    x0 = np.floor(rng.uniform(0, 1, n) * (size - sides + 1)).astype(np.int64)
    y0 = np.floor(rng.uniform(0, 1, n) * (size - sides + 1)).astype(np.int64)
    others = (np.arange(n)[:, None] + rng.integers(1, max(n, 2), (n, CROPS))) % n  # never the item itself
    crop = rng.integers(CROP_SIZE[0], CROP_SIZE[1] + 1, (n, CROPS))
    cx, cy = (np.floor(rng.uniform(0, 1, (n, CROPS)) * (src - crop + 1)).astype(np.int64) for _ in range(2))
    px, py = (np.floor(rng.uniform(0, 1, (n, CROPS)) * (size - crop + 1)).astype(np.int64) for _ in range(2))
    gain = rng.uniform(*CONTRAST, (n, CROPS))
    canvas = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        for k in range(CROPS):
            c = crop[i, k]
            piece = (images[others[i, k], cy[i, k]:cy[i, k] + c, cx[i, k]:cx[i, k] + c] * gain[i, k]).astype(np.uint8)
            region = canvas[i, py[i, k]:py[i, k] + c, px[i, k]:px[i, k] + c]
            np.maximum(region, piece, out=region)
    objects = torch.from_numpy(images).unsqueeze(1).float()
    for side in np.unique(sides):
        idx = np.nonzero(sides == side)[0]
        scaled = F.interpolate(objects[idx], size=(int(side), int(side)), mode="bilinear", align_corners=False,
                               antialias=True).round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy()
        for j, i in enumerate(idx):
            region = canvas[i, y0[i]:y0[i] + side, x0[i]:x0[i] + side]
            on = scaled[j] > OBJECT_THRESHOLD
            region[on] = scaled[j][on]
    return canvas[:, None], np.stack([x0, y0, sides], 1)


def cluttered(images: np.ndarray, seed: int, split: str, size: int, root: Path | None = None) -> np.ndarray:
    """draw's canvases (N, 1, size, size) uint8, from the cache when built before (root: the cache folder,
    default <cache>/datasets/fmnist-clutter)."""
    source = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:12]
    root = Path(root) if root else cache_dir() / "datasets" / "fmnist-clutter"
    path = root / f"v{VERSION}-{size}px-seed{seed}-{source}-{split}.npy"
    with file_lock(root / ".lock"):  # DDP ranks on one host build it once
        if path.is_file():
            out = np.load(path)
            if out.shape == (images.shape[0], 1, size, size) and out.dtype == np.uint8:
                return out
        out, _ = draw(images, seed, split, size)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, out)

        atomic_write(path, write)
    return out
