"""Frozen target encoders for representation alignment, by name (build_encoder): DINOv2 (via timm, here) and
``fmnist-ssl``, the embedded self-supervised encoder for Fashion-MNIST that rrepa trains itself
(rrepa.fmnist.encoder). Every encoder is a ``FrozenEncoder`` (rrepa.align.encoder_base): clean images in [-1, 1],
(B, C, H, W), in; patch tokens (B, n, d) in raster order, float32, without gradient, out.

DINOv2 (``dinov2_vits14`` / ``vitb14`` / ``vitl14`` / ``vitg14``, ``_reg`` for the register variants, or the
timm names ``vit_base_patch14_dinov2[.lvd142m]``, ``vit_base_patch14_reg4_dinov2[.lvd142m]``, ...):

- weights from a local file: Meta's original checkpoint (``dinov2_vitb14_pretrain.pth``: ``cls_token``,
  ``pos_embed`` (1, 1 + 37*37, d), ``mask_token``, optional ``register_tokens``, ``blocks.N...``), a DINOv2
  training checkpoint (``teacher`` / ``backbone.`` prefixes), or timm's layout (``.safetensors`` / ``.pth`` /
  ``.bin``, or a folder holding ``model.safetensors``). Meta's layout is converted by timm's own
  ``checkpoint_filter_fn``. Without a file the weights come from the hub only when online
  (HF_HUB_OFFLINE / RREPA_OFFLINE unset).
- preprocessing as REPA: x in [-1, 1] -> [0, 1]; a grayscale image is repeated to RGB; resize to
  ``image_size`` x ``image_size`` (bicubic, antialiased when shrinking); ImageNet mean / std normalisation.
  ``image_size`` must be a multiple of 14; the default is 224 at every input resolution (16 x 16 tokens):
  REPA resizes 256 px images to 224, and for 64 px images (and 28 px Fashion-MNIST) we keep 224, the
  resolution DINOv2 was trained at, rather than 448 (32 x 32 tokens, a 1:1 grid with a patch-2 flow at 4x
  the cost, with no more information than the 64 px image holds): rrepa.align.head.match_grid maps the 16 x 16
  tokens onto the flow's grid.
- the position embedding is kept at the checkpoint's own grid (37 x 37) and resampled by timm to the
  grid in use at every call (``dynamic_img_size``: bicubic, antialiased, the same function timm uses when
  it loads weights at another size). Meta's hub code interpolates with a 0.1 offset and without antialias,
  so its tokens differ slightly from these at grids other than 37 x 37.
- patch tokens: the final (normed) tokens without the CLS and register tokens.

The layering: rrepa.align.encoder_base (the interface) <- rrepa.fmnist.encoder (the embedded encoder) <- this module
(the pretrained ones and the choice by name), so that neither of the two encoder modules imports the other.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from rrepa.align.encoder_base import FrozenEncoder, resize_square
from rrepa.flow.checkpoint import load_state_checked
from rrepa.fmnist.encoder import EMBEDDED_NAME, load_embedded
from rrepa.fmnist.shipped import resolve_weights, shipped
from rrepa.utils import is_offline

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

META_URL = "https://dl.fbaipublicfiles.com/dinov2/{0}/{0}_pretrain.pth"
# rrepa / Meta name -> (timm architecture, Meta's checkpoint stem)
DINOV2_VARIANTS = {
    "dinov2_vits14": ("vit_small_patch14_dinov2", "dinov2_vits14"),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", "dinov2_vitb14"),
    "dinov2_vitl14": ("vit_large_patch14_dinov2", "dinov2_vitl14"),
    "dinov2_vitg14": ("vit_giant_patch14_dinov2", "dinov2_vitg14"),
    "dinov2_vits14_reg": ("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg4"),
    "dinov2_vitb14_reg": ("vit_base_patch14_reg4_dinov2", "dinov2_vitb14_reg4"),
    "dinov2_vitl14_reg": ("vit_large_patch14_reg4_dinov2", "dinov2_vitl14_reg4"),
    "dinov2_vitg14_reg": ("vit_giant_patch14_reg4_dinov2", "dinov2_vitg14_reg4"),
}
DINOV2_PATCH = 14
DINOV2_DEFAULT_SIZE = 224


# --------------------------------------------------------------------------------------------
# DINOv2 through timm
# --------------------------------------------------------------------------------------------


class DINOv2Encoder(FrozenEncoder):
    """A timm DINOv2 ViT; see the module docstring for the preprocessing and the position embedding."""

    def __init__(self, model: nn.Module, name: str, timm_name: str, image_size: int):
        super().__init__()
        self.model = model
        self.name = name
        self.timm_name = timm_name
        self.image_size = image_size
        self.dim = int(model.embed_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return self.image_size // DINOV2_PATCH, self.image_size // DINOV2_PATCH

    def preprocessing_spec(self) -> str:
        return (f"dinov2|{self.timm_name}|[-1,1]->[0,1]|gray->rgb|resize {self.image_size} bicubic antialias|"
                f"mean {IMAGENET_MEAN} std {IMAGENET_STD}|pos_embed timm bicubic antialias|final norm, no prefix")

    def preprocess(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected 1 (grayscale) or 3 (RGB) channels, got {x.shape[1]}")
        x = resize_square((x + 1) / 2, self.image_size, "bicubic")
        return (x - self.mean) / self.std

    def encode(self, x: Tensor) -> Tensor:
        out = self.model.forward_features(x)
        return out[:, self.model.num_prefix_tokens:]


def dinov2_canonical(name: str) -> str:
    """The rrepa name (dinov2_vitb14, ...) of an rrepa / Meta / timm DINOv2 name."""
    if name in DINOV2_VARIANTS:
        return name
    arch = name.split(".")[0]
    for key, (timm_name, meta) in DINOV2_VARIANTS.items():
        if arch in (timm_name, meta):
            return key
    raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(encoder_names())} "
                     f"(or a timm DINOv2 name such as vit_base_patch14_dinov2.lvd142m)")


def dinov2_timm_name(name: str) -> tuple[str, str]:
    """(timm architecture, Meta checkpoint stem) for an rrepa / Meta / timm DINOv2 name."""
    return DINOV2_VARIANTS[dinov2_canonical(name)]


def _weights_hint(name: str) -> str:
    timm_name, meta = dinov2_timm_name(name)
    return (f"download Meta's checkpoint {META_URL.format(meta)} (or timm's {timm_name}.lvd142m "
            f"model.safetensors from the Hugging Face hub, repo timm/{timm_name}.lvd142m) and pass it with "
            f"--encoder-weights PATH")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from .safetensors, or a torch pickle (.pth / .pt / .bin, loaded with weights_only);
    unwraps {'model': ...}, {'state_dict': ...} and DINOv2 training checkpoints ({'teacher': backbone.*})."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} is a folder without model.safetensors or pytorch_model.bin")
        path = found[0]
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure: say which file and why, in one line
        raise ValueError(f"cannot read encoder weights {path} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); is it a complete checkpoint?") from err
    for key in ("teacher", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    for prefix in ("backbone.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _checkpoint_img_size(state: dict[str, Tensor], patch: int = DINOV2_PATCH) -> int:
    """Image side of the grid the checkpoint's pos_embed was trained at (518 for DINOv2's 37 x 37)."""
    if "pos_embed" not in state:
        raise ValueError("the encoder weights have no pos_embed; not a DINOv2 ViT checkpoint")
    n = state["pos_embed"].shape[1]
    for prefix in (1, 0):  # with the CLS entry (Meta's, timm's without registers), or without (timm + registers)
        side = math.isqrt(n - prefix)
        if side * side == n - prefix:
            return side * patch
    raise ValueError(f"pos_embed with {n} entries is not a square grid (+ CLS)")


def load_dinov2(name: str, weights: str | os.PathLike | None = None, image_size: int | None = None,
                device: str | torch.device = "cpu", model_kwargs: dict | None = None) -> DINOv2Encoder:
    """A frozen DINOv2 encoder from a local weights file (Meta's or timm's layout) or, online, the hub.
    model_kwargs go to timm.create_model (e.g. depth=2 for a small test model)."""
    import timm  # heavy (seconds to import); only for DINOv2
    from timm.models.vision_transformer import checkpoint_filter_fn  # heavy: timm

    name = dinov2_canonical(name)
    timm_name, _ = dinov2_timm_name(name)
    size = DINOV2_DEFAULT_SIZE if image_size is None else int(image_size)
    if size < DINOV2_PATCH or size % DINOV2_PATCH:
        raise ValueError(f"DINOv2 image_size must be a positive multiple of {DINOV2_PATCH} (e.g. 224 -> 16 x 16 "
                         f"tokens), got {image_size}")
    kwargs = dict(num_classes=0, dynamic_img_size=True, **(model_kwargs or {}))
    if weights is None:
        if is_offline():
            raise FileNotFoundError(f"no weights file for encoder {name!r} and the hub is off (HF_HUB_OFFLINE / "
                                    f"RREPA_OFFLINE); {_weights_hint(name)}")
        model = timm.create_model(f"{timm_name}.lvd142m", pretrained=True, **kwargs)
    else:
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"encoder weights file {path} not found; {_weights_hint(name)}")
        state = read_state_dict(path)
        model = timm.create_model(timm_name, pretrained=False, img_size=_checkpoint_img_size(state), **kwargs)
        state = checkpoint_filter_fn(state, model)
        load_state_checked(model, state, f"{path} (as {timm_name})", hint="check the encoder name / ViT size")
    return DINOv2Encoder(model, name, timm_name, size).to(device)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def encoder_names() -> list[str]:
    """The names build_encoder knows (timm's DINOv2 names are accepted too)."""
    return [EMBEDDED_NAME, *DINOV2_VARIANTS]


def build_encoder(name: str, weights: str | os.PathLike | None = None, image_size: int | None = None,
                  device: str | torch.device = "cpu", *, model_kwargs: dict | None = None) -> FrozenEncoder:
    """A frozen encoder by name: 'fmnist-ssl' (weights: its .safetensors file or a shipped network's name such as
    fmnist-clutter-ssl, default the fmnist-ssl rrepa ships, rrepa.fmnist.shipped) or a DINOv2 name (weights: Meta's
    .pth or timm's file; image_size: the side images are resized to, a multiple of 14, default 224)."""
    if name == EMBEDDED_NAME:
        weights = resolve_weights(weights)
        if image_size not in (None, 28):
            raise ValueError(f"{EMBEDDED_NAME} works at 28 x 28 (7 x 7 tokens); got image_size={image_size}")
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"{EMBEDDED_NAME} weights {weights} do not exist (relative to {Path.cwd()}); "
                                    f"check the path, train them with `rrepa encoder train --out {weights}`, or "
                                    f"give none to use the shipped {EMBEDDED_NAME}")
        return load_embedded(shipped(EMBEDDED_NAME) if weights is None else weights, device)
    return load_dinov2(name, weights, image_size, device, model_kwargs)
