"""The frozen-encoder interface that representation alignment reads its targets from (rrepa.align.encoders builds
the encoders by name; rrepa.fmnist.encoder is the embedded one).

A ``FrozenEncoder`` maps clean images in [-1, 1], (B, C, H, W), to patch tokens (B, n, d) in raster order on
the grid ``grid((H, W)) = (gh, gw)``, float32, computed without gradient in eval mode (the module is
``requires_grad_(False)`` and ignores ``.train()``). Attributes: ``name``, ``dim`` (d), ``image_size`` (the
side the encoder resizes its input to) and ``fingerprint`` (a hash of the weights and the preprocessing, the
key of the feature cache, see rrepa.align.features). The tokens are returned on the encoder's device whatever the
input's."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rrepa.utils import state_fingerprint


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


# --------------------------------------------------------------------------------------------
# For the encoders: the weights' hash, the resize
# --------------------------------------------------------------------------------------------


def resize_square(x: Tensor, size: int, mode: str) -> Tensor:
    """Images (B, C, H, W) -> (B, C, size, size) by F.interpolate (antialiased when shrinking); unchanged
    when already that size."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = x.shape[-2] > size or x.shape[-1] > size
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=shrink)

