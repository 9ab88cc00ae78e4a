"""Drawing samples from a trained flow, and image grids.

`rrepa sample` writes ADM's layout: an .npz whose `arr_0` is (N, H, W, C) uint8 and, for a
class-conditional model, `labels` (N,) int64. Samples come in batches; batch j draws its noise from a
generator seeded with (seed, j), so the images do not depend on the batch-to-process assignment and
a run under torchrun gives the same file as a single process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from rrepa.distributed import Dist
from rrepa.flow.jacobi import Jacobi, SampleStats
from rrepa.flow.tarflow import TARFlow
from rrepa.utils import atomic_write, generator, to_uint8


def save_grid(x: Tensor, path: str | Path, ncol: int) -> None:
    """Images (B, C, H, W) in [-1, 1] as one PNG, ncol images per row, separated by 2 px of white."""
    u = to_uint8(x, strict=False).cpu()
    B, C, H, W = u.shape
    nrow = math.ceil(B / ncol)
    pad = 2
    grid = torch.full((C, nrow * (H + pad) + pad, ncol * (W + pad) + pad), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, ncol)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = u[i]
    arr = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(arr[..., 0] if C == 1 else arr)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))  # format: the temporary name has no .png


GRID_COLUMNS = 10  # classes a sample grid shows at most: ImageNet's 1000 would make a batch of rows x 1000 images


def grid_labels(model: TARFlow, rows: int) -> tuple[Tensor | None, int]:
    """Labels for a grid with one column per class, (rows * cols,) = [c_1, .., c_cols, c_1, ..], and the number of
    columns: every class when K <= GRID_COLUMNS, else GRID_COLUMNS classes spread evenly over 0..K-1 (0 and K-1
    included); (None, 8) for an unconditional model."""
    K = model.cfg.num_classes
    if K == 0:
        return None, 8
    classes = torch.arange(K) if K <= GRID_COLUMNS else torch.linspace(0, K - 1, GRID_COLUMNS).round().long()
    return classes.repeat(rows), len(classes)


@torch.no_grad()
def generate(model: TARFlow, labels: Tensor | None, n: int, batch_size: int, seed: int, d: Dist,
             guidance: float = 0.0, anneal: bool = False, attn_temp: float = 1.0, temperature: float = 1.0,
             denoise: bool = True, progress: bool = True, sampler: str | Jacobi = "sequential",
             return_stats: bool = False, to_images: Callable[[Tensor], Tensor] | None = None,
             ) -> dict[int, Tensor] | tuple[dict[int, Tensor], SampleStats | None]:
    """This process's share of n samples: {batch index j: images (b, C, H, W) in [-1, 1] on the CPU}.

    labels: (n,) int labels or None. Batch j holds samples [j * batch_size, (j + 1) * batch_size) and
    is drawn by process j % world_size with torch.Generator seeded (seed, j).
    temperature: std of the prior noise z (1 = the model's distribution).
    sampler: see TARFlow.reverse. return_stats: also return the SampleStats of this process's batches merged
    (None when it drew none). to_images: the run's model-space -> image map, applied per batch on the device
    after the denoising step (rrepa.data.latent_run.ImageSpace: the VAE decoding of a latent run; None: as drawn).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    param = next(model.parameters())
    device = param.device
    cfg = model.cfg
    num_batches = math.ceil(n / batch_size)
    mine = range(d.rank, num_batches, d.world_size)
    out = {}
    stats = None
    for j in tqdm(mine, desc="sampling", unit="batch", disable=not (progress and d.is_main)):
        lo, hi = j * batch_size, min(n, (j + 1) * batch_size)
        g = generator(seed, j, device)
        y = None if labels is None else labels[lo:hi].to(device)
        z = torch.randn((hi - lo, cfg.in_channels, cfg.image_height, cfg.image_width), generator=g, device=device,
                        dtype=param.dtype)
        x, s = draw(model, z * temperature, y, guidance, anneal, attn_temp, denoise, sampler, return_stats=True)
        out[j] = (x if to_images is None else to_images(x)).cpu()
        stats = s if stats is None else stats.merge(s)
    return (out, stats) if return_stats else out


def draw(model: TARFlow, z: Tensor, y: Tensor | None, guidance: float = 0.0, anneal: bool = False,
         attn_temp: float = 1.0, denoise: bool = True, sampler: str | Jacobi = "sequential",
         return_stats: bool = False) -> Tensor | tuple[Tensor, SampleStats]:
    """Images (B, C, H, W) from prior noise z (B, C, H, W): the reverse flow with `sampler` (see
    TARFlow.reverse), then (when the model was trained on noisy images and denoise is True) one score step
    to remove that noise. return_stats: also return the reverse's SampleStats."""
    x, stats = model.reverse(z, y, guidance=guidance, anneal=anneal, attn_temp=attn_temp, sampler=sampler,
                             return_stats=True)
    x = model.denoise(x, y) if denoise and model.cfg.sigma > 0 else x
    return (x, stats) if return_stats else x


def save_npz(path: str | Path, images: Tensor, labels: Tensor | None) -> None:
    """ADM's layout: arr_0 (N, H, W, C) uint8, plus labels (N,) int64 when conditional."""
    arrays = {"arr_0": to_uint8(images).permute(0, 2, 3, 1).numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy().astype(np.int64)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    atomic_write(path, write)
