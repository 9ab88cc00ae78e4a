"""The training objective: the NLL of the noisy images plus, with alignment, lambda times the alignment loss
(docs/DESIGN.md sections 1 and 2), and the encoder targets the alignment compares against.

`Objective` is a module so that DDP (which hooks forward) and torch.compile wrap it, and so that the
projectors sit in DDP and in the optimiser. It returns (loss, logs): the scalar to back-propagate and the
named terms, detached, for the log. Alignment is one more term: the training loop does not branch on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from rrepa.align.encoders import build_encoder
from rrepa.align.features import FeatureCache, IndexedFlipDataset
from rrepa.align.head import AlignHead, position_key
from rrepa.data.latent_run import LatentsWithImages, is_latent
from rrepa.data.latents import LatentDataset
from rrepa.distributed import Dist
from rrepa.flow.tarflow import TARFlow
from rrepa.training.config import RunConfig
from rrepa.utils import cache_dir


class Objective(nn.Module):
    """x (B, C, H, W) noisy images, y (B,) labels or None, and with alignment the encoder's tokens of the
    CLEAN images (B, n, d) on the grid enc_hw -> (loss, logs).

    loss = mean NLL per dimension (nats) + lambda * mean over positions of the alignment losses. logs holds
    "nll" and, with alignment, "align_loss" (the unweighted mean) and "align_t{t}_l{l}" per position. The flow
    runs once; the alignment reuses that forward's output (its hidden states for the forward strategy, its
    block inputs for the detach and reverse ones)."""

    def __init__(self, flow: TARFlow, align: AlignHead | None = None):
        super().__init__()
        self.flow = flow
        self.align = align

    @property
    def log_keys(self) -> list[str]:
        """The names in `logs`, in order."""
        if self.align is None:
            return ["nll"]
        return ["nll", "align_loss", *(f"align_{position_key(p)}" for p in self.align.cfg.positions)]

    def forward(self, x: Tensor, y: Tensor | None, label_drop: float, enc_tokens: Tensor | None = None,
                enc_hw: tuple[int, int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        hidden = self.align.cfg.positions if self.align is not None and self.align.cfg.strategy == "forward" else ()
        out = self.flow(x, y, hidden=hidden, label_drop=label_drop)
        nll = (-TARFlow.log_prob_of(out) / self.flow.cfg.num_dims).mean()
        logs = {"nll": nll.detach()}
        if self.align is None:
            return nll, logs
        al = self.align(self.flow, x, y, enc_tokens, enc_hw, forward_out=out)
        per = {f"align_{position_key(p)}": v for p, v in al.per_position.items()}
        logs.update(align_loss=torch.stack(list(per.values())).mean(), **per)
        return nll + al.loss, logs


class Batches:
    """Loader batches -> (x clean, y, encoder targets (B, n, d) or None), on the device.

    Without alignment this only moves (x, y). With it, the targets come from the feature cache (the loader
    then yields dataset indices and flip flags, see `wrap`) or from the frozen encoder, online.

    `dataset` is the CLEAN IMAGES the targets are computed from: the training images of a pixel run, or, for a
    latent run (data.latent_run), the images its latents were encoded from (image_dataset(cfg.data, "train"), index
    for index); the encoder sees them at data.image_size, and its patch grid is matched onto the flow's latent token
    grid as for pixels. A latent run's loader yields (z, y, index, flipped): the feature cache is looked up at that
    index and flip, or (targets online) `wrap` adds the clean image of that index and flip to each item."""

    def __init__(self, cfg: RunConfig, dataset, d: Dist, say):
        self.device = d.device
        self.encoder, self.cache, self.dim, self.hw = None, None, None, None
        self.images = dataset
        a = cfg.align
        if not a.enabled:
            return
        self.encoder = build_encoder(a.encoder, a.encoder_weights, a.encoder_image_size, d.device)
        self.dim = self.encoder.dim
        pixels = (cfg.data.image_size, cfg.data.image_size) if is_latent(cfg.data) else \
            (cfg.model.image_height, cfg.model.image_width)
        self.hw = tuple(self.encoder.grid(pixels))
        if a.feature_cache:
            root = Path(a.feature_cache_dir) if a.feature_cache_dir else cache_dir() / "features"
            self.cache = FeatureCache.build_or_load(self.encoder, dataset, root, hflip=cfg.data.hflip,
                                                    log=say, progress=d.is_main)
            self.hw = tuple(self.cache.grid)
            self.encoder = None  # not needed any more: free its memory
        say(f"alignment: {a.strategy}{'-' + a.reverse if a.strategy == 'reverse' else ''} at positions "
            f"{a.positions}, weight {a.weight}, encoder {a.encoder} ({self.dim}-d tokens on a {self.hw[0]} x "
            f"{self.hw[1]} grid), targets {'from ' + str(self.cache.path) if self.cache else 'computed online'}")

    @property
    def aligned(self) -> bool:
        return self.dim is not None

    def wrap(self, dataset, hflip: bool):
        """The training dataset as the loader should see it: with indices and flip flags for the cache; a latent
        dataset (which yields them itself, its flips drawn per item) with the clean images for online targets."""
        if isinstance(dataset, LatentDataset):
            return LatentsWithImages(dataset, self.images) if self.encoder is not None else dataset
        return IndexedFlipDataset(dataset, hflip) if self.cache is not None else dataset

    def split(self, batch) -> tuple[Tensor, Tensor, Tensor | None]:
        """A loader batch -> (x clean, y, targets (B, n, d) or None), on the device. Batches are (x, y), (x, y,
        index, flipped) (feature cache, or a latent dataset) or (z, y, index, flipped, clean images) (a latent
        dataset with online targets)."""
        tokens, images = None, None
        if len(batch) == 5:
            x, y, index, flipped, images = batch
        elif len(batch) == 4:
            x, y, index, flipped = batch
        else:
            x, y = batch
            images = x
        if self.cache is not None:
            tokens = self.cache.lookup(index, flipped, self.device)
        same = images is x  # a pixel run: the encoder sees the training images themselves
        x = x.to(self.device, non_blocking=True)
        if self.encoder is not None:
            tokens = self.encoder(x if same else images.to(self.device, non_blocking=True))  # no_grad, eval, float32
        return x, y.to(self.device, non_blocking=True), tokens
