"""A disk cache of encoder targets: the frozen encoder's patch tokens of every clean training image,
computed once and memory-mapped.

Layout: ``<root>/<encoder name>-<dataset tag hash>/`` holds ``features.npy`` (float16, shape
(N, F, n, d): dataset index, flip (F = 2 with hflip: entry 0 the image, entry 1 its horizontal mirror;
F = 1 without), token, channel) and ``meta.json`` (the sidecar: fingerprint, shapes, grid, encoder and
dataset descriptions). The features of a flipped image are the encoder's tokens of the flipped image (not
the flipped tokens of the image).

The cache is keyed by a fingerprint of the encoder (its weights and preprocessing,
``FrozenEncoder.fingerprint``) and of the dataset (its type, length, image shape, and a hash of all its
pixels when it is held in memory and at most 1 GiB, else of 64 evenly spaced images): when either changes the cache is
rebuilt in place, otherwise it is reused. A cache built with hflip serves requests without it too.

Builds are atomic: everything is written into a temporary folder beside the cache, synced, and renamed
into place, so an interrupted build leaves no half-written cache (a temporary folder left by a killed
process is removed by the next build). Concurrent builders of the same cache (DDP ranks on one host)
serialise on a lock file; the second one loads what the first built.

Size: N * F * n * d * 2 bytes; Fashion-MNIST with fmnist-ssl (7 x 7 x 128) is 0.75 GB per flip state.
Full ImageNet with DINOv2-B at 224 px would need ~0.5 TB per flip state: compute the targets online there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from rrepa.data.cache import clean_uint8, dataset_fingerprint, dataset_tag
from rrepa.utils import file_lock, from_uint8, temp_dir_beside

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: file_lock does nothing
    fcntl = None

FORMAT_VERSION = 1
FEATURES_FILE = "features.npy"
META_FILE = "meta.json"
DTYPE = np.float16


def cache_fingerprint(encoder_fp: str, data_fp: str) -> str:
    return hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "encoder": encoder_fp, "data": data_fp,
                                      "dtype": np.dtype(DTYPE).name}, sort_keys=True).encode()).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "encoder"


def _fsync(path: Path) -> None:
    """Sync a file written in place (the memory-mapped features, the sidecar) inside the temporary folder; the
    folder as a whole is what is renamed into place, so utils.atomic_write (one file) does not apply."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _CleanImages(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tensor:
        return clean_uint8(self.dataset, i)


class FeatureCache:
    """Memory-mapped encoder targets; see the module docstring. Build or open one with build_or_load."""

    def __init__(self, path: str | os.PathLike, features: np.ndarray, meta: dict):
        self.path = Path(path)
        self.features = features
        self.meta = meta
        self.hflip = bool(meta["hflip"])
        self.grid = tuple(meta["grid"])
        self.num_tokens, self.dim = int(features.shape[2]), int(features.shape[3])
        self.fingerprint = meta["fingerprint"]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __repr__(self) -> str:
        return (f"FeatureCache({self.path}, items={len(self)}, hflip={self.hflip}, grid={self.grid}, "
                f"dim={self.dim})")

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureCache:
        """Open a complete cache folder; ValueError / FileNotFoundError if it is missing or inconsistent."""
        path = Path(path)
        meta_path, feat_path = path / META_FILE, path / FEATURES_FILE
        if not meta_path.is_file() or not feat_path.is_file():
            raise FileNotFoundError(f"{path} is not a feature cache (needs {META_FILE} and {FEATURES_FILE})")
        try:
            meta = json.loads(meta_path.read_text())
            features = np.load(feat_path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise ValueError(f"feature cache {path} is unreadable ({err}); delete it to rebuild") from err
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"feature cache {path} has format version {meta.get('version')}, "
                             f"expected {FORMAT_VERSION}")
        if list(features.shape) != list(meta.get("shape", [])) or features.dtype != np.dtype(meta.get("dtype")):
            raise ValueError(f"feature cache {path}: {FEATURES_FILE} is {features.dtype} {features.shape}, "
                             f"{META_FILE} says {meta.get('dtype')} {meta.get('shape')}; delete it to rebuild")
        return cls(path, features, meta)

    def lookup(self, indices, flipped=None, device: str | torch.device | None = None) -> Tensor:
        """Targets (B, n, d) float32 of dataset items `indices` (B,); flipped (B,) bool selects the
        features of the horizontally flipped image (needs a cache built with hflip)."""
        idx = torch.as_tensor(indices).reshape(-1).to("cpu", torch.int64).numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"feature cache lookup: indices must lie in [0, {len(self)}), "
                             f"got {idx.min()}..{idx.max()}")
        if flipped is None:
            flip = np.zeros_like(idx)
        else:
            flip = torch.as_tensor(flipped).reshape(-1).to("cpu", torch.int64).numpy()
            if flip.shape != idx.shape:
                raise ValueError(f"feature cache lookup: {idx.size} indices but {flip.size} flip flags")
            if flip.any() and not self.hflip:
                raise ValueError(f"feature cache {self.path} was built without hflip; rebuild it with hflip=True "
                                 f"to look up flipped images")
        out = torch.from_numpy(np.asarray(self.features[idx, flip], dtype=np.float32))
        return out if device is None else out.to(device)

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def build_or_load(cls, encoder, dataset, root: str | os.PathLike, hflip: bool = False, batch_size: int = 256,
                      num_workers: int = 0, progress: bool = True,
                      log: Callable[[str], None] = print) -> FeatureCache:
        """The cache of `encoder`'s tokens for every clean image of `dataset` (and its mirror if hflip)
        under `root`: loaded if a complete one with the same fingerprint exists, else (re)built."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        root = Path(root)
        data_fp = dataset_fingerprint(dataset)
        fp = cache_fingerprint(encoder.fingerprint, data_fp)
        tag = dataset_tag(dataset)
        name = f"{_safe(encoder.name)}-{hashlib.sha256(tag.encode()).hexdigest()[:10]}"
        path = root / name
        with file_lock(root / f".{name}.lock"):
            try:
                cache = cls.open(path)
                if cache.fingerprint == fp and (cache.hflip or not hflip):
                    return cache
                why = ("the encoder or the data changed" if cache.fingerprint != fp
                       else "it has no flipped entries")
                log(f"feature cache {path}: rebuilding ({why})")
            except FileNotFoundError:
                pass
            except ValueError as err:
                log(f"feature cache {path}: rebuilding ({err})")
            for stale in root.glob(f".{name}.tmp-*"):  # left by a killed build (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            cls._build(path, encoder, dataset, hflip, batch_size, num_workers, progress, log,
                       {"fingerprint": fp, "dataset": {"tag": tag, "len": len(dataset), "fingerprint": data_fp}})
            return cls.open(path)

    @staticmethod
    def _build(path: Path, encoder, dataset, hflip: bool, batch_size: int, num_workers: int, progress: bool,
               log: Callable[[str], None], meta: dict) -> None:
        n = len(dataset)
        image_hw = tuple(clean_uint8(dataset, 0).shape[-2:])
        gh, gw = encoder.grid(image_hw)
        F = 2 if hflip else 1
        shape = (n, F, gh * gw, int(encoder.dim))
        nbytes = int(np.prod(shape)) * np.dtype(DTYPE).itemsize
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if nbytes > free:
            raise ValueError(f"feature cache of shape {shape} needs {nbytes / 2**30:.1f} GiB, only "
                             f"{free / 2**30:.1f} GiB free under {path.parent}; choose another root or compute "
                             f"the targets online")
        log(f"feature cache {path}: encoding {n} images{' and their mirrors' if hflip else ''} with "
            f"{encoder.name} ({nbytes / 2**20:.0f} MiB)")
        tmp = temp_dir_beside(path)
        start = time.perf_counter()
        try:
            arr = np.lib.format.open_memmap(tmp / FEATURES_FILE, mode="w+", dtype=DTYPE, shape=shape)
            loader = torch.utils.data.DataLoader(_CleanImages(dataset), batch_size=batch_size, shuffle=False,
                                                 num_workers=num_workers)
            pos = 0
            for images in tqdm(loader, desc="feature cache", disable=not progress, dynamic_ncols=True):
                x = from_uint8(images)
                views = [x, x.flip(-1)] if hflip else [x]
                for f, v in enumerate(views):
                    tokens = encoder(v)
                    if tuple(tokens.shape[1:]) != shape[2:]:
                        raise ValueError(f"{encoder.name} returned tokens {tuple(tokens.shape)}, expected "
                                         f"(B, {shape[2]}, {shape[3]}) for {image_hw} images")
                    t = tokens.detach().cpu().numpy().astype(DTYPE)
                    if not np.isfinite(t).all():
                        raise ValueError(f"{encoder.name} tokens overflow float16 (or are NaN) for images "
                                         f"{pos}..{pos + len(x) - 1}")
                    arr[pos:pos + len(x), f] = t
                pos += len(x)
            if pos != n:
                raise RuntimeError(f"feature cache: encoded {pos} images, the dataset has {n}")
            arr.flush()
            del arr
            _fsync(tmp / FEATURES_FILE)
            meta = {"version": FORMAT_VERSION, **meta, "hflip": hflip, "shape": list(shape),
                    "dtype": np.dtype(DTYPE).name, "grid": [gh, gw], "image_hw": list(image_hw),
                    "encoder": {"name": encoder.name, "fingerprint": encoder.fingerprint, "dim": int(encoder.dim)},
                    "seconds": round(time.perf_counter() - start, 1), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            _fsync(tmp / META_FILE)
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.tmp-old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"feature cache {path}: built in {time.perf_counter() - start:.0f} s")


class IndexedFlipDataset(torch.utils.data.Dataset):
    """Wraps an rrepa ImageDataset for training with a feature cache: yields (x, y, index, flipped), the
    flip drawn here (probability 0.5 when hflip, torch's global RNG, as ImageDataset does), so the
    trainer can look up the targets of exactly the image it got: cache.lookup(index, flipped)."""

    def __init__(self, dataset, hflip: bool):
        self.dataset = dataset
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if hasattr(self.dataset, "_get"):
            img, label = self.dataset._get(i)
        else:
            img, label = self.dataset.uint8(i), self.dataset.label(i)
        flipped = bool(self.hflip and torch.rand(()).item() < 0.5)
        if flipped:
            img = img.flip(-1)
        x = from_uint8(img)
        return x, torch.tensor(int(label), dtype=torch.int64), torch.tensor(int(i)), torch.tensor(flipped)
