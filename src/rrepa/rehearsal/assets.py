"""The inputs of a rehearsal (rehearsal.rehearse), made on the spot so that nothing is downloaded: a small synthetic
dataset in a preset's real layout, and the real architectures of the networks a preset needs, with random weights,
saved in the files the library loads (so the rehearsal goes through the loaders a user's run goes through).

- ImageNet at 256 px: an ImageNet class-folder tree, ``train/<wnid>/*.JPEG`` for all 1000 classes (most folders
  empty: the class count comes from the folders) and ``val/<wnid>/*.JPEG``, JPEGs of 5:4 aspect a little larger
  than the target, so that rrepa.data's ADM centre crop does real work.
- ImageNet 64: the downsampled-ImageNet release's npz files, ``train_data_batch_1.npz`` and ``val_data.npz``
  (``data`` rows of 3 * S * S uint8 values in CHW order, ``labels`` 1-based).
- SD-VAE: diffusers' ``AutoencoderKL`` with stabilityai/sd-vae-ft-ema's config, saved with ``save_pretrained``.
- DINOv2: timm's ViT at its 37 x 37 pretraining grid, saved as a timm ``.safetensors`` state dict.
- FID-Inception: torch-fidelity's network (rrepa.eval.inception.make_random_inception_weights).

Every file is written atomically and reused when it exists (a rehearsal folder keeps its ~0.5 GB of weights);
the images are drawn from a seeded generator: smooth colour gradients with a bright disc, so that no two are alike
and the JPEG coder has edges to code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from rrepa.align.encoders import dinov2_timm_name
from rrepa.data.image_io import IMAGENET_CLASSES
from rrepa.data.vae import autoencoder_kl
from rrepa.eval.inception import make_random_inception_weights
from rrepa.utils import atomic_write, save_npz, temp_dir_beside

MARKER = ".rehearsal.json"  # written last into a dataset folder: what it holds; absent = incomplete
# stabilityai/sd-vae-ft-ema's config.json (the VAE of the paper's 256 x 256 models), and a small one of the same
# layout (four stages: the same x8 downsampling) for tests.
SD_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
          "layers_per_block": 2, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 256,
          "scaling_factor": 0.18215}
TINY_VAE = {**SD_VAE, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4,
            "sample_size": 64}


def wnid(c: int) -> str:
    """The folder name of class c: WordNet-id-like, sorted in class order (n00000000, n00000001, ...)."""
    return f"n{c:08d}"


def synthetic_images(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """(n, height, width, 3) uint8: per image a random two-colour gradient and a bright disc, seeded."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        a, b = g.uniform(0, 255, 3), g.uniform(0, 255, 3)
        angle = g.uniform(0, np.pi)
        t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1) / 2
        img = a * (1 - t[..., None]) + b * t[..., None]
        cy, cx, r = g.uniform(0.2, 0.8) * height, g.uniform(0.2, 0.8) * width, g.uniform(0.1, 0.3) * min(height, width)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = g.uniform(180, 255, 3)
        out[i] = np.clip(img + g.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return out


def labels_for(n: int, seed: int, classes: int = IMAGENET_CLASSES) -> np.ndarray:
    """n distinct-ish 0-based labels spread over the classes (seeded)."""
    return np.random.default_rng(seed).choice(classes, size=n, replace=n > classes).astype(np.int64)


def _done(root: Path, spec: dict) -> bool:
    try:
        return json.loads((root / MARKER).read_text()) == spec
    except (OSError, ValueError):
        return False


def _mark(root: Path, spec: dict) -> None:
    atomic_write(root / MARKER, lambda tmp: Path(tmp).write_text(json.dumps(spec) + "\n"))


def write_imagenet_folder(root: str | os.PathLike, size: int, train: int, test: int, seed: int = 0) -> Path:
    """An ImageNet-layout tree under root (train/ with all 1000 class folders, val/) of JPEGs for `size` px
    training; reused when it holds what is asked for."""
    root = Path(root)
    spec = {"layout": "folder", "size": size, "train": train, "test": test, "seed": seed}
    if _done(root, spec):
        return root
    if root.exists():
        shutil.rmtree(root)
    for c in range(IMAGENET_CLASSES):
        (root / "train" / wnid(c)).mkdir(parents=True, exist_ok=True)
    h, w = size + size // 8, size + size // 8 + size // 4  # 5:4-ish, larger than the target: the ADM crop works
    for split, n, folder in (("train", train, "train"), ("test", test, "val")):
        images = synthetic_images(n, h, w, seed + (split == "test"))
        for i, (img, y) in enumerate(zip(images, labels_for(n, seed + 2 * (split == "test")))):
            path = root / folder / wnid(int(y)) / f"{wnid(int(y))}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp, img=img: Image.fromarray(img).save(tmp, format="JPEG", quality=90))
    _mark(root, spec)
    return root


def write_imagenet_npz(root: str | os.PathLike, size: int, train: int, test: int, seed: int = 0) -> Path:
    """Downsampled-ImageNet npz files under root (train_data_batch_1.npz, val_data.npz) of size x size images;
    reused when they hold what is asked for."""
    root = Path(root)
    spec = {"layout": "npz", "size": size, "train": train, "test": test, "seed": seed}
    if _done(root, spec):
        return root
    for name, n, s in (("train_data_batch_1.npz", train, seed), ("val_data.npz", test, seed + 1)):
        images = synthetic_images(n, size, size, s)
        rows = images.transpose(0, 3, 1, 2).reshape(n, 3 * size * size)  # CHW planar rows, as the release
        save_npz(root / name, data=rows, labels=labels_for(n, s + 1) + 1)  # 1-based
    _mark(root, spec)
    return root


def save_random_vae(path: str | os.PathLike, config: dict, seed: int = 0) -> Path:
    """diffusers' AutoencoderKL(**config) with random weights, save_pretrained into `path` (a folder published
    whole); kept when it exists."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    model = autoencoder_kl()(**config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(path)
    try:
        model.save_pretrained(tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_random_dinov2(path: str | os.PathLike, name: str = "dinov2_vitb14", seed: int = 0) -> Path:
    """timm's DINOv2 `name` at its 37 x 37 (518 px) pretraining grid with timm's random initialisation, as a
    timm .safetensors state dict (what --encoder-weights takes); kept when it exists."""
    import timm  # heavy (seconds to import); only for DINOv2

    path = Path(path)
    if path.is_file():
        return path
    torch.manual_seed(seed)
    model = timm.create_model(dinov2_timm_name(name)[0], pretrained=False, num_classes=0, img_size=518)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return path


def save_random_inception(path: str | os.PathLike, seed: int = 0) -> Path:
    """torch-fidelity's FID-Inception with random weights (what --inception-weights takes); kept when it exists."""
    path = Path(path)
    if not path.is_file():
        atomic_write(path, lambda tmp: make_random_inception_weights(tmp, seed))
    return path
