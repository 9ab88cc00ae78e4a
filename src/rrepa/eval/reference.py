"""Reference statistics: what the samples are compared with, under one feature network.

``reference_stats(spec, net)``: ``spec`` is ``fmnist:train`` / ``fmnist:test``, a split of the cluttered variant
(``fmnist-clutter-32px-seed0:train``, ``clutter_ref``; size and seed as data.image_size and data.clutter_seed), an
npz of images (ADM's ``arr_0``, uint8 NHWC), or an npz of statistics (ADM's ``mu``, ``sigma``, ``mu_s``,
``sigma_s``, or one written by ``ReferenceStats.save``, which adds ``network``, ``feats``, ``num_images``,
``source``, ``key``). An ADM reference batch holding both uses its stored statistics for FID / sFID and the
features of ``arr_0`` for precision and recall. Statistics computed from images are cached in
``$RREPA_CACHE_DIR/stats/<source>--<network>.npz`` (atomic write), keyed by the source (its name and the
SHA-256 of its file content), the feature network's name and the precision/recall subset size; a cache file
whose key differs is recomputed and overwritten. For precision / recall at most ``pr_max`` (10000) reference
features are kept, a seeded random subset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rrepa import utils
from rrepa.data.clutter import VERSION as CLUTTER_VERSION
from rrepa.data.datasets import DataConfig, build_dataset
from rrepa.eval.fid import feature_stats
from rrepa.eval.inception import INCEPTION_FEATURE_DIM, INCEPTION_NAME
from rrepa.eval.npz import open_npz, read_samples_npz
from rrepa.fmnist.dataset import FASHION_MNIST_FILES, find_fashion_mnist, idx_file, load_fashion_mnist
from rrepa.utils import as_nchw_uint8, save_npz

logger = logging.getLogger(__name__)

STATS_VERSION = 1
DEFAULT_PR_MAX = 10000
CLUTTER_REF = re.compile(r"fmnist-clutter-(\d+)px-seed(\d+):(train|test)")


def clutter_ref(image_size: int, clutter_seed: int, split: str = "train") -> str:
    """The reference spec of a split of fmnist-clutter (rrepa.data.clutter) at that canvas size and seed."""
    return f"fmnist-clutter-{image_size}px-seed{clutter_seed}:{split}"


@dataclass
class ReferenceStats:
    """Statistics of the reference images under one feature network: mu (D,), sigma (D, D) of the pool
    features; mu_s, sigma_s of the spatial ones (sFID; Inception only); feats (M, D) float32, at most pr_max
    pool features kept for precision / recall."""

    network: str
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    feats: np.ndarray | None = None
    num_images: int = 0
    source: str = ""
    key: str = ""

    @classmethod
    def from_features(cls, feats: dict[str, np.ndarray], network: str, source: str = "",
                      pr_max: int | None = DEFAULT_PR_MAX, key: str = "") -> ReferenceStats:
        """From a feature network's extract() output: {"pool": (N, D)[, "spatial": (N, Ds)]}."""
        mu, sigma = feature_stats(feats["pool"])
        mu_s = sigma_s = None
        if feats.get("spatial") is not None:
            mu_s, sigma_s = feature_stats(feats["spatial"])
        pool = np.asarray(feats["pool"], dtype=np.float32)
        if pr_max and pool.shape[0] > pr_max:
            idx = np.sort(np.random.default_rng(0).choice(pool.shape[0], pr_max, replace=False))
            pool = pool[idx]
        return cls(network, mu, sigma, mu_s, sigma_s, pool, int(feats["pool"].shape[0]), source, key)

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic npz with mu, sigma[, mu_s, sigma_s][, feats], network, num_images, source, key."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "network": np.array(self.network),
                  "num_images": np.array(self.num_images), "source": np.array(self.source),
                  "key": np.array(self.key)}
        for name in ("mu_s", "sigma_s", "feats"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        return save_npz(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        """Statistics from an npz (ours, or ADM's mu / sigma / mu_s / sigma_s; an ADM file has no
        ``network`` and is taken as inception-v3-fid when mu is 2048-d)."""
        with open_npz(path) as npz:
            if "mu" not in npz.files or "sigma" not in npz.files:
                raise ValueError(f"{path}: no mu / sigma statistics in it")
            st = cls._from_npz(npz, str(path))
        return st

    @classmethod
    def _from_npz(cls, npz, where: str) -> ReferenceStats:
        files = set(npz.files)
        mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
        d = mu.shape[0] if mu.ndim == 1 else -1
        if mu.ndim != 1 or sigma.shape != (d, d):
            raise ValueError(f"{where}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        if "network" in files:
            network = str(npz["network"])
        elif d == INCEPTION_FEATURE_DIM:
            network = INCEPTION_NAME
        else:
            raise ValueError(f"{where}: {d}-d statistics without a 'network' entry (ADM's files are 2048-d)")
        mu_s = sigma_s = None
        if "mu_s" in files and "sigma_s" in files:
            mu_s, sigma_s = np.asarray(npz["mu_s"], np.float64), np.asarray(npz["sigma_s"], np.float64)
            ds = mu_s.shape[0] if mu_s.ndim == 1 else -1
            if mu_s.ndim != 1 or sigma_s.shape != (ds, ds):
                raise ValueError(f"{where}: mu_s must be (D,) and sigma_s (D, D), got {mu_s.shape}, {sigma_s.shape}")
        feats = np.asarray(npz["feats"], np.float32) if "feats" in files else None
        if feats is not None and (feats.ndim != 2 or feats.shape[1] != d):
            raise ValueError(f"{where}: feats must be (N, {d}), got {feats.shape}")
        num = int(npz["num_images"]) if "num_images" in files else 0
        source = str(npz["source"]) if "source" in files else where
        key = str(npz["key"]) if "key" in files else ""
        return cls(network, mu, sigma, mu_s, sigma_s, feats, num, source, key)


def check_network(st: ReferenceStats, net, where: str) -> None:
    """ValueError unless the statistics `st` were computed with the feature network `net`."""
    if st.network != net.name:
        raise ValueError(f"{where} holds statistics of {st.network}, not of {net.name} "
                         f"(use --features to match, or give the reference images instead)")
    if st.mu.shape[0] != net.feature_dim:
        raise ValueError(f"{where}: {st.mu.shape[0]}-d statistics, but {net.name} gives {net.feature_dim}-d features")


def progress_bar(total: int, desc: str, show: bool) -> tqdm:
    """A bar over `total` images on stderr (stdout holds the results)."""
    return tqdm(total=total, desc=desc, unit="img", disable=not show, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "ref"


def stats_cache_dir() -> Path:
    return utils.cache_dir() / "stats"


def _stats_from_images(source: str, fingerprint: str, net, load_images: Callable[[], object], *,
                       cache: bool, cache_dir: Path | None, pr_max: int | None, batch_size: int | None,
                       progress: bool) -> ReferenceStats:
    key = json.dumps({"v": STATS_VERSION, "source": source, "fingerprint": fingerprint, "network": net.name,
                      "pr_max": pr_max}, sort_keys=True)
    folder = Path(cache_dir) if cache_dir is not None else stats_cache_dir()
    src_slug = _slug(source) if source.startswith(("fmnist:", "fmnist-clutter-")) else \
        f"{_slug(Path(source).stem)}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"
    path = folder / f"{src_slug}--{_slug(net.name)}.npz"
    if cache and path.is_file():
        try:
            st = ReferenceStats.load(path)
            if st.key == key:
                logger.info("reusing cached reference statistics %s", path)
                return st
            logger.info("cached statistics %s are stale (source or settings changed); recomputing", path)
        except ValueError as e:
            logger.warning("ignoring unreadable cache file %s: %s", path, e)
    images = as_nchw_uint8(load_images())
    with progress_bar(images.shape[0], f"features of {source}", progress) as bar:
        feats = net.extract(images, batch_size, progress=bar.update)
    st = ReferenceStats.from_features(feats, net.name, source, pr_max, key)
    if cache:
        st.save(path)
        logger.info("cached reference statistics in %s", path)
    return st


# --------------------------------------------------------------------------------------------
# Statistics of a reference
# --------------------------------------------------------------------------------------------


def reference_stats(ref, net, *, cache: bool = True, cache_dir: str | os.PathLike | None = None,
                    pr_max: int | None = DEFAULT_PR_MAX, batch_size: int | None = None,
                    data_dir: str | None = None, progress: bool = False) -> ReferenceStats:
    """Reference statistics for ``net`` from ``ref``: a ReferenceStats, ``fmnist[:train|:test]``, or an npz
    path (images, statistics or both); see the module docstring. ``pr_max``: at most this many reference
    features kept for precision / recall (None or 0: all)."""
    if isinstance(ref, ReferenceStats):
        check_network(ref, net, "the reference")
        return ref
    spec = str(ref)
    kw = dict(cache=cache, cache_dir=cache_dir, pr_max=pr_max, batch_size=batch_size, progress=progress)
    clutter = CLUTTER_REF.fullmatch(spec)
    if spec == "fmnist" or spec.startswith("fmnist:") or clutter:
        split = clutter.group(3) if clutter else spec.partition(":")[2] or "train"
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"--ref {spec}: the Fashion-MNIST split must be train or test")
        folder = find_fashion_mnist(data_dir)
        files = [idx_file(folder, stem) for stem in FASHION_MNIST_FILES[split]]
        fingerprint = "+".join(file_sha256(f) for f in files)
        if not clutter:
            return _stats_from_images(f"fmnist:{split}", fingerprint, net,
                                      lambda: load_fashion_mnist(folder, split)[0], **kw)
        variant = DataConfig(name="fmnist-clutter", path=str(folder), image_size=int(clutter.group(1)),
                             clutter_seed=int(clutter.group(2)))
        return _stats_from_images(spec, f"{fingerprint}+clutter-v{CLUTTER_VERSION}", net,
                                  lambda: build_dataset(variant, split).images, **kw)
    if spec.startswith("fmnist-clutter"):
        raise ValueError(f"--ref {spec}: a split of fmnist-clutter is named like {clutter_ref(32, 0)} (canvas size "
                         f"and clutter seed as data.image_size and data.clutter_seed)")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--ref {spec}: no such file (give fmnist:train, fmnist:test, {clutter_ref(32, 0)}, "
                                f"an npz of images "
                                f"(arr_0) or an npz of statistics (mu, sigma))")
    with open_npz(path) as npz:
        files = set(npz.files)
        has_images = "arr_0" in files
        stored = None
        if {"mu", "sigma"} <= files:
            try:
                stored = ReferenceStats._from_npz(npz, str(path))
            except ValueError as e:
                if not has_images:
                    raise
                logger.warning("ignoring the statistics in %s (%s); using its images", path, e)
    if stored is None and not has_images:
        raise ValueError(f"{path}: neither images (arr_0) nor statistics (mu, sigma) in it")
    usable = stored is not None and stored.network == net.name and stored.mu.shape[0] == net.feature_dim
    if usable and (stored.feats is not None or not has_images):
        return stored
    if not has_images:
        check_network(stored, net, str(path))  # raises: the statistics belong to another network
    if stored is not None and not usable:
        logger.info("%s: stored statistics are for %s; computing %s features of its images", path,
                    stored.network, net.name)

    def load_images():
        images, _ = read_samples_npz(path)
        return images

    computed = _stats_from_images(str(path.resolve()), file_sha256(path), net, load_images, **kw)
    if usable:  # ADM reference batch: its stored statistics for FID / sFID, features of arr_0 for P / R
        stored.feats = computed.feats
        if stored.mu_s is None and computed.mu_s is not None:
            stored.mu_s, stored.sigma_s = computed.mu_s, computed.sigma_s
        return stored
    return computed
