"""Bits/dim of a dataset split (docs/DESIGN.md section 7): the flow's likelihood of 8-bit images with uniform
dequantization, and how a figure names its protocol (true or null label; the model's training noise)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from rrepa.distributed import Dist
from rrepa.flow import TARFlow
from rrepa.utils import generator


@torch.no_grad()
def evaluate_bpd(model: TARFlow, dataset, batch_size: int, d: Dist, seed: int = 0, conditional: bool = True,
                 max_images: int | None = None, progress: bool = True) -> dict:
    """Bits/dim of dataset's 8-bit images with uniform dequantization (model.bits_per_dim), averaged
    over the images; processes take every world_size-th batch. conditional: the true labels; False: the
    null label (TARFlow's protocol, docs/DESIGN.md section 7). Returns {"bpd", "images", "conditional",
    "protocol", "sigma"}: what was measured and the model's training noise, which every bpd figure names."""
    device = next(model.parameters()).device
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    use_labels = conditional and model.cfg.num_classes > 0
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of bpd, images)
    starts = range(d.rank * batch_size, n, d.world_size * batch_size)
    for lo in tqdm(starts, desc="bits/dim", unit="batch", disable=not (progress and d.is_main)):
        idx = range(lo, min(n, lo + batch_size))
        x = torch.stack([dataset.uint8(i) for i in idx]).to(device)
        y = torch.tensor([dataset.label(i) for i in idx], device=device) if use_labels else None
        g = generator(seed, lo)  # seeded by the batch's first image: the same noise whatever the process count
        u = torch.rand(x.shape, generator=g).to(device)
        bpd = model.bits_per_dim(x, y, noise=u)
        total += torch.stack([bpd.double().sum(), torch.tensor(float(len(idx)), device=device)])
    if d.world_size > 1:
        torch.distributed.all_reduce(total)
    return {"bpd": float(total[0] / total[1]), "images": int(total[1]), "conditional": use_labels,
            "protocol": bpd_protocol(use_labels), "sigma": model.cfg.sigma}


def bpd_protocol(conditional: bool) -> str:
    """How the likelihood was measured, e.g. "uniform dequantization, null label"."""
    return f"uniform dequantization, {'true label' if conditional else 'null label'}"


def describe_bpd(result: dict) -> str:
    """'5.4080 bits/dim (uniform dequantization, null label; model trained with sigma 0.05)' for a log line."""
    sigma = result.get("sigma")
    noise = ("model trained without noise" if sigma == 0 else f"model trained with sigma {sigma}: "
             f"noisy-image likelihood, not TARFlow's protocol" if sigma is not None else "sigma unknown")
    return f"{result['bpd']:.4f} bits/dim ({result['protocol']}; {noise})"
