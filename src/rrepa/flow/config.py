"""The flow's shape: FlowConfig (patches, width, blocks, layers per block, classes) and FlowOutput, what a forward
pass returns. Positions (t, l) are 1-indexed (block, layer), as in the paper."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields

from torch import Tensor

Position = tuple[int, int]  # 1-indexed (block t, layer l)


def as_positions(positions: Iterable[Iterable[int]], what: str = "positions") -> list[Position]:
    """Positions as a list of int pairs: non-empty, no repeats, 1-indexed (the model's bounds are
    FlowConfig.check_positions')."""
    out = [(int(t), int(l)) for t, l in positions]
    if not out:
        raise ValueError(f"no {what} given ({what} is empty); give at least one 1-indexed (block, layer)")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} repeat: {out}")
    if any(t < 1 or l < 1 for t, l in out):
        raise ValueError(f"{what} {out} lie outside the blocks and layers: they are 1-indexed (block, layer)")
    return out


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowConfig:
    """Architecture of a TARFlow. Defaults are the paper's ImageNet 64 x 64 model."""

    in_channels: int = 3  # C: image (or latent) channels
    image_height: int = 64  # H, in pixels (or latent cells)
    image_width: int = 64  # W, in pixels (or latent cells)
    patch_size: int = 2  # p: tokens are p x p patches, D = C p^2 values each
    width: int = 768  # transformer width of every block
    num_blocks: int = 8  # T: flow blocks (permutations alternate identity / flip)
    # L: transformer layers of every block, or one count per block (block 1 first, forward order): STARFlow's
    # deep-shallow design, e.g. (1, 1, 1, 5), puts a deep block last (nearest z, first in generation). A list (from
    # JSON or YAML) is stored as a tuple.
    layers_per_block: int | tuple[int, ...] = 8
    head_dim: int = 64  # attention head dimension; heads = width / head_dim
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * width
    num_classes: int = 1000  # K: class-conditional with K labels; 0 = unconditional
    sigma: float = 0.05  # std of the Gaussian noise the model is trained on; used to denoise samples

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_height", "image_width", "patch_size", "width",
                     "num_blocks", "head_dim", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"FlowConfig.{name} must be >= 1, got {getattr(self, name)}")
        self._check_layers()
        if self.num_classes < 0:
            raise ValueError(f"FlowConfig.num_classes must be >= 0 (0 = unconditional), "
                             f"got {self.num_classes}")
        if self.sigma < 0:
            raise ValueError(f"FlowConfig.sigma must be >= 0, got {self.sigma}")
        p = self.patch_size
        if self.image_height % p or self.image_width % p:
            raise ValueError(
                f"patch_size {p} does not divide the image size {self.image_height} x "
                f"{self.image_width}; pick a patch size that divides both")
        if self.width % self.head_dim:
            raise ValueError(
                f"width {self.width} is not a multiple of head_dim {self.head_dim}; use a width "
                f"such as {max(1, round(self.width / self.head_dim)) * self.head_dim}")

    def to_dict(self) -> dict:
        """Plain values (lists for tuples), as stored in checkpoints, safetensors metadata and config.json."""
        d = asdict(self)
        if isinstance(d["layers_per_block"], tuple):
            d["layers_per_block"] = list(d["layers_per_block"])
        return d

    @classmethod
    def from_dict(cls, d) -> FlowConfig:
        """The inverse of to_dict; unknown keys are an error (a config written by a newer rrepa)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"incompatible flow config: unknown keys {unknown}; was it written by a newer rrepa?")
        return cls(**d)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (H/p, W/p)."""
        return self.image_height // self.patch_size, self.image_width // self.patch_size

    @property
    def num_tokens(self) -> int:
        """N = (H/p)(W/p)."""
        return self.grid[0] * self.grid[1]

    @property
    def token_dim(self) -> int:
        """D = C p^2."""
        return self.in_channels * self.patch_size**2

    @property
    def num_dims(self) -> int:
        """C H W: dimensions of one image."""
        return self.in_channels * self.image_height * self.image_width

    def _check_layers(self) -> None:
        """layers_per_block: an int >= 1, or one int >= 1 per block (a list becomes a tuple)."""
        L = self.layers_per_block
        if isinstance(L, (list, tuple)):
            if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in L):
                raise ValueError(f"FlowConfig.layers_per_block must be an int or a list of ints (one per block), "
                                 f"got {list(L)}")
            L = tuple(int(v) for v in L)
            object.__setattr__(self, "layers_per_block", L)  # frozen: normalise in place, once
            if len(L) != self.num_blocks:
                raise ValueError(f"FlowConfig.layers_per_block lists {len(L)} layer counts {list(L)} for "
                                 f"num_blocks = {self.num_blocks}; give one count per block (block 1 first) or one int")
            if min(L) < 1:
                raise ValueError(f"FlowConfig.layers_per_block entries must be >= 1, got {list(L)}")
        elif not isinstance(L, numbers.Integral) or isinstance(L, bool):
            raise ValueError(f"FlowConfig.layers_per_block must be an int or a list of ints (one per block), got {L!r}")
        elif L < 1:
            raise ValueError(f"FlowConfig.layers_per_block must be >= 1, got {L}")

    @property
    def layer_counts(self) -> tuple[int, ...]:
        """(L_1, ..., L_T): the layers of every block, block 1 first."""
        L = self.layers_per_block
        return L if isinstance(L, tuple) else (int(L),) * self.num_blocks

    def layers(self, t: int) -> int:
        """L_t: the transformer layers of block t (1-indexed, forward order)."""
        if not 1 <= t <= self.num_blocks:
            raise ValueError(f"block {t} is outside this model's blocks 1..{self.num_blocks} (1-indexed)")
        return self.layer_counts[t - 1]

    @property
    def positions(self) -> list[Position]:
        """Every 1-indexed (block t, layer l), block-major; block t contributes layers 1..L_t."""
        return [(t, l) for t, L in enumerate(self.layer_counts, start=1) for l in range(1, L + 1)]

    def check_positions(self, positions: Iterable[Position], what: str = "position") -> None:
        """ValueError naming the first (block, layer) outside this model's blocks and layers (block t's own
        layers 1..L_t when the blocks differ)."""
        T, counts = self.num_blocks, self.layer_counts
        for t, l in positions:
            if 1 <= t <= T and 1 <= l <= counts[t - 1]:
                continue
            if isinstance(self.layers_per_block, tuple):
                own = f"; block {t} has layers 1..{counts[t - 1]}" if 1 <= t <= T else ""
                raise ValueError(f"{what} (block {t}, layer {l}) is outside this model's blocks 1..{T} (layers per "
                                 f"block {list(counts)}){own} (1-indexed); e.g. ({T}, {counts[-1]}) is the deepest "
                                 f"layer of the last block")
            L = counts[0]
            raise ValueError(f"{what} (block {t}, layer {l}) is outside this model's blocks 1..{T} and "
                             f"layers 1..{L} (1-indexed); e.g. ({T}, {L}) is the deepest layer of the last block")


@dataclass
class FlowOutput:
    z: Tensor  # (B, C, H, W) latent
    logdet: Tensor  # (B,) log|det dz/dx|, summed over all C H W dimensions
    hidden: dict[Position, Tensor] = field(default_factory=dict)  # (t, l) -> (B, N, width), raster
    # Block inputs x^(0..T) as tokens (B, N, D) in raster order (x^(T) is z): the reverse alignment
    # paths reconstruct from them. Kept anyway by autograd, so returning them costs no memory.
    inputs: list[Tensor] = field(default_factory=list)
    y: Tensor | None = None  # the labels the forward was given (None: the null label)
    drop: Tensor | None = None  # (B,) bool: rows whose label was dropped to the null label
