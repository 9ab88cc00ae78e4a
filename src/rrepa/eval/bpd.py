"""Bits/dim of a dataset split (docs/DESIGN.md section 7): the flow's likelihood of 8-bit images with uniform
dequantization, and how a figure names its protocol (true or null label; the model's training noise).

A latent run's split (rrepa.data.latent_run.LatentPairs, marked ``latent``) is measured per LATENT dimension instead:
-log p(z + sigma * eps) / (c h w) in nats and bits, with z the VAE latents of the clean test images and eps ~ N(0, I)
at the training sigma (the density the flow was trained on; latents are continuous: no dequantization). These
figures are not comparable with pixel bits/dim; the result says so in "unit" and "protocol"."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from rrepa.distributed import Dist
from rrepa.flow.tarflow import TARFlow
from rrepa.utils import generator


@torch.no_grad()
def evaluate_bpd(model: TARFlow, dataset, batch_size: int, d: Dist, seed: int = 0, conditional: bool = True,
                 max_images: int | None = None, progress: bool = True) -> dict:
    """Bits/dim of dataset's 8-bit images with uniform dequantization (model.bits_per_dim), averaged
    over the images; processes take every world_size-th batch. conditional: the true labels; False: the
    null label (TARFlow's protocol, docs/DESIGN.md section 7). Returns {"bpd", "images", "conditional",
    "protocol", "sigma"}: what was measured and the model's training noise, which every bpd figure names."""
    if getattr(dataset, "latent", False):
        return evaluate_latent_bpd(model, dataset, batch_size, d, seed, conditional, max_images, progress)
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


@torch.no_grad()
def evaluate_latent_bpd(model: TARFlow, dataset, batch_size: int, d: Dist, seed: int = 0, conditional: bool = True,
                        max_images: int | None = None, progress: bool = True) -> dict:
    """Nats and bits per latent dimension of dataset's latents z (items (z (c, h, w), y)) under the training noise,
    -log p(z + sigma * eps | y) / (c h w), eps drawn per batch from generator(seed, first index): the same noise
    whatever the process count. Returns {"bpd" (bits per latent dimension), "nats_per_dim", "unit", "images",
    "conditional", "protocol", "sigma", "space": "latent"}."""
    device = next(model.parameters()).device
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    use_labels = conditional and model.cfg.num_classes > 0
    sigma = model.cfg.sigma
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of nats per dimension, latents)
    starts = range(d.rank * batch_size, n, d.world_size * batch_size)
    for lo in tqdm(starts, desc="nats/latent dim", unit="batch", disable=not (progress and d.is_main)):
        items = [dataset[i] for i in range(lo, min(n, lo + batch_size))]
        z = torch.stack([x for x, _ in items])
        y = torch.stack([t for _, t in items]).to(device) if use_labels else None
        eps = torch.randn(z.shape, generator=generator(seed, lo))
        nats = model.nll((z + sigma * eps).to(device), y)
        total += torch.stack([nats.double().sum(), torch.tensor(float(len(items)), device=device)])
    if d.world_size > 1:
        torch.distributed.all_reduce(total)
    nats = float(total[0] / total[1])
    return {"bpd": nats / math.log(2), "nats_per_dim": nats, "unit": "bits per latent dimension",
            "images": int(total[1]), "conditional": use_labels, "protocol": latent_protocol(use_labels, sigma),
            "sigma": sigma, "space": "latent"}


def latent_protocol(conditional: bool, sigma: float) -> str:
    """e.g. "VAE latents + N(0, 0.2^2) noise, per latent dimension, no dequantization, null label"."""
    return (f"VAE latents + N(0, {sigma:g}^2) noise, per latent dimension, no dequantization, "
            f"{'true label' if conditional else 'null label'}")


def bpd_protocol(conditional: bool) -> str:
    """How the likelihood was measured, e.g. "uniform dequantization, null label"."""
    return f"uniform dequantization, {'true label' if conditional else 'null label'}"


def describe_bpd(result: dict) -> str:
    """'5.4080 bits/dim (uniform dequantization, null label; model trained with sigma 0.05)' for a log line."""
    sigma = result.get("sigma")
    if result.get("space") == "latent":
        return (f"{result['bpd']:.4f} bits ({result['nats_per_dim']:.4f} nats) per latent dimension "
                f"({result['protocol']}; not comparable with pixel bits/dim)")
    noise = ("model trained without noise" if sigma == 0 else f"model trained with sigma {sigma}: "
             f"noisy-image likelihood, not TARFlow's protocol" if sigma is not None else "sigma unknown")
    return f"{result['bpd']:.4f} bits/dim ({result['protocol']}; {noise})"
