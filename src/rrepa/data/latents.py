"""A disk cache of a dataset's VAE latents: every clean image encoded once, memory-mapped for training a latent
flow (the paper's SD-VAE variant), optionally with the latents of each image's horizontal mirror.

A cache folder (``rrepa latents encode --out DIR`` writes ``DIR/<split>``) holds ``manifest.json``, shards
``shard-00000.npy`` (latents (n_k, F, c, h, w) in the storage dtype; F = 2 with flips: entry 0 the image, entry 1
its mirror, matched index for index; else F = 1) with ``shard-00000.labels.npy`` ((n_k,) int64) beside, and ``.lock``
(rrepa.data.cache.file_lock: builders take turns). Shard k holds items [k * shard_size, (k + 1) * shard_size). The
latents of a flipped image are the VAE's latents of the flipped image, not the flipped latents (a VAE is not
flip-equivariant), as in ImageNet latent pipelines and in rrepa.align.features. Latents are the VAE's scaled ones,
(m - shift_factor) * scaling_factor, float32 before storage (rrepa.data.vae.VAE.encode).

The manifest (JSON): format version; VAE (name, fingerprint of weights + config + scaling, scaling and shift
factors); data (tag, split, image size, count, classes, rrepa.data.cache.dataset_fingerprint of type, length, shape
and pixels); latent shape; storage dtype; mode (``mean``: the posterior mean, or ``sample``: one draw per image,
seeded per shard with rrepa.utils.generator(seed, shard): a resumed build draws what an uninterrupted one with the
same batch size draws); flips; shard size and the complete shards; per-channel latent statistics; the measured
storage round-trip error.

**Atomic, resumable.** A shard is written to a temporary file, synced and renamed into place (utils.atomic_write),
then the manifest listing it is rewritten the same way. Only shards the manifest lists are read; any other file (a
shard renamed just before a kill, a temporary file) is overwritten or removed by the next build, which resumes at
the first incomplete shard. **Staleness.** A cache whose manifest names another VAE fingerprint, other data,
split, image size, mode or seed, or lacks the flips asked for, is refused in one line saying which and what to do
(``--rebuild``, or another ``--out``), never silently used; a cache with flips serves a request without them.

**Storage dtype.** float16 by default: half the disk of float32. float16 rounding errs by at most 2^-11 (4.9e-4)
of each value, so by at most 4.9e-4 * max|z| / std(z) relative to the latents' spread. Measured as
|z16 - z32| / std(z) (``roundtrip_error``; no trained SD-VAE is available offline, so on stand-ins): N(0, 1)
values, what a well-scaled VAE gives (1e6): RMS 2.1e-4, max 1.9e-3; a tiny random diffusers AutoencoderKL
(factor 8) on Fashion-MNIST's test split at 32 px, with flips (1.3e6 values): RMS 2.5e-4, max 1.4e-3. That is
~200x below the flow's training noise (sigma 0.05 std). Every build measures it on its own latents and records it
in the manifest (``roundtrip``). float32 stores exactly what the VAE gave.

Size: N * F * c * h * w * itemsize: ImageNet at 256 px with SD-VAE (4 x 32 x 32) in float16 is 10.5 GB per flip
state, Fashion-MNIST at 32 px (4 x 4 x 4) 7.7 MB.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from rrepa.data.cache import clean_uint8, dataset_fingerprint, dataset_tag
from rrepa.data.datasets import DataConfig, ImageDataset, TensorImageDataset, build_dataset
from rrepa.utils import Interrupted, atomic_write, file_lock, from_uint8, generator

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
SHARD_SIZE = 10_000  # images per shard, the unit of resumption: a kill loses at most this much work
DTYPES = ("float16", "float32")
MODES = ("mean", "sample")
_OURS = re.compile(r"^(shard-\d{5}(\.labels)?\.npy|manifest\.json|\.lock|\..*\.tmp)$")
_FIX = "re-encode it with `rrepa latents encode --rebuild` (build_or_open(rebuild=True)) or write to another --out"


class StaleCacheError(ValueError):
    """A latent cache that does not match what was asked for (another VAE, data, size, mode, flips)."""


def shard_file(k: int) -> str:
    return f"shard-{k:05d}.npy"


def labels_file(k: int) -> str:
    return f"shard-{k:05d}.labels.npy"


def roundtrip_error(z: np.ndarray | Tensor, dtype: str = "float16") -> dict[str, float]:
    """|z_dtype - z| / std(z) over all values of z (any shape), computed in float64: {"max", "rms"}."""
    z64 = np.asarray(z, dtype=np.float64)
    err = np.abs(z64.astype(dtype).astype(np.float64) - z64) / z64.std()
    return {"max": float(err.max()), "rms": float(np.sqrt(np.mean(err**2)))}


def image_dataset(cfg: DataConfig, split: str) -> ImageDataset:
    """The images to encode: build_dataset(cfg, split) without random flips (the cache flips itself). Fashion-MNIST
    also at image_size != 28 (resized on access with the ADM transform, e.g. to 32 px for a factor-8 VAE)."""
    size = cfg.image_size
    resize = cfg.name == "fmnist" and size != 28
    ds = build_dataset(DataConfig(name=cfg.name, path=cfg.path, image_size=28 if resize else size, hflip=False,
                                  strict=cfg.strict), split)
    if resize:
        ds = TensorImageDataset(ds.images, ds.targets, num_classes=ds.num_classes, image_size=size,
                                name=f"{ds.name}@{size}")
    return ds


class _Items(torch.utils.data.Dataset):
    """Item i -> (the clean, unflipped image as uint8 (C, H, W), its label, i)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        if hasattr(self.dataset, "_get"):  # an rrepa ImageDataset: one read of the file gives both
            img, label = self.dataset._get(i)
            return img, int(label), i
        d = self.dataset
        return clean_uint8(d, i), int(d.label(i) if hasattr(d, "label") else d[i][1]), i


def _shard_batches(todo: Sequence[int], shard_size: int, n: int, batch_size: int) -> Iterator[list[int]]:
    """Batches of indices of the shards `todo`, in order, none crossing a shard boundary."""
    for k in todo:
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        yield from (list(range(s, min(hi, s + batch_size))) for s in range(lo, hi, batch_size))


# --------------------------------------------------------------------------------------------
# What a cache holds: the request, and why a manifest does not match it
# --------------------------------------------------------------------------------------------


def _request(vae, dataset, split: str | None, flip: bool, sample: bool | None, seed: int | None,
             dtype: str | None, image_size: int | None = None) -> dict:
    """The manifest fields that identify a cache (None: not checked)."""
    req: dict = {"version": FORMAT_VERSION, "flips": bool(flip), "dtype": dtype, "split": split,
                 "mode": None if sample is None else MODES[bool(sample)], "seed": seed if sample else None}
    if vae is not None:
        req["vae"] = {"name": str(vae.name), "fingerprint": str(vae.fingerprint),
                      "scaling_factor": float(vae.scaling_factor),
                      "shift_factor": float(vae.shift_factor or 0.0), "latent_channels": int(vae.latent_channels),
                      "factor": int(vae.factor)}
    if dataset is not None:
        c, h, w = (int(s) for s in clean_uint8(dataset, 0).shape)
        labels = getattr(dataset, "num_classes", None)
        req["data"] = {"tag": dataset_tag(dataset), "fingerprint": dataset_fingerprint(dataset), "len": len(dataset),
                       "image_size": h if h == w else [h, w], "channels": c,
                       "num_classes": None if labels is None else int(labels)}
    elif image_size is not None:
        req["data"] = {"image_size": image_size}
    return req


def _mismatch(m: dict, req: dict) -> str | None:
    """Why the manifest m does not serve the request, in words; None when it does."""
    if m.get("version") != FORMAT_VERSION:
        return f"has format version {m.get('version')}, this rrepa reads {FORMAT_VERSION}"
    if "vae" in req and m["vae"]["fingerprint"] != req["vae"]["fingerprint"]:
        a, b = m["vae"], req["vae"]
        return f"was encoded with another VAE ({a['name']} @{a['fingerprint'][:10]}, not {b['name']} " \
               f"@{b['fingerprint'][:10]})"
    d = m["data"]
    if req["split"] is not None and d["split"] != req["split"]:
        return f"holds the {d['split']} split, not {req['split']}"
    if "data" in req:
        r = req["data"]
        if d["image_size"] != r["image_size"]:
            return f"was encoded at image size {d['image_size']}, not {r['image_size']}"
        if "tag" in r and (d["tag"], d["len"]) != (r["tag"], r["len"]):
            return f"was encoded from other data ({d['tag']}, {d['len']} images), not {r['tag']} ({r['len']} images)"
        if "fingerprint" in r and d["fingerprint"] != r["fingerprint"]:
            return f"was encoded from other images under the same name ({d['tag']}, {d['len']}): the data changed"
    if req["mode"] is not None and (m["mode"] != req["mode"] or (
            req["mode"] == "sample" and req["seed"] is not None and m["seed"] != req["seed"])):
        had = m["mode"] + (f" (seed {m['seed']})" if m["mode"] == "sample" else "")
        want = req["mode"] + (f" (seed {req['seed']})" if req["mode"] == "sample" and req["seed"] is not None else "")
        return f"holds {had} latents, not {want}"
    if req["flips"] and not m["flips"]:
        return "has no latents of the flipped images (encode with --flip)"
    if req["dtype"] is not None and m["dtype"] != req["dtype"]:
        return f"stores {m['dtype']}, not {req['dtype']}"
    return None


def _read_manifest(path: Path) -> dict | None:
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text())
        m["vae"], m["data"], m["shards"]  # noqa: B018 - the keys every reader needs
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StaleCacheError(f"latent cache {path}: {MANIFEST} is unreadable ({err}); {_FIX}") from err
    return m


def _write_manifest(path: Path, m: dict) -> None:
    atomic_write(path / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(m, indent=1) + "\n"))


def _num_shards(m: dict) -> int:
    return math.ceil(m["count"] / m["shard_size"])


class LatentCache:
    """A complete latent cache, memory-mapped (see the module docstring). Open one with `open`, build or resume
    one with `build_or_open`. latents(indices, flipped) gives (B, c, h, w) float32; labels is (N,) int64."""

    def __init__(self, path: str | os.PathLike, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.shard_size = int(manifest["shard_size"])
        self.latent_shape = tuple(int(s) for s in manifest["latent_shape"])
        self.flips = bool(manifest["flips"])
        self.dtype = manifest["dtype"]
        self.num_classes = manifest["data"]["num_classes"]
        self.roundtrip = manifest.get("roundtrip")  # measured while building: {"max", "rms"} of |stored - z| / std(z)
        F = 2 if self.flips else 1
        self.shards, labels = [], []
        for k in range(_num_shards(manifest)):
            n_k = min(self.shard_size, manifest["count"] - k * self.shard_size)
            want = (n_k, F, *self.latent_shape)
            try:
                z = np.load(self.path / shard_file(k), mmap_mode="r")
                y = np.load(self.path / labels_file(k), mmap_mode="r")
            except (OSError, ValueError) as err:
                raise StaleCacheError(f"latent cache {self.path}: shard {k} is unreadable ({err}); {_FIX}") from err
            if z.shape != want or z.dtype != np.dtype(self.dtype) or y.shape != (n_k,):
                raise StaleCacheError(f"latent cache {self.path}: shard {k} is {z.dtype} {z.shape} with {y.shape[0]} "
                                      f"labels, the manifest says {self.dtype} {want}; {_FIX}")
            self.shards.append(z)
            labels.append(np.asarray(y, dtype=np.int64))
        self.labels = np.concatenate(labels)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        return (f"LatentCache({self.path}, items={len(self)}, latents={self.latent_shape} {self.dtype}, "
                f"mode={self.manifest['mode']}, flips={self.flips}, vae={self.manifest['vae']['name']})")

    @classmethod
    def open(cls, path: str | os.PathLike, vae=None, dataset=None, *, split: str | None = None,
             sample: bool | None = None, seed: int | None = None, flip: bool = False, dtype: str | None = None,
             image_size: int | None = None) -> LatentCache:
        """Open the complete cache in `path`, refused (StaleCacheError, one line) if it was encoded with another VAE
        (vae.fingerprint), from other data (`dataset`: its fingerprint and image size; or only image_size), another
        split, mode (sample, seed) or dtype, or without the flips asked for. Arguments left None are not checked."""
        path = Path(path)
        m = _read_manifest(path)
        if m is None:
            raise FileNotFoundError(f"{path} is not a latent cache (no {MANIFEST}); make one with "
                                    f"`rrepa latents encode --split {split or 'train'} --out DIR` (it writes "
                                    f"DIR/{split or 'train'})")
        req = _request(vae, dataset, split, flip, sample, seed, dtype, image_size)
        why = _mismatch(m, req)
        if why is not None:
            raise StaleCacheError(f"latent cache {path} {why}; {_FIX}")
        if len(m["shards"]) < _num_shards(m):
            raise StaleCacheError(f"latent cache {path} is incomplete ({len(m['shards'])} of {_num_shards(m)} shards); "
                                  f"run `rrepa latents encode` with the same arguments to finish it")
        return cls(path, m)

    def _locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = torch.as_tensor(indices).reshape(-1).to("cpu", torch.int64).numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"latent cache: indices must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        return idx // self.shard_size, idx % self.shard_size

    def latents(self, indices, flipped=None, device: str | torch.device | None = None) -> Tensor:
        """Latents (B, c, h, w) float32 of items `indices` (B,); flipped (B,) bool picks the mirrored image's."""
        shard, off = self._locate(indices)
        flip = np.zeros_like(shard) if flipped is None else \
            torch.as_tensor(flipped).reshape(-1).to("cpu", torch.int64).numpy()
        if flip.shape != shard.shape:
            raise ValueError(f"latent cache: {shard.size} indices but {flip.size} flip flags")
        if flip.any() and not self.flips:
            raise ValueError(f"latent cache {self.path} has no flipped latents; encode it with --flip")
        out = np.empty((shard.size, *self.latent_shape), dtype=np.float32)
        for k in np.unique(shard):
            rows = np.nonzero(shard == k)[0]
            out[rows] = self.shards[k][off[rows], flip[rows]]
        t = torch.from_numpy(out)
        return t if device is None else t.to(device)

    def item(self, i: int, flipped: bool = False) -> np.ndarray:
        """The latents (c, h, w) float32 of item i (of its mirror when flipped)."""
        shard, off = divmod(int(i), self.shard_size)
        if not 0 <= i < len(self):
            raise IndexError(f"latent cache: index {i} out of range for {len(self)} items")
        if flipped and not self.flips:
            raise ValueError(f"latent cache {self.path} has no flipped latents; encode it with --flip")
        return np.array(self.shards[shard][off, int(flipped)], dtype=np.float32)

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def build_or_open(cls, path: str | os.PathLike, vae, dataset, *, split: str = "train", flip: bool = False,
                      sample: bool = False, seed: int = 0, dtype: str = "float16", batch_size: int = 64,
                      shard_size: int = SHARD_SIZE, num_workers: int = 0, device: str | torch.device | None = None,
                      rebuild: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> LatentCache:
        """The cache of `vae`'s latents of every clean image of `dataset` (and of its mirror with flip) in `path`:
        opened when complete and matching, resumed at its first incomplete shard when matching, encoded when
        absent; a cache of another VAE, data, size or mode is refused (StaleCacheError) unless rebuild.
        Images go to the VAE in batches of batch_size on `device` (default: the VAE's)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        for name, v in (("batch_size", batch_size), ("shard_size", shard_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file; the latent cache is a folder (choose another --out)")
        req = _request(vae, dataset, split, flip, sample, seed, dtype)
        with file_lock(path / LOCK_FILE):
            m = _read_manifest(path) if not rebuild else None
            if m is not None:
                why = _mismatch(m, req)
                if why is not None:
                    raise StaleCacheError(f"latent cache {path} {why}; {_FIX}")
                if len(m["shards"]) == _num_shards(m):
                    cache = cls(path, m)  # reads every shard: a damaged one is reported before anything is said
                    log(f"latent cache {path}: complete and matching; nothing to encode")
                    return cache
                if m["flips"] != flip:  # an incomplete cache continues as it began
                    raise StaleCacheError(f"latent cache {path} is half encoded {'with' if m['flips'] else 'without'} "
                                          f"flips; finish it with the same arguments or {_FIX}")
                log(f"latent cache {path}: resuming, {len(m['shards'])} of {_num_shards(m)} shards complete")
            else:
                m = cls._start(path, vae, req, shard_size, rebuild, log)
            _encode(path, m, vae, dataset, batch_size, num_workers, device, progress, log)
            return cls(path, m)

    @staticmethod
    def _start(path: Path, vae, req: dict, shard_size: int, rebuild: bool, log: Callable[[str], None]) -> dict:
        """Check that the VAE takes the images, clear `path` of an old cache (only files a cache holds; anything
        else is refused) and write a manifest with no shards."""
        d = req["data"]
        if d["channels"] not in (vae.in_channels, 1):
            raise ValueError(f"the images have {d['channels']} channels but the VAE {vae.name} takes {vae.in_channels}")
        hw = (d["image_size"], d["image_size"]) if isinstance(d["image_size"], int) else tuple(d["image_size"])
        if hw[0] % vae.factor or hw[1] % vae.factor:
            raise ValueError(f"the images are {hw[0]} x {hw[1]}, not a multiple of the VAE's downsampling factor "
                             f"{vae.factor}; choose an image size that is (--image-size)")
        foreign = [p.name for p in path.iterdir() if not _OURS.match(p.name)]
        if foreign:
            raise ValueError(f"{path} is not empty and not a latent cache (it holds {', '.join(sorted(foreign)[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder for --out")
        (path / MANIFEST).unlink(missing_ok=True)  # first: from here on nothing in the folder counts as complete
        for p in path.iterdir():
            if p.name != LOCK_FILE:
                p.unlink()
        if rebuild:
            log(f"latent cache {path}: re-encoding (--rebuild)")
        m = {k: v for k, v in req.items() if k != "split"}
        m.update(data={**d, "split": req["split"]}, count=d["len"], latent_shape=[int(s) for s in vae.latent_shape(hw)],
                 grey_to_rgb=d["channels"] != vae.in_channels, shard_size=shard_size, shards=[], stats={},
                 seconds=0.0, created=time.strftime("%Y-%m-%d %H:%M:%S"))
        _write_manifest(path, m)
        return m


def _encode(path: Path, m: dict, vae, dataset, batch_size: int, num_workers: int, device, progress: bool,
            log: Callable[[str], None]) -> None:
    """Encode the shards the manifest m does not list; each one is written, then listed (the manifest rewritten)."""
    n, size, K = m["count"], m["shard_size"], _num_shards(m)
    if len(dataset) != n:
        raise ValueError(f"the dataset has {len(dataset)} items, the cache {n}")
    for p in path.glob(".*.tmp"):  # temporary files of a killed build (we hold the lock)
        p.unlink(missing_ok=True)
    done = set(m["shards"])
    todo = [k for k in range(K) if k not in done]
    device = torch.device(device if device is not None else getattr(vae, "device", "cpu"))
    F, shape, storage = (2 if m["flips"] else 1), tuple(m["latent_shape"]), np.dtype(m["dtype"])
    sample = m["mode"] == "sample"
    remaining = sum(min(size, n - k * size) for k in todo)
    log(f"latent cache {path}: encoding {remaining} images"
        f"{' and their mirrors' if F == 2 else ''} with {m['vae']['name']} into {len(todo)} shard(s) of {shape} "
        f"{m['dtype']} latents ({m['mode']})")
    loader = torch.utils.data.DataLoader(_Items(dataset), batch_sampler=_shard_batches(todo, size, n, batch_size),
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=n, initial=n - remaining, desc="latents", unit="img", disable=not progress, dynamic_ncols=True)
    start, k, buf = time.perf_counter(), None, None
    try:
        for images, labels, index in loader:
            if k != int(index[0]) // size:  # a new shard begins
                k = int(index[0]) // size
                n_k = min(size, n - k * size)
                buf = {"z": np.empty((n_k, F, *shape), storage), "y": np.empty(n_k, np.int64), "pos": 0,
                       "stats": _Stats(shape[0], storage),
                       "gen": generator(m["seed"], k, device) if sample else None}
            x = from_uint8(images).to(device, non_blocking=True)
            if m["grey_to_rgb"]:
                x = x.expand(-1, vae.in_channels, -1, -1)
            lo, b = buf["pos"], len(x)
            for f, view in enumerate([x, x.flip(-1)] if F == 2 else [x]):
                z = vae.encode(view, sample=sample, generator=buf["gen"], batch_size=batch_size)
                if tuple(z.shape) != (b, *shape):
                    raise ValueError(f"{m['vae']['name']} returned latents {tuple(z.shape)}, expected {(b, *shape)}")
                z = z.detach().to("cpu", torch.float32).numpy()
                buf["z"][lo:lo + b, f] = buf["stats"].add(z, f"images {int(index[0])}..{int(index[-1])}")
            buf["y"][lo:lo + b] = labels.numpy()
            buf["pos"] += b
            bar.update(b)
            if buf["pos"] == len(buf["y"]):
                _finish_shard(path, m, k, buf, time.perf_counter() - start)
                start = time.perf_counter()
    except KeyboardInterrupt as err:
        raise Interrupted(f"latent cache {path}: interrupted with {len(m['shards'])} of {K} shards complete; run the "
                          f"same command again to resume") from err
    finally:
        bar.close()
    log(f"latent cache {path}: {n} latents of shape {shape} ({m['dtype']}), round-trip error of the storage "
        f"|z_stored - z| / std: max {m['roundtrip']['max']:.2e}, rms {m['roundtrip']['rms']:.2e}")


class _Stats:
    """Per-channel sums of one shard's latents, and the storage rounding error (float64)."""

    def __init__(self, channels: int, storage: np.dtype):
        self.storage = storage
        self.count, self.sum, self.sumsq = 0, np.zeros(channels), np.zeros(channels)
        self.err_max, self.err_sumsq = 0.0, 0.0

    def add(self, z: np.ndarray, where: str) -> np.ndarray:
        """z (B, c, h, w) float32 -> its stored values; accumulates the statistics."""
        if not np.isfinite(z).all():
            raise ValueError(f"the VAE's latents of {where} are NaN or inf")
        stored = z.astype(self.storage)
        if not np.isfinite(stored).all():
            raise ValueError(f"the VAE's latents of {where} overflow {self.storage.name}; use --dtype float32")
        z64 = z.astype(np.float64)
        self.count += z.shape[0] * z.shape[2] * z.shape[3]
        self.sum += z64.sum(axis=(0, 2, 3))
        self.sumsq += (z64**2).sum(axis=(0, 2, 3))
        err = np.abs(stored.astype(np.float64) - z64)
        self.err_max = max(self.err_max, float(err.max()))
        self.err_sumsq += float((err**2).sum())
        return stored

    def as_json(self) -> dict:
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in vars(self).items() if k != "storage"}


def _summary(stats: dict) -> tuple[dict, dict]:
    """Per-channel mean/std and the round-trip error relative to the overall std, from the shards' sums."""
    count = sum(s["count"] for s in stats.values())
    total = np.sum([s["sum"] for s in stats.values()], axis=0)
    sq = np.sum([s["sumsq"] for s in stats.values()], axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    std_all = math.sqrt(max(sq.sum() / (count * len(mean)) - (total.sum() / (count * len(mean)))**2, 1e-30))
    rms = math.sqrt(sum(s["err_sumsq"] for s in stats.values()) / (count * len(mean)))
    return ({"mean": mean.tolist(), "std": std.tolist(), "std_all": std_all},
            {"max": max(s["err_max"] for s in stats.values()) / std_all, "rms": rms / std_all})


def _finish_shard(path: Path, m: dict, k: int, buf: dict, seconds: float) -> None:
    """Write shard k (labels, then latents, each atomically), then list it in the manifest."""
    for name, arr in ((labels_file(k), buf["y"]), (shard_file(k), buf["z"])):
        def write(tmp: str, arr=arr) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the name
                np.save(f, arr)
        atomic_write(path / name, write)
    m["shards"] = sorted({*m["shards"], k})
    m["stats"][str(k)] = buf["stats"].as_json()
    m["latent_stats"], m["roundtrip"] = _summary(m["stats"])
    m["seconds"] = round(m["seconds"] + seconds, 2)
    _write_manifest(path, m)


class LatentDataset(torch.utils.data.Dataset):
    """A latent cache for training: item i -> (z (c, h, w) float32, y int64, index int64, flipped bool).

    With hflip each item is the mirrored image's latents with probability 1/2, drawn from torch's global RNG as
    rrepa.align.features.IndexedFlipDataset and rrepa.data.datasets.ImageDataset draw (seeded by the trainer; DataLoader
    workers are seeded by torch), so (index, flipped) names the exact image whose alignment targets
    rrepa.align.features.FeatureCache.lookup(index, flipped) gives. channels / image_size / num_classes are what
    rrepa.training.loop.check_data_matches_model reads: the latent grid is the flow's input."""

    def __init__(self, cache: LatentCache, hflip: bool = False):
        if hflip and not cache.flips:
            raise ValueError(f"latent cache {cache.path} has no flipped latents; encode it with --flip, or train "
                             f"without data.hflip")
        self.cache, self.hflip = cache, bool(hflip)
        self.channels, h, w = cache.latent_shape
        self.latent_shape = cache.latent_shape
        self.image_size = h if h == w else None  # the flow's input side (square latents)
        self.num_classes = cache.num_classes
        self.pixel_size = cache.manifest["data"]["image_size"]  # the images the VAE encoded
        self.scaling_factor = cache.manifest["vae"]["scaling_factor"]
        self.shift_factor = cache.manifest["vae"]["shift_factor"]
        self.targets = torch.from_numpy(cache.labels)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        i = int(i)
        flipped = bool(self.hflip and torch.rand(()).item() < 0.5)
        z = torch.from_numpy(self.cache.item(i, flipped))
        return z, torch.tensor(int(self.cache.labels[i])), torch.tensor(i), torch.tensor(flipped)

