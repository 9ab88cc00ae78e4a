"""``fmnist-ssl``, the embedded encoder (the alignment target of the fmnist preset): a small CNN giving d = 128
tokens on a 7 x 7 grid for 28 x 28 inputs, trained by rrepa on the Fashion-MNIST training split with a
self-supervised objective (SimCLR's NT-Xent between two augmented views, on the mean-pooled tokens through
a projection MLP; the labels are never read). rrepa ships it (rrepa.fmnist.shipped), so nothing is trained on
first use; ``rrepa encoder train`` trains another into ``<cache>/encoders/fmnist-ssl.safetensors`` (``<cache>`` is
rrepa.utils.cache_dir()) and reports its linear-probe accuracy (rrepa.eval.linear's probe on the mean-pooled
tokens); ``align.encoder_weights`` picks such a file. Input: x in [-1, 1]; RGB is averaged to gray; other sizes
are resized to 28 x 28.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from rrepa.align.encoder_base import FrozenEncoder, resize_square
from rrepa.data.cache import dataset_images
from rrepa.eval.linear import DEFAULT_L2_GRID
from rrepa.eval.linear import linear_probe as fit_probe
from rrepa.flow.checkpoint import load_state_checked
from rrepa.utils import atomic_write, cache_dir, from_uint8, lr_factor

EMBEDDED_NAME = "fmnist-ssl"
EMBEDDED_FILE = "fmnist-ssl.safetensors"
CONFIG_KEY = "rrepa_encoder_config"  # safetensors metadata: the backbone's SSLConfig as JSON
INFO_KEY = "rrepa_encoder_info"  # safetensors metadata: training info (steps, time, probe accuracy) as JSON


def embedded_encoder_path() -> Path:
    """Where `rrepa encoder train` writes a retrained encoder: <cache>/encoders/fmnist-ssl.safetensors."""
    return cache_dir() / "encoders" / EMBEDDED_FILE


# --------------------------------------------------------------------------------------------
# The network
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
        return resize_square(x, self.image_size, "bilinear")

    def encode(self, x: Tensor) -> Tensor:
        return self.backbone(x)


# --------------------------------------------------------------------------------------------
# The cached file (safetensors)
# --------------------------------------------------------------------------------------------


def save_embedded(path: str | os.PathLike, backbone: SSLBackbone, info: dict | None = None) -> None:
    """Write the backbone to a safetensors file (config and training info in its metadata), atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    meta = {CONFIG_KEY: json.dumps(asdict(backbone.cfg)), INFO_KEY: json.dumps(info or {})}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def load_embedded(path: str | os.PathLike, device: str | torch.device = "cpu",
                  name: str = EMBEDDED_NAME) -> EmbeddedEncoder:
    """The frozen encoder of a file written by save_embedded; one-line errors for a missing, unreadable or
    foreign file."""
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


# --------------------------------------------------------------------------------------------
# Self-supervised training (SimCLR)
# --------------------------------------------------------------------------------------------


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
    # cfg.seed itself, not utils.generator's derived seed: a given seed trains the same encoder as before
    gen = torch.Generator().manual_seed(cfg.seed)
    backbone = SSLBackbone(arch).to(device)
    head = nn.Sequential(nn.Linear(arch.dim, cfg.proj_hidden), nn.BatchNorm1d(cfg.proj_hidden),
                         nn.ReLU(inplace=True), nn.Linear(cfg.proj_hidden, cfg.proj_dim)).to(device)
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, min(cfg.warmup, cfg.steps // 5))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, warmup=warm, total=cfg.steps, min_ratio=0.0))
    batch = min(cfg.batch_size, images.shape[0])
    backbone.train()
    head.train()
    start = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="fmnist-ssl", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(images.shape[0], (batch,), generator=gen)
        x = from_uint8(images[idx].to(device))
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


# --------------------------------------------------------------------------------------------
# The linear probe
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def pooled_features(encoder: FrozenEncoder, dataset, batch_size: int = 500, limit: int | None = None) -> Tensor:
    """Mean-pooled tokens (N, d) of the (unflipped) images of the dataset (the first `limit` only if given)."""
    images = dataset_images(dataset)[:limit]
    out = [encoder(from_uint8(images[i:i + batch_size])).mean(1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def dataset_labels(dataset) -> Tensor:
    targets = getattr(dataset, "targets", None)
    if isinstance(targets, Tensor):
        return targets.to(torch.int64)
    return torch.tensor([dataset.label(i) for i in range(len(dataset))], dtype=torch.int64)


def linear_probe(encoder: FrozenEncoder, train_set, test_set, max_train: int | None = None,
                 batch_size: int = 500, max_iter: int = 100, weight_decay: float | None = None) -> dict:
    """Accuracy of rrepa.eval.linear's logistic probe on the frozen mean-pooled tokens (N, d) of the training
    split (the first max_train images if given) and of the test split: standardised features, l2 chosen on a
    held-out part of the training features, full-batch L-BFGS (max_iter). weight_decay: a fixed penalty
    weight_decay * ||W||^2 instead of the choice. Returns probe_{train,test}_accuracy (4 places),
    probe_{train,test}_images and probe_l2."""
    xtr = pooled_features(encoder, train_set, batch_size, max_train)
    xte = pooled_features(encoder, test_set, batch_size)
    return _probe(xtr, xte, train_set, test_set, max_iter, weight_decay)


def pixel_probe(train_set, test_set, max_train: int | None = None, max_iter: int = 100) -> dict:
    """linear_probe's probe on the raw pixels, flattened to (N, C * H * W) in [-1, 1]: how far a linear classifier
    gets with no representation at all, the floor every encoder's and every flow layer's probe is read against.
    Unlike the pooled tokens it keeps where each value is. Same return keys as linear_probe."""
    xtr = from_uint8(dataset_images(train_set)[:max_train]).flatten(1)
    xte = from_uint8(dataset_images(test_set)).flatten(1)
    return _probe(xtr, xte, train_set, test_set, max_iter, None)


def _probe(xtr: Tensor, xte: Tensor, train_set, test_set, max_iter: int, weight_decay: float | None) -> dict:
    ytr, yte = dataset_labels(train_set)[:xtr.shape[0]], dataset_labels(test_set)
    k = int(max(ytr.max(), yte.max())) + 1
    grid = DEFAULT_L2_GRID if weight_decay is None else (2 * weight_decay,)  # the probe's penalty is (l2 / 2) ||W||^2
    r = fit_probe(xtr, ytr, xte, yte, k, grid=grid, max_iter=max_iter)
    return {"probe_train_accuracy": round(r["train_acc"], 4), "probe_test_accuracy": round(r["test_acc"], 4),
            "probe_train_images": int(xtr.shape[0]), "probe_test_images": int(xte.shape[0]), "probe_l2": r["l2"]}
