"""Representation alignment: REPA's projector, the cosine loss, grid matching and the strategy dispatch.

See docs/DESIGN.md section 2. The loss for one aligned position (t, l) is

    L(t, l) = - mean_{b, i} cos( Proj_{t,l}(h(t, l))_{b,i}, phi(x_clean)_{b,i} )

(phi: the frozen encoder's patch tokens), computed in float32; positions are averaged, and the total
alignment term is weight * mean_{(t, l)} L(t, l) (REPA averages over its aligned encoders the same way,
so lambda does not scale with the number of positions).

Grid matching: the encoder's patch tokens are resampled onto the flow's token grid (the targets are
constants, so the resampling never touches the gradient, and every flow token keeps its own target).
The default mode "pool" is area resampling (adaptive average pooling): at integer ratios it is the exact
geometric correspondence (a downsampled target is the mean of the encoder patches covering the token, an
upsampled one is the encoder patch containing the token, without blending neighbours across object
boundaries). "interpolate" is bilinear (antialiased when shrinking), smoother at non-integer ratios.

iREPA (arXiv 2512.10794, "What matters for representation alignment: global information or spatial
structure?") changes two things, both options here: a convolutional projector (`projector="conv"`: one 3 x 3
convolution over the flow's token grid instead of the per-token MLP) and a spatial normalisation of the
targets (`target_norm="spatial"`: each image's encoder tokens minus their mean over the spatial positions,
divided by their standard deviation over the positions, per channel), which removes the component that all
tokens of an image share and leaves the spatial structure. The paper gives them in a few lines of code; this
is our reading of its description, not a copy of its code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rrepa import precision
from rrepa.align.reverse import REVERSE_METHODS, STRATEGIES, aligned_features
from rrepa.flow.config import Position, as_positions
from rrepa.flow.tarflow import TARFlow

FLOAT32_PARTS = ("path", "projector")
GRID_MODES = ("pool", "interpolate")
PROJECTORS = ("mlp", "conv")
TARGET_NORMS = ("none", "spatial")


@dataclass
class AlignConfig:
    """Representation alignment settings. Defaults are the paper's ImageNet 64 setting."""

    # Aligned hidden states, 1-indexed (block t, layer l); default layer 6 of blocks 7 and 8 (block 8 is the
    # last in the forward direction, the first in generation).
    positions: list[Position] = field(default_factory=lambda: [(7, 6), (8, 6)])
    # Gradient path of the features: forward (F-REPA) | detach (D-REPA) | reverse (R-REPA, the paper's).
    strategy: str = "reverse"
    # How the reverse path is computed: pseudo (the paper's, one parallel pass per block) | naive (exact
    # autoregressive inverse, slow) | jacobi (K refinements, exact gradient at K = N). Ignored unless
    # strategy is reverse.
    reverse: str = "pseudo"
    # K for reverse = jacobi; None means N (the number of tokens), the exact gradient.
    jacobi_steps: int | None = None
    # Frozen target encoder (REPA's default: DINOv2 ViT-B/14 patch tokens).
    encoder: str = "dinov2_vitb14"
    # lambda: weight of the alignment loss added to the NLL (REPA's 0.5).
    weight: float = 0.5
    # Hidden width of the per-token projector MLP (REPA's 2048).
    projector_hidden: int = 2048
    # How encoder tokens are resampled onto the flow's token grid: pool (area) | interpolate (bilinear).
    grid_mode: str = "pool"
    # mlp (REPA's per-token MLP) | conv (iREPA: one 3 x 3 convolution over the token grid).
    projector: str = "mlp"
    # none | spatial (iREPA: targets standardised over the spatial positions of each image, per channel).
    target_norm: str = "none"
    # Parts of the alignment computed in float32 when training runs in bf16 (train.precision): "path" (the
    # detached or reverse pass that gives the features h) and / or "projector". Empty: everything follows
    # train.precision. The loss itself is always float32.
    float32: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.positions = as_positions(self.positions, "AlignConfig.positions")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.reverse not in REVERSE_METHODS:
            raise ValueError(f"unknown reverse method {self.reverse!r}; choose one of {', '.join(REVERSE_METHODS)}")
        if self.jacobi_steps is not None and self.jacobi_steps < 1:
            raise ValueError(f"jacobi_steps must be >= 1 (or None for N), got {self.jacobi_steps}")
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.projector_hidden < 1:
            raise ValueError(f"projector_hidden must be >= 1, got {self.projector_hidden}")
        if self.grid_mode not in GRID_MODES:
            raise ValueError(f"unknown grid_mode {self.grid_mode!r}; choose one of {', '.join(GRID_MODES)}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"unknown projector {self.projector!r}; choose one of {', '.join(PROJECTORS)}")
        if self.target_norm not in TARGET_NORMS:
            raise ValueError(f"unknown target_norm {self.target_norm!r}; choose one of {', '.join(TARGET_NORMS)}")
        self.float32 = list(self.float32)
        if not set(self.float32) <= set(FLOAT32_PARTS) or len(set(self.float32)) != len(self.float32):
            raise ValueError(f"align.float32 must list distinct parts among {', '.join(FLOAT32_PARTS)}, got "
                             f"{self.float32}")
        if "path" in self.float32 and self.strategy == "forward":
            raise ValueError("align.float32 'path' needs strategy detach or reverse: with forward the features are "
                             "the training forward's own hidden states; drop 'path' or change the strategy")


def position_key(position: Position) -> str:
    """ModuleDict key of a position: (7, 6) -> 't7_l6'."""
    t, l = position
    return f"t{t}_l{l}"


def build_projector(in_dim: int, out_dim: int, hidden: int = 2048) -> nn.Sequential:
    """REPA's per-token projector: Linear-SiLU-Linear-SiLU-Linear, (..., in_dim) -> (..., out_dim)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out_dim))


class ConvProjector(nn.Module):
    """iREPA's projector: one 3 x 3 convolution over the token grid, (B, h*w, in_dim) raster order -> (B, h*w,
    out_dim); zero padding at the borders, so each projected token sees its 8 neighbours."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, padding=1)

    def forward(self, h: Tensor, hw: tuple[int, int]) -> Tensor:
        B, n, d = h.shape
        grid = h.transpose(1, 2).reshape(B, d, *hw)
        return self.conv(grid).flatten(2).transpose(1, 2)


def spatial_norm(tokens: Tensor, eps: float = 1e-6) -> Tensor:
    """iREPA's target normalisation: (B, n, d) tokens standardised over the n positions of each image, per
    channel (mean 0, standard deviation 1 along dim 1)."""
    mean = tokens.mean(dim=1, keepdim=True)
    std = tokens.std(dim=1, keepdim=True, unbiased=False)
    return (tokens - mean) / (std + eps)


def match_grid(tokens: Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int], mode: str = "pool") -> Tensor:
    """Resample raster-ordered tokens (B, h*w, d) on grid from_hw = (h, w) onto to_hw -> (B, h'*w', d).

    mode "pool" (default): area resampling (adaptive average pooling) in either direction; at integer
    ratios a shrink averages each k x k group and a growth repeats each token k x k times.
    mode "interpolate": bilinear (align_corners=False), antialiased when the grid shrinks.
    """
    if mode not in GRID_MODES:
        raise ValueError(f"unknown grid mode {mode!r}; choose one of {', '.join(GRID_MODES)}")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must have shape (B, n, d), got {tuple(tokens.shape)}")
    (h, w), (h2, w2) = (int(v) for v in from_hw), (int(v) for v in to_hw)
    B, n, d = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h} x {w} grid")
    if (h, w) == (h2, w2):
        return tokens
    grid = tokens.transpose(1, 2).reshape(B, d, h, w)
    if mode == "pool":
        out = F.adaptive_avg_pool2d(grid, (h2, w2))
    else:
        out = F.interpolate(grid, size=(h2, w2), mode="bilinear", align_corners=False,
                            antialias=h2 < h or w2 < w)
    return out.reshape(B, d, h2 * w2).transpose(1, 2)


def cosine_alignment_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Negative cosine similarity between pred and target (B, n, d), averaged over tokens and batch.

    Computed in float32 with autocast off (float64 inputs stay float64), whatever the inputs' dtype.
    """
    if pred.shape != target.shape:
        raise ValueError(f"projected features {tuple(pred.shape)} and encoder tokens {tuple(target.shape)} "
                         f"differ in shape")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p = F.normalize(pred.to(dtype), dim=-1)
        q = F.normalize(target.to(dtype), dim=-1)
        return -(p * q).sum(-1).mean()


@dataclass
class AlignOutput:
    loss: Tensor  # scalar: weight * mean over positions of the per-position losses (add it to the NLL)
    per_position: dict[Position, Tensor]  # (t, l) -> unweighted loss, detached (for logging)


class AlignHead(nn.Module):
    """The projectors (one per aligned position, keyed 't{t}_l{l}') and the alignment loss."""

    def __init__(self, cfg: AlignConfig, flow_width: int, encoder_dim: int):
        super().__init__()
        self.cfg = cfg
        self.projectors = nn.ModuleDict({
            position_key(p): ConvProjector(flow_width, encoder_dim) if cfg.projector == "conv"
            else build_projector(flow_width, encoder_dim, cfg.projector_hidden) for p in cfg.positions})

    def loss_from_features(self, features: Mapping[Position, Tensor], enc_tokens: Tensor,
                           flow_hw: tuple[int, int], enc_hw: tuple[int, int] | None = None) -> AlignOutput:
        """features: (t, l) -> h (B, N, width) raster order on the flow grid flow_hw; enc_tokens (B, n, d)
        raster order on enc_hw (a square grid when None). The encoder tokens are resampled onto the flow grid."""
        enc_hw = _square(enc_tokens.shape[1]) if enc_hw is None else enc_hw
        target = match_grid(enc_tokens.detach(), enc_hw, flow_hw, self.cfg.grid_mode)
        if self.cfg.target_norm == "spatial":  # on the flow's grid: the positions the loss compares
            target = spatial_norm(target)
        per, project32 = {}, "projector" in self.cfg.float32
        for p in self.cfg.positions:
            proj, h = self.projectors[position_key(p)], features[p]
            with precision.float32(h.device) if project32 else contextlib.nullcontext():
                h = h.float() if project32 else h
                pred = proj(h, flow_hw) if isinstance(proj, ConvProjector) else proj(h)
            per[p] = cosine_alignment_loss(pred, target)
        loss = self.cfg.weight * torch.stack(list(per.values())).mean()
        return AlignOutput(loss, {p: v.detach() for p, v in per.items()})

    def forward(self, model: TARFlow, x: Tensor, y: Tensor | None, enc_tokens: Tensor,
                enc_hw: tuple[int, int] | None = None, forward_out: object | None = None,
                drop: Tensor | None = None) -> AlignOutput:
        """Alignment loss of the flow on clean images x (B, C, H, W) with labels y, against the encoder's
        patch tokens of the same images enc_tokens (B, n, d). forward_out, drop: see
        rrepa.align.reverse.aligned_features (pass the training forward's FlowOutput to avoid a re-run)."""
        cfg = self.cfg
        with precision.float32(x.device) if "path" in cfg.float32 else contextlib.nullcontext():
            feats = aligned_features(model, x, y, cfg.positions, cfg.strategy, cfg.reverse, cfg.jacobi_steps,
                                     forward_out, drop)
        return self.loss_from_features(feats, enc_tokens, model.cfg.grid, enc_hw)


def _square(n: int) -> tuple[int, int]:
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"{n} encoder tokens do not form a square grid; pass enc_hw")
    return s, s
