"""A run on VAE latents (``data.vae`` set; docs/DESIGN.md section 4): its VAE, the latent caches of its splits, the
clean images its alignment targets come from, and ``ImageSpace``, the one place that turns a run's model outputs
into images (pixels: as they are; latents: the VAE's decoding), used by the sample grids, the in-training
evaluation, ``rrepa sample`` and ``rrepa evaluate --ckpt``.

The flow sees ``z + sigma * eps`` with ``z`` the cached latents of the clean images (rrepa.data.latents); the alignment
targets are the encoder's tokens of the same clean images, index for index and flip for flip (the latent cache and
the feature cache are both built from ``image_dataset(cfg.data, split)``, and ``LatentDataset`` draws the flip that
names both). Samples are denoised with the score step in latent space (rrepa.flow.sample.draw), then decoded.

Cache folders: ``<data.latent_cache>/<split>`` when data.latent_cache is set (checked by rrepa.data.latents: a cache of
another VAE, other data or without the flips asked for is refused in one line), else
``<cache>/latents/<vae name>-<vae fingerprint>-<split>-<data tag hash>[-flip][-sample]-<dtype>``, where another VAE
or other data get another folder.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rrepa.data.cache import dataset_tag
from rrepa.data.datasets import DataConfig, build_dataset
from rrepa.data.latents import LatentCache, LatentDataset, image_dataset
from rrepa.data.vae import VAE, check_latent_channels
from rrepa.flow.config import FlowConfig
from rrepa.fmnist.vae import load_vae
from rrepa.utils import cache_dir, from_uint8


def is_latent(data: DataConfig | Mapping | None) -> bool:
    """Whether a run's data section (a DataConfig or its dict) trains on VAE latents."""
    if data is None:
        return False
    return bool(data.get("vae") if isinstance(data, Mapping) else data.vae)


def data_config(data: DataConfig | Mapping) -> DataConfig:
    """A stored data section (dict, maybe from an older rrepa with fewer fields) as a DataConfig."""
    if isinstance(data, DataConfig):
        return data
    known = {f.name for f in fields(DataConfig)}
    return DataConfig(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------


def load_run_vae(data: DataConfig, device: str | torch.device = "cpu",
                 log: Callable[[str], None] = print) -> VAE:
    """The VAE of data.vae (fmnist-vae: the embedded one rrepa ships), refused in one line when
    data.vae_fingerprint pins another one (the run was trained with other weights)."""
    try:
        vae = load_vae(data.vae, device=device, data_path=data.path if data.name == "fmnist" else None, log=log)
    except FileNotFoundError as err:
        if not data.vae_fingerprint:  # not a trained run's VAE: the loader's own advice fits
            raise
        raise FileNotFoundError(f"{err}; if the run's VAE moved, give its new place (train: --set data.vae=PATH; "
                                f"sample, evaluate, bpd, classify, probe: --vae PATH)") from err
    if data.vae_fingerprint and vae.fingerprint != data.vae_fingerprint:
        raise ValueError(f"VAE {data.vae} is @{vae.fingerprint[:10]}, but the run was trained with "
                         f"@{data.vae_fingerprint[:10]}; give the run's own VAE (train: --set data.vae=PATH; "
                         f"sample, evaluate, bpd, classify, probe: --vae PATH)")
    return vae


def with_vae(info: dict, vae: str | None) -> dict:
    """load_run's info (rrepa.training.run) with data.vae replaced by `vae` (`--vae` of sample, evaluate, bpd,
    classify, probe; None: unchanged), for a latent run whose VAE moved (load_run_vae still checks its
    fingerprint); an error for a run that is not latent."""
    if vae is None:
        return info
    data = dict(info["config"].get("data") or {})
    if not data.get("vae"):
        raise ValueError(f"--vae {vae}: this run trains on pixels (its config has no data.vae); drop --vae")
    return {**info, "config": {**info["config"], "data": {**data, "vae": vae}}, "data": {**data, "vae": vae}}


def check_vae_matches_model(vae: VAE, data: DataConfig, model: FlowConfig) -> None:
    """ValueError (one line) unless the VAE's latents of data.image_size images are the model's input."""
    check_latent_channels(vae, model.in_channels)
    c, h, w = vae.latent_shape((data.image_size, data.image_size))
    if (h, w) != (model.image_height, model.image_width):
        raise ValueError(f"VAE {vae.name} turns {data.image_size} px images into {c} x {h} x {w} latents but the model "
                         f"takes {model.in_channels} x {model.image_height} x {model.image_width}; set "
                         f"model.image_height / image_width to {h} x {w} (or data.image_size to "
                         f"{model.image_height * vae.factor})")


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[-40:] or "vae"


def latent_cache_path(data: DataConfig, vae: VAE, images, split: str, flip: bool) -> Path:
    """Where the split's latent cache lives: <data.latent_cache>/<split> when given (a cache there of another VAE,
    other data or without the flips asked for is refused by rrepa.data.latents in one line), else a folder under
    <cache>/latents keyed by the VAE (name, fingerprint), the split, the data and the mode: never stale."""
    if data.latent_cache:
        return Path(data.latent_cache) / split
    tag = hashlib.sha256(f"{dataset_tag(images)}|{len(images)}|{data.image_size}".encode()).hexdigest()[:10]
    mode = "-sample" if data.latent_sample else ""
    return cache_dir() / "latents" / (f"{_safe(Path(str(data.vae)).name)}-{vae.fingerprint[:10]}-{split}-{tag}"
                                      f"{'-flip' if flip else ''}{mode}-{data.latent_dtype}")


def latent_dataset(data: DataConfig, vae: VAE, split: str, *, hflip: bool = False,
                   device: str | torch.device | None = None, progress: bool = True,
                   log: Callable[[str], None] = print) -> LatentDataset:
    """The split's latents for training or evaluation: the cache of `vae`'s latents of image_dataset(data, split)
    (with the mirrors' latents when hflip), built on first use (progress bar), reused after. Items: (z (c, h, w),
    y, index, flipped); with hflip the flip is drawn per item."""
    images = image_dataset(data, split)
    path = latent_cache_path(data, vae, images, split, hflip)
    cache = LatentCache.build_or_open(path, vae, images, split=split, flip=hflip, sample=data.latent_sample,
                                      dtype=data.latent_dtype, device=device, progress=progress, log=log)
    return LatentDataset(cache, hflip=hflip)


class LatentPairs(torch.utils.data.Dataset):
    """A latent split as (z (c, h, w) float32, y) pairs, unflipped: what the classifiers and bits/dim read.
    `latent` marks it for rrepa.eval.bpd (per latent dimension, no dequantization)."""

    latent = True

    def __init__(self, dataset: LatentDataset):
        self.dataset = dataset
        self.num_classes = dataset.num_classes
        self.channels, self.image_size = dataset.channels, dataset.image_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        z = torch.from_numpy(self.dataset.cache.item(int(i)))
        return z, torch.tensor(int(self.dataset.cache.labels[int(i)]), dtype=torch.int64)


class LatentsWithImages(torch.utils.data.Dataset):
    """Training items for alignment with targets computed online: (z, y, index, flipped, x) with x (C, H, W) in
    [-1, 1] the CLEAN image of the same index, flipped when z is the mirror's latents (read in the loader's
    workers)."""

    def __init__(self, latents: LatentDataset, images):
        if len(latents) != len(images):
            raise ValueError(f"{len(latents)} latents but {len(images)} images")
        self.latents, self.images = latents, images

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int):
        z, y, index, flipped = self.latents[i]
        img = self.images.uint8(int(index))
        img = img.flip(-1) if bool(flipped) else img
        return z, y, index, flipped, from_uint8(img)


def eval_dataset(data: DataConfig, split: str, vae: VAE | None, device: str | torch.device | None = None,
                 progress: bool = True, log: Callable[[str], None] = print):
    """The dataset a run's model is evaluated on (classifiers, bits/dim): the images for a pixel run, the split's
    latents (LatentPairs) for a latent run."""
    if vae is None:
        return build_dataset(data, split)
    return LatentPairs(latent_dataset(data, vae, split, device=device, progress=progress, log=log))


# --------------------------------------------------------------------------------------------
# Model outputs -> images
# --------------------------------------------------------------------------------------------


class ImageSpace:
    """How a run's model outputs become images: x (B, C, h, w) in the model's space -> images (B, C', H, W) in
    [-1, 1] on x's device. Pixel runs: x itself. Latent runs: vae.decode(x) (clamped to [-1, 1]), in batches."""

    def __init__(self, vae: VAE | None = None, batch_size: int = 64):
        self.vae, self.batch_size = vae, batch_size

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @classmethod
    def for_run(cls, config: Any, device: str | torch.device = "cpu",
                log: Callable[[str], None] = print) -> ImageSpace:
        """The image space of a run config (a RunConfig, its dict as load_run's info["config"], or None: pixels)."""
        data = getattr(config, "data", None) if not isinstance(config, Mapping) else config.get("data")
        if not is_latent(data):
            return cls()
        return cls(load_run_vae(data_config(data), device, log))

    def __call__(self, x: Tensor) -> Tensor:
        if self.vae is None:
            return x
        return self.vae.decode(x.float(), batch_size=self.batch_size).to(x.dtype)

    def describe(self) -> str:
        return "pixels" if self.vae is None else f"latents decoded by VAE {self.vae.name}"
