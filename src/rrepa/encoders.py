"""Frozen target encoders for representation alignment: DINOv2 (via timm) and an embedded self-supervised
encoder for Fashion-MNIST that rrepa trains itself.

Every encoder is a ``FrozenEncoder``: clean images in [-1, 1], (B, C, H, W) in, patch tokens (B, n, d) in
raster order on the grid ``grid((H, W)) = (gh, gw)`` out, float32, computed without gradient in eval mode
(the module is ``requires_grad_(False)`` and ignores ``.train()``). Attributes: ``name``, ``dim`` (d),
``image_size`` (the side the encoder resizes its input to) and ``fingerprint`` (a hash of the weights and the
preprocessing, the key of the feature cache, see rrepa.features). The tokens are returned on the encoder's
device whatever the input's.

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
  the cost, with no more information than the 64 px image holds): rrepa.align.match_grid maps the 16 x 16
  tokens onto the flow's grid.
- the position embedding is kept at the checkpoint's own grid (37 x 37) and resampled by timm to the
  grid in use at every call (``dynamic_img_size``: bicubic, antialiased, the same function timm uses when
  it loads weights at another size). Meta's hub code interpolates with a 0.1 offset and without antialias,
  so its tokens differ slightly from these at grids other than 37 x 37.
- patch tokens: the final (normed) tokens without the CLS and register tokens.

``fmnist-ssl``, the embedded encoder (the default of the fmnist preset): a small CNN giving d = 128 tokens
on a 7 x 7 grid for 28 x 28 inputs, trained by rrepa on the Fashion-MNIST training split with a
self-supervised objective (SimCLR's NT-Xent between two augmented views, on the mean-pooled tokens through
a projection MLP; the labels are never read). It is cached in ``<cache>/encoders/fmnist-ssl.safetensors``
(``<cache>`` is $RREPA_CACHE_DIR, else $XDG_CACHE_HOME/rrepa, else ~/.cache/rrepa), trained on first use
when missing, and retrained with ``rrepa encoder train`` (which also reports a linear-probe accuracy).
Input: x in [-1, 1]; RGB is averaged to gray; other sizes are resized to 28 x 28.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rrepa.checkpoint import load_state_checked
from rrepa.data import cache_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

EMBEDDED_NAME = "fmnist-ssl"
EMBEDDED_FILE = "fmnist-ssl.safetensors"
CONFIG_KEY = "rrepa_encoder_config"  # safetensors metadata: the backbone's SSLConfig as JSON
INFO_KEY = "rrepa_encoder_info"  # safetensors metadata: training info (steps, time, probe accuracy) as JSON

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


def encoder_names() -> list[str]:
    return [EMBEDDED_NAME, *DINOV2_VARIANTS]




def embedded_encoder_path() -> Path:
    return cache_dir() / "encoders" / EMBEDDED_FILE


def is_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "RREPA_OFFLINE"))


def state_fingerprint(module: nn.Module, extra: str = "") -> str:
    """sha256 of the module's state dict (names, dtypes, shapes, bytes, in key order) and `extra`."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(extra.encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class FrozenEncoder(nn.Module, ABC):
    """Base class: clean images (B, C, H, W) in [-1, 1] -> patch tokens (B, n, d) on grid(H, W), float32.

    Subclasses set name, dim, image_size and implement preprocess(x) and encode(x) (the latter on
    preprocessed images), and preprocessing_spec() (a string describing the preprocessing, hashed into the
    fingerprint)."""

    name: str
    dim: int
    image_size: int

    def _freeze(self) -> None:
        super().train(False)
        self.requires_grad_(False)
        self._fingerprint: str | None = None

    def train(self, mode: bool = True) -> FrozenEncoder:  # always eval, whatever `mode`
        return super().train(False)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @abstractmethod
    def grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        ...

    @abstractmethod
    def preprocessing_spec(self) -> str:
        ...

    @abstractmethod
    def preprocess(self, x: Tensor) -> Tensor:
        ...

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        ...

    @property
    def fingerprint(self) -> str:
        """Hash of the weights and the preprocessing (computed once: the weights are frozen)."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = state_fingerprint(self, f"{type(self).__name__}|{self.name}|"
                                                        f"{self.preprocessing_spec()}")
        return self._fingerprint

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            what = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: expected float images (B, C, H, W) in [-1, 1], got {what}")
        x = self.preprocess(x.to(self.device, torch.float32))
        tokens = self.encode(x).float()
        gh, gw = self.grid(x.shape[-2:])
        if tokens.shape[1] != gh * gw:  # internal consistency
            raise RuntimeError(f"{self.name}: {tokens.shape[1]} tokens do not fill the {gh} x {gw} grid")
        return tokens

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, image_size={self.image_size}"


def _resize(x: Tensor, size: int, mode: str) -> Tensor:
    if x.shape[-2:] == (size, size):
        return x
    shrink = x.shape[-2] > size or x.shape[-1] > size
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=shrink)


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
        x = _resize((x + 1) / 2, self.image_size, "bicubic")
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
            from safetensors.torch import load_file

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
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

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
# The embedded self-supervised encoder (fmnist-ssl)
# --------------------------------------------------------------------------------------------


@dataclass
class SSLConfig:
    """Architecture of the embedded encoder: a stride-2 3x3 conv stem, then one stage per width (a stride-2
    3x3 conv between stages, then `convs_per_stage` 3x3 convs), each conv followed by BatchNorm and ReLU;
    then a 1x1 projection to `dim` and a LayerNorm. Grid: image_size / 2^len(widths) (28 px -> 7 x 7)."""

    in_channels: int = 1
    image_size: int = 28
    widths: tuple[int, ...] = (32, 64)
    convs_per_stage: int = 1
    dim: int = 128

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths or self.image_size % 2 ** len(self.widths):
            raise ValueError(f"SSLConfig.image_size {self.image_size} is not divisible by 2^{len(self.widths)}")

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** len(self.widths)


def _conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SSLBackbone(nn.Module):
    """(B, C, S, S) in [-1, 1] -> tokens (B, (S / 2^stages)^2, dim), LayerNorm'ed."""

    def __init__(self, cfg: SSLConfig):
        super().__init__()
        self.cfg = cfg
        layers = _conv(cfg.in_channels, cfg.widths[0], 2)
        c = cfg.widths[0]
        for s, w in enumerate(cfg.widths):
            if s > 0:
                layers += _conv(c, w, 2)
                c = w
            for _ in range(cfg.convs_per_stage):
                layers += _conv(c, w)
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, cfg.dim, 1)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(self.convs(x))
        return self.norm(h.flatten(2).transpose(1, 2))


class EmbeddedEncoder(FrozenEncoder):
    """The frozen fmnist-ssl backbone behind the FrozenEncoder interface."""

    def __init__(self, backbone: SSLBackbone, name: str = EMBEDDED_NAME, info: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.dim = backbone.cfg.dim
        self.image_size = backbone.cfg.image_size
        self.info = dict(info or {})
        self._freeze()

    def grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        g = self.backbone.cfg.grid_size
        return g, g

    def preprocessing_spec(self) -> str:
        return f"ssl|{json.dumps(asdict(self.backbone.cfg), sort_keys=True)}|[-1,1]|rgb->mean gray|resize bilinear"

    def preprocess(self, x: Tensor) -> Tensor:
        c = self.backbone.cfg.in_channels
        if x.shape[1] != c:
            if c == 1 and x.shape[1] == 3:
                x = x.mean(1, keepdim=True)
            elif c == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise ValueError(f"{self.name}: expected {c} channel(s) (or {'3' if c == 1 else '1'}), "
                                 f"got {x.shape[1]}")
        return _resize(x, self.image_size, "bilinear")

    def encode(self, x: Tensor) -> Tensor:
        return self.backbone(x)


def save_embedded(path: str | os.PathLike, backbone: SSLBackbone, info: dict | None = None) -> None:
    """Write the backbone to a safetensors file (config and training info in its metadata), atomically."""
    from safetensors.torch import save_file

    from rrepa.checkpoint import atomic_write

    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    meta = {CONFIG_KEY: json.dumps(asdict(backbone.cfg)), INFO_KEY: json.dumps(info or {})}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def load_embedded(path: str | os.PathLike, device: str | torch.device = "cpu",
                  name: str = EMBEDDED_NAME) -> EmbeddedEncoder:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedded encoder file {path} not found; train it with `rrepa encoder train`")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); delete it and run "
                         f"`rrepa encoder train`") from err
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path} has no rrepa encoder config in its metadata; it was not written by "
                         f"`rrepa encoder train`")
    raw = json.loads(meta[CONFIG_KEY])
    known = {f.name for f in fields(SSLConfig)}
    if set(raw) - known:
        raise ValueError(f"{path}: unknown encoder config keys {sorted(set(raw) - known)}; written by a newer rrepa?")
    backbone = SSLBackbone(SSLConfig(**raw))
    load_state_checked(backbone, state, str(path), hint="retrain it with `rrepa encoder train --overwrite`")
    return EmbeddedEncoder(backbone, name, json.loads(meta.get(INFO_KEY, "{}"))).to(device)


@dataclass
class SSLTrainConfig:
    """How the embedded encoder is trained (SimCLR NT-Xent on two augmented views, no labels)."""

    steps: int = 500
    batch_size: int = 256
    lr: float = 5e-3
    weight_decay: float = 1e-4
    warmup: int = 30
    temperature: float = 0.2
    proj_hidden: int = 512
    proj_dim: int = 128
    crop_min: float = 0.5  # smallest area fraction of the random resized crop
    cutout: float = 0.25  # probability of the cutout rectangle
    max_images: int | None = None  # train on the first this many images only (tests)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"SSL training needs steps >= 1 and batch_size >= 2, got {self.steps}, {self.batch_size}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError("SSL training needs lr > 0 and temperature > 0")


def dataset_images(dataset) -> Tensor:
    """All images of an rrepa ImageDataset as (N, C, H, W) uint8, unflipped, WITHOUT reading labels
    (uses the in-memory tensor of a TensorImageDataset, else dataset.uint8(i))."""
    from rrepa.data import TensorImageDataset

    if isinstance(dataset, TensorImageDataset) and dataset.images.shape[-1] == dataset.image_size:
        return dataset.images
    if not hasattr(dataset, "uint8"):
        raise ValueError(f"{type(dataset).__name__} has no uint8(i); pass an rrepa ImageDataset (rrepa.data)")
    return torch.stack([dataset.uint8(i) for i in range(len(dataset))])


def augment(x: Tensor, gen: torch.Generator, crop_min: float = 0.5, cutout: float = 0.25) -> Tensor:
    """SimCLR-style views for small grayscale images x (B, C, S, S) in [-1, 1]: random resized crop
    (area crop_min-100 %, aspect 3/4-4/3), horizontal flip, brightness / contrast jitter (p 0.8), cutout
    (probability `cutout`)."""
    B, C, S, _ = x.shape
    dev = x.device

    def u(lo: float, hi: float, *shape: int) -> Tensor:
        return (torch.rand(shape or (B,), generator=gen) * (hi - lo) + lo).to(dev)

    area = u(crop_min, 1.0)
    log_r = u(math.log(3 / 4), math.log(4 / 3))
    sw = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)  # crop width / image width
    sh = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    tx = (u(-1, 1) * (1 - sw))
    ty = (u(-1, 1) * (1 - sh))
    flip = torch.where(u(0, 1) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = sw * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sh, ty
    grid = F.affine_grid(theta, (B, C, S, S), align_corners=False)
    v = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    jitter = (u(0, 1) < 0.8).float().view(B, 1, 1, 1)
    c = 1 + jitter * u(-0.4, 0.4).view(B, 1, 1, 1)
    b = jitter * u(-0.4, 0.4).view(B, 1, 1, 1)
    v = ((v + 1) / 2 - 0.5) * c + 0.5 + b / 2  # contrast around mid-grey and brightness in [0, 1] units
    v = v.clamp(0, 1) * 2 - 1
    # cutout: a rectangle 15-45 % of the image's side in each direction, filled with black (-1)
    cut = (u(0, 1) < cutout).view(B, 1, 1)
    ch, cw = (u(0.15, 0.45) * S).long(), (u(0.15, 0.45) * S).long()
    cy, cx = (u(0, 1) * S).long(), (u(0, 1) * S).long()
    rows = torch.arange(S, device=dev).view(1, S, 1)
    cols = torch.arange(S, device=dev).view(1, 1, S)
    inside = ((rows - cy.view(B, 1, 1)).abs() <= ch.view(B, 1, 1) // 2) & \
             ((cols - cx.view(B, 1, 1)).abs() <= cw.view(B, 1, 1) // 2) & cut
    return torch.where(inside.unsqueeze(1), torch.full_like(v, -1.0), v)


def nt_xent(z: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss for z (2B, k): rows i and i + B are the two views of one image."""
    z = F.normalize(z.float(), dim=-1)
    n = z.shape[0] // 2
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def train_ssl_encoder(dataset, cfg: SSLTrainConfig | None = None, arch: SSLConfig | None = None,
                      device: str | torch.device = "cpu", progress: bool = True,
                      log: Callable[[str], None] = print) -> tuple[SSLBackbone, dict]:
    """Train the embedded encoder's backbone on the images of `dataset` (labels are never read) with
    SimCLR's objective. Returns the backbone (eval mode, on the CPU) and an info dict."""
    from tqdm.auto import tqdm

    cfg = cfg or SSLTrainConfig()
    images = dataset_images(dataset)
    if cfg.max_images is not None:
        images = images[:cfg.max_images]
    if images.shape[0] < 2:
        raise ValueError(f"SSL training needs at least 2 images, got {images.shape[0]}")
    arch = arch or SSLConfig(in_channels=images.shape[1], image_size=images.shape[-1])
    if (arch.in_channels, arch.image_size) != (images.shape[1], images.shape[-1]):
        raise ValueError(f"images are {tuple(images.shape[1:])}, the encoder expects {arch.in_channels} x "
                         f"{arch.image_size} x {arch.image_size}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    backbone = SSLBackbone(arch).to(device)
    head = nn.Sequential(nn.Linear(arch.dim, cfg.proj_hidden), nn.BatchNorm1d(cfg.proj_hidden),
                         nn.ReLU(inplace=True), nn.Linear(cfg.proj_hidden, cfg.proj_dim)).to(device)
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, min(cfg.warmup, cfg.steps // 5))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    batch = min(cfg.batch_size, images.shape[0])
    backbone.train()
    head.train()
    start = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="fmnist-ssl", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(images.shape[0], (batch,), generator=gen)
        x = (images[idx].to(device, torch.float32) / 127.5 - 1.0)
        views = torch.cat([augment(x, gen, cfg.crop_min, cfg.cutout), augment(x, gen, cfg.crop_min, cfg.cutout)])
        z = head(backbone(views).mean(1))
        loss = nt_xent(z, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"SSL training diverged (loss {losses[-1]}); lower the learning rate")
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    backbone.eval().cpu()
    tail = losses[-20:]
    info = {"objective": "simclr-nt-xent", "steps": cfg.steps, "batch_size": batch, "images": int(images.shape[0]),
            "train_seconds": round(seconds, 1), "final_loss": round(sum(tail) / len(tail), 4),
            "train_config": asdict(cfg)}
    log(f"fmnist-ssl: {cfg.steps} steps on {images.shape[0]} images in {seconds:.0f} s, loss {info['final_loss']}")
    return backbone, info


@torch.no_grad()
def pooled_features(encoder: FrozenEncoder, dataset, batch_size: int = 500, limit: int | None = None) -> Tensor:
    """Mean-pooled tokens (N, d) of the (unflipped) images of the dataset (the first `limit` only if given)."""
    images = dataset_images(dataset)[:limit]
    out = [encoder(images[i:i + batch_size].float() / 127.5 - 1.0).mean(1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def dataset_labels(dataset) -> Tensor:
    targets = getattr(dataset, "targets", None)
    if isinstance(targets, Tensor):
        return targets.to(torch.int64)
    return torch.tensor([dataset.label(i) for i in range(len(dataset))], dtype=torch.int64)


def linear_probe(encoder: FrozenEncoder, train_set, test_set, max_train: int | None = None,
                 batch_size: int = 500, max_iter: int = 100, weight_decay: float = 1e-4) -> dict:
    """Test accuracy of a logistic regression on frozen mean-pooled tokens (standardised), fit on the
    training split's features (the first max_train if given) by full-batch L-BFGS."""
    xtr, ytr = pooled_features(encoder, train_set, batch_size, max_train), dataset_labels(train_set)[:max_train]
    xte, yte = pooled_features(encoder, test_set, batch_size), dataset_labels(test_set)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    k = int(max(ytr.max(), yte.max())) + 1
    clf = nn.Linear(xtr.shape[1], k)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(clf(xtr), ytr) + weight_decay * clf.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        acc_tr = (clf(xtr).argmax(1) == ytr).float().mean().item()
        acc_te = (clf(xte).argmax(1) == yte).float().mean().item()
    return {"probe_train_accuracy": round(acc_tr, 4), "probe_test_accuracy": round(acc_te, 4),
            "probe_train_images": int(xtr.shape[0]), "probe_test_images": int(xte.shape[0])}


def ensure_embedded(path: str | os.PathLike | None = None, data_path: str | None = None,
                    device: str | torch.device = "cpu", log: Callable[[str], None] = print) -> Path:
    """The cached fmnist-ssl file, trained (default settings, Fashion-MNIST train split) if missing."""
    from rrepa.data import DataConfig, build_dataset
    from rrepa.features import file_lock

    path = Path(path) if path is not None else embedded_encoder_path()
    if path.is_file():
        return path
    with file_lock(path.with_name(f".{path.name}.lock")):  # DDP ranks on one host: one trains, the others wait
        if path.is_file():
            return path
        log(f"fmnist-ssl encoder not found at {path}; training it (a few minutes, once; "
            f"`rrepa encoder train` does the same)")
        train_set = build_dataset(DataConfig(name="fmnist", path=data_path), "train")
        backbone, info = train_ssl_encoder(train_set, device=device, log=log)
        save_embedded(path, backbone, info)
    return path


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def build_encoder(name: str, weights: str | os.PathLike | None = None, image_size: int | None = None,
                  device: str | torch.device = "cpu", *, model_kwargs: dict | None = None,
                  train_if_missing: bool = True) -> FrozenEncoder:
    """A frozen encoder by name: 'fmnist-ssl' (weights: its .safetensors file, default the cache, trained
    there first if missing and train_if_missing) or a DINOv2 name (weights: Meta's .pth or timm's file;
    image_size: the side images are resized to, a multiple of 14, default 224)."""
    if name == EMBEDDED_NAME:
        if image_size not in (None, 28):
            raise ValueError(f"{EMBEDDED_NAME} works at 28 x 28 (7 x 7 tokens); got image_size={image_size}")
        if weights is None:
            path = embedded_encoder_path()
            if not path.is_file() and train_if_missing:
                ensure_embedded(path, device=device)
            weights = path
        return load_embedded(weights, device)
    return load_dinov2(name, weights, image_size, device, model_kwargs)


def cmd_encoder_train(args: argparse.Namespace) -> None:
    """Train the embedded fmnist-ssl encoder, cache it and report its linear-probe accuracy."""
    from rrepa.data import DataConfig, build_dataset

    out = Path(args.out) if args.out else embedded_encoder_path()
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to retrain it (or --out elsewhere)")
    from rrepa.distributed import resolve_device

    device = resolve_device(args.device)
    cfg = SSLTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         max_images=args.max_images)
    train_set = build_dataset(DataConfig(name="fmnist", path=args.data_path), "train")
    backbone, info = train_ssl_encoder(train_set, cfg, device=device)
    if not args.no_probe:
        test_set = build_dataset(DataConfig(name="fmnist", path=args.data_path), "test")
        enc = EmbeddedEncoder(backbone)
        t = time.perf_counter()
        info.update(linear_probe(enc, train_set, test_set, max_train=args.probe_max_train))
        info["probe_seconds"] = round(time.perf_counter() - t, 1)
        print(f"linear probe (logistic regression on mean-pooled tokens, fit on {info['probe_train_images']} "
              f"train images): test accuracy {100 * info['probe_test_accuracy']:.2f} %")
    save_embedded(out, backbone, info)
    print(f"wrote {out}: fingerprint {EmbeddedEncoder(backbone).fingerprint[:16]}")


def add_cli(sub) -> None:
    """Register `rrepa encoder train` on the top-level sub-parsers."""
    p = sub.add_parser("encoder", help="frozen target encoders (train the embedded fmnist-ssl encoder)")
    esub = p.add_subparsers(dest="encoder_command", required=True, metavar="ACTION")
    t = esub.add_parser("train", help="train the embedded self-supervised Fashion-MNIST encoder (no labels)",
                        description="Train fmnist-ssl (SimCLR on the Fashion-MNIST training split, labels unused), "
                                    "cache it and report a linear-probe accuracy on the test split.")
    t.add_argument("--out", help=f"output file (default <cache>/encoders/{EMBEDDED_FILE}, "
                                 f"cache = $RREPA_CACHE_DIR or ~/.cache/rrepa)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing file")
    t.add_argument("--steps", type=int, default=SSLTrainConfig.steps, help="optimiser steps")
    t.add_argument("--batch-size", type=int, default=SSLTrainConfig.batch_size, help="images per step (x2 views)")
    t.add_argument("--lr", type=float, default=SSLTrainConfig.lr, help="AdamW learning rate")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-images", type=int, help="train on the first this many images only")
    t.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    t.add_argument("--probe-max-train", type=int, help="fit the probe on the first this many train images")
    t.add_argument("--data-path", help="folder with the Fashion-MNIST IDX files (default: system / cache)")
    t.add_argument("--device", default="auto", help="auto (CUDA if available), cuda or cpu")
    t.set_defaults(func=cmd_encoder_train)
