"""``fmnist-vae``, the embedded autoencoder of the latent Fashion-MNIST preset: a small diffusers ``AutoencoderKL``
that rrepa trains itself (no VAE for 28 x 28 grey images can be downloaded here), saved in diffusers layout so that
``--vae`` takes it exactly like SD-VAE (rrepa.data.vae.VAE).

Architecture (``VAEArch``): AutoencoderKL with block_out_channels (16, 32, 32) (three stages, two stride-2
downsamplings: 1 x 28 x 28 -> 4 x 7 x 7), one ResNet layer per stage, GroupNorm of 8 groups, and the mid-block
attention of SD's VAE (242k parameters). Widths (32, 64, 64) cost twice as much per step and gave the same test PSNR
in the same CPU time (lr 1e-3, L1: 16.6 dB after 100 steps against 16.4 dB after 200), and the narrow one encodes
and decodes twice as fast for the flow. The 4 x 7 x 7 latent has SD's 4 channels, and a patch-1 flow on it sees 49
tokens, as the pixel preset's patch-4 flow does on 28 x 28 images; it holds 196 numbers per image (a 4x
compression).

Training (``train_vae``): L2 reconstruction of the decoded posterior sample (18.8 dB test PSNR after 200 steps,
against 18.0 dB with SD's L1; ``loss="l1"`` is an option), plus ``kl_weight`` (1e-6, as SD's KL-f8) times the KL to
N(0, I) per pixel; no GAN and no LPIPS (there is no pretrained perceptual network offline, and a GAN would not fit
in ~10 CPU minutes). AdamW, linear warm-up then cosine decay, random horizontal flips, seeded (``seed``). Its exact
state is kept in ``<out>.partial.pt`` beside the folder every ``save_every`` steps and on Ctrl-C / SIGTERM, so an
interrupted training continues where it stopped and ends with the weights of an uninterrupted one.

Scaling (``fit_latent_scaling``): after training, the config's ``shift_factor`` is set to the mean and
``scaling_factor`` to 1 / std of the posterior means of (up to 10,000) training images, as SD set 0.18215, so that
the flow's latents have mean 0 and variance 1.

Saving (``save_vae``): ``save_pretrained`` into a temporary folder beside the target, synced, then renamed into
place, with ``rrepa_vae.json`` (settings, time, test PSNR) beside the weights: a half-written folder is never left
under the final name. ``rrepa vae train`` writes into ``<cache>/vae/fmnist-vae``; the name ``fmnist-vae`` (data.vae)
means the copy rrepa ships (rrepa.fmnist.shipped), never trained on first use.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from rrepa.data.cache import dataset_images
from rrepa.data.datasets import DataConfig, build_dataset
from rrepa.data.vae import VAE, autoencoder_kl
from rrepa.fmnist.shipped import shipped
from rrepa.utils import (
    Interrupted,
    atomic_write,
    cache_dir,
    deferred_interrupts,
    from_uint8,
    lr_factor,
    naming,
    publish_mode,
    run_lock,
    temp_dir_beside,
    to_uint8,
    torch_save,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

FMNIST_VAE_NAME = "fmnist-vae"
INFO_FILE = "rrepa_vae.json"


def default_vae_path() -> Path:
    """Where the embedded autoencoder is cached: <cache>/vae/fmnist-vae (a folder in diffusers layout)."""
    return cache_dir() / "vae" / FMNIST_VAE_NAME


def partial_path(path: str | os.PathLike) -> Path:
    """Where the training of the autoencoder destined for the folder `path` keeps its progress until it is done."""
    path = Path(path)
    return path.with_name(path.name + ".partial.pt")


# --------------------------------------------------------------------------------------------
# The network and its training
# --------------------------------------------------------------------------------------------


@dataclass
class VAEArch:
    """The AutoencoderKL of fmnist-vae; the latent grid is image_size / 2 ** (len(block_out_channels) - 1)."""

    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"VAEArch: norm_num_groups {self.norm_num_groups} must divide every channel count "
                             f"{self.block_out_channels}")

    def build(self, in_channels: int = 1, image_size: int = 28) -> AutoencoderKL:
        """A freshly initialised AutoencoderKL (seed torch first for reproducible weights)."""
        n = len(self.block_out_channels)
        return autoencoder_kl()(
            in_channels=in_channels, out_channels=in_channels, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block, latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups, sample_size=image_size, scaling_factor=1.0)


@dataclass
class VAETrainConfig:
    """How fmnist-vae is trained (see the module docstring)."""

    steps: int = 3000  # ~10 minutes: 0.16-0.2 s a step on one core beside two other trainings
    batch_size: int = 64
    lr: float = 3e-3  # of 1e-3, 3e-3 and 1e-2, the best after 200 steps
    weight_decay: float = 0.01
    warmup: int = 50
    kl_weight: float = 1e-6  # times the KL per pixel (nats), beside the per-pixel reconstruction loss
    loss: str = "l2"  # l2 | l1
    hflip: bool = True
    scale_images: int = 10_000  # training images whose latents set scaling_factor and shift_factor
    max_images: int | None = None  # train on the first this many images only (tests)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.scale_images < 2:
            raise ValueError(f"VAE training needs steps >= 1, batch_size >= 1 and scale_images >= 2, got "
                             f"{self.steps}, {self.batch_size}, {self.scale_images}")
        if not self.lr > 0 or self.kl_weight < 0:
            raise ValueError(f"VAE training needs lr > 0 and kl_weight >= 0, got {self.lr}, {self.kl_weight}")
        if self.loss not in ("l1", "l2"):
            raise ValueError(f"VAE training loss must be l1 or l2, got {self.loss!r}")


def train_vae(dataset, cfg: VAETrainConfig | None = None, arch: VAEArch | None = None,
              device: str | torch.device = "cpu", progress: bool = True, log: Callable[[str], None] = print,
              state_file: str | os.PathLike | None = None, save_every: int = 100) -> tuple[AutoencoderKL, dict]:
    """Train an AutoencoderKL on the images of `dataset` (labels are never read), then set its latent scaling
    (fit_latent_scaling). Returns (model in eval mode on the CPU, info).

    state_file: the training keeps its exact state there every `save_every` steps, at the end of the loop, and
    when SIGINT / SIGTERM stops it (it then raises rrepa.utils.Interrupted); a later call with the same settings
    continues from it and ends with the weights an uninterrupted call gives."""
    cfg, arch = cfg or VAETrainConfig(), arch or VAEArch()
    device = torch.device(device)
    images = dataset_images(dataset)[:cfg.max_images]
    n, c, size = images.shape[0], images.shape[1], images.shape[-1]
    factor = 2 ** (len(arch.block_out_channels) - 1)
    if n < 2 or size % factor:
        raise ValueError(f"VAE training needs >= 2 images of a size divisible by {factor}, got {n} of {size} px")
    torch.manual_seed(cfg.seed)  # the initial weights
    g = torch.Generator().manual_seed(cfg.seed)  # batches, flips and posterior noise, in that order each step
    model = arch.build(c, size).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, min(cfg.warmup, cfg.steps // 5))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, warmup=warm, total=cfg.steps, min_ratio=0.0))
    settings = {"arch": asdict(arch), "train": asdict(cfg), "images": int(n), "image_shape": [c, size, size]}
    step, spent, recent = 0, 0.0, []
    state_file = Path(state_file) if state_file is not None else None
    if state_file is not None and state_file.is_file():
        st = _read_state(state_file, settings, log)
        if st is not None:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            g.set_state(st["generator"])
            step, spent, recent = st["step"], st["seconds"], list(st["recent"])
            log(f"continuing the VAE's training from step {step} of {cfg.steps} ({state_file})")
    start = time.perf_counter()

    def save_state() -> None:
        state = {"settings": settings, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "generator": g.get_state(), "step": step,
                 "seconds": spent + time.perf_counter() - start, "recent": recent}
        atomic_write(state_file, lambda tmp: torch_save(state, tmp))

    rec_loss = F.l1_loss if cfg.loss == "l1" else F.mse_loss
    interrupts = deferred_interrupts() if state_file is not None else contextlib.nullcontext(None)
    with interrupts as stop, tqdm(total=cfg.steps, initial=step, desc=FMNIST_VAE_NAME, unit="step",
                                  disable=not progress, dynamic_ncols=True) as bar:
        while step < cfg.steps:
            idx = torch.randint(n, (cfg.batch_size,), generator=g)
            x = from_uint8(images[idx])
            if cfg.hflip:
                x = torch.where((torch.rand(x.shape[0], generator=g) < 0.5)[:, None, None, None], x.flip(-1), x)
            x = x.to(device)
            post = model.encode(x).latent_dist
            eps = torch.randn(post.mean.shape, generator=g).to(device)  # on the CPU: the same draws on any device
            rec = rec_loss(model.decode(post.mean + post.std * eps).sample, x)
            kl = post.kl().mean() / x[0].numel()
            loss = rec + cfg.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            recent = (recent + [float(rec.detach())])[-50:]
            if not math.isfinite(recent[-1]):
                raise RuntimeError(f"VAE training diverged at step {step} (loss {recent[-1]}); lower the lr")
            bar.update(1)
            bar.set_postfix(rec=f"{recent[-1]:.4f}", kl=f"{float(kl.detach()):.1f}")
            if state_file is not None and (stop or step % save_every == 0 or step == cfg.steps):
                save_state()
            if stop:
                raise Interrupted(f"interrupted the VAE's training at step {step} of {cfg.steps}; its progress is "
                                  f"saved in {state_file}: run the same command again to continue", stop.signum)
    seconds = spent + time.perf_counter() - start
    model.eval()
    scale, shift, std = fit_latent_scaling(model, images[:cfg.scale_images], device=device)
    info = {"name": FMNIST_VAE_NAME, "objective": f"{cfg.loss} + {cfg.kl_weight:g} x KL per pixel",
            "steps": cfg.steps, "train_seconds": round(seconds, 1), "train_images": int(n),
            "final_reconstruction_loss": round(sum(recent) / max(1, len(recent)), 5),
            "latent_std": std, "scaling_factor": scale, "shift_factor": shift, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "settings": settings}
    log(f"{FMNIST_VAE_NAME}: {cfg.steps} steps on {n} images in {seconds:.0f} s, {cfg.loss} loss "
        f"{info['final_reconstruction_loss']}; latents std {std:.4g} -> scaling_factor {scale:.5g}, "
        f"shift_factor {shift:.4g}")
    return model.cpu(), info


def _read_state(state_file: Path, settings: dict, log: Callable[[str], None]) -> dict | None:
    """A progress file of train_vae when it was written with `settings`, else None (said through log)."""
    try:
        st = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged progress file only costs the time it saved
        log(f"warning: ignoring the VAE's unreadable progress file {state_file} ({type(err).__name__})")
        return None
    if st.get("settings") != settings:
        log(f"note: {state_file} is from other settings; training the VAE from the start")
        return None
    return st


@torch.no_grad()
def fit_latent_scaling(model: AutoencoderKL, images: Tensor, batch_size: int = 500,
                       device: str | torch.device = "cpu") -> tuple[float, float, float]:
    """Set model.config's shift_factor to the mean and scaling_factor to 1 / std of the posterior means of
    uint8 images (N, C, H, W) (over all N x c x h x w numbers, in float64), so that rrepa.data.vae's latents
    (m - shift) * scale of these images have mean 0 and std 1. Returns (scaling_factor, shift_factor, std)."""
    was_training = model.training
    model.eval()
    total = total_sq = count = 0.0
    for lo in range(0, images.shape[0], batch_size):
        m = model.encode(from_uint8(images[lo:lo + batch_size]).to(device)).latent_dist.mean.double()
        total, total_sq, count = total + float(m.sum()), total_sq + float((m * m).sum()), count + m.numel()
    model.train(was_training)
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0) * count / max(1.0, count - 1))
    if not std > 0:
        raise ValueError("the VAE's latents have zero variance on these images; it cannot be scaled")
    scale, shift = 1.0 / std, mean
    model.register_to_config(scaling_factor=scale, shift_factor=shift)
    return scale, shift, std


# --------------------------------------------------------------------------------------------
# Reconstruction quality
# --------------------------------------------------------------------------------------------


def reconstruct(vae: VAE, images: Tensor, batch_size: int = 500, progress: bool = False) -> Tensor:
    """uint8 images (N, C, H, W) -> their uint8 reconstructions D(E(x)) from the posterior mean (N, C, H, W),
    on the CPU, quantised as saved images are (rrepa.utils.to_uint8)."""
    out = []
    with tqdm(total=images.shape[0], desc="reconstructions", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for lo in range(0, images.shape[0], batch_size):
            x = from_uint8(images[lo:lo + batch_size])
            out.append(to_uint8(vae.decode(vae.encode(x, batch_size=batch_size), batch_size=batch_size)).cpu())
            bar.update(x.shape[0])
    return torch.cat(out) if out else images[:0].clone()


def reconstruction_quality(vae: VAE, dataset, limit: int | None = None, batch_size: int = 500,
                           progress: bool = False) -> dict:
    """PSNR and MSE of the reconstructions (posterior mean, decoded, quantised to uint8) of the (first `limit`)
    images of `dataset`, on the pixel scale 0..255: MSE is the mean of (x - x_hat)^2 over all pixels of all
    images, PSNR = 10 log10(255^2 / MSE) dB of that one MSE (not a mean of per-image PSNRs).
    Returns {"psnr": dB, "mse": MSE, "images": N}."""
    images = dataset_images(dataset)[:limit]
    if images.shape[0] == 0:
        raise ValueError("reconstruction_quality needs at least one image")
    recon = reconstruct(vae, images, batch_size, progress)
    mse = float(((recon.double() - images.double()) ** 2).mean())
    psnr = 10 * math.log10(255.0 ** 2 / mse) if mse > 0 else math.inf
    return {"psnr": psnr, "mse": mse, "images": int(images.shape[0])}


# --------------------------------------------------------------------------------------------
# The folder (diffusers layout): saved atomically
# --------------------------------------------------------------------------------------------


def save_vae(model: AutoencoderKL, path: str | os.PathLike, info: dict | None = None) -> Path:
    """model.save_pretrained(path) plus INFO_FILE, atomically: written into a temporary folder beside `path`,
    synced, then renamed into place (an existing folder is replaced only once the new one is complete). A failure
    or Ctrl-C leaves the old folder, or none, under `path`, never a part."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(path)
    except OSError as err:
        raise naming(err, path) from err
    old = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / INFO_FILE).write_text(json.dumps(info or {}, indent=2, sort_keys=True, default=str) + "\n")
        for f in tmp.iterdir():
            publish_mode(f)  # the safetensors file is written 0600; the cache may be shared
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        if path.exists():
            old = path.with_name(f".{path.name}.tmp-old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(old, path)  # put the old folder back
        if isinstance(err, OSError):
            raise naming(err, path) from err
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _train_and_save(path: Path, cfg: VAETrainConfig | None, arch: VAEArch | None, data_path: str | None,
                    device: str | torch.device, log: Callable[[str], None], progress: bool) -> dict:
    """Train (resumably), measure the test PSNR, save; the caller holds the lock."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed save (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    train_set = build_dataset(DataConfig(name="fmnist", path=data_path), "train")
    say = tqdm.write if progress else log
    model, info = train_vae(train_set, cfg, arch, device=device, progress=progress, log=say,
                            state_file=partial_path(path))
    vae = VAE(model, FMNIST_VAE_NAME, device=device)
    t = time.perf_counter()
    info["test"] = reconstruction_quality(vae, build_dataset(DataConfig(name="fmnist", path=data_path), "test"),
                                          progress=progress)
    info["test"]["seconds"] = round(time.perf_counter() - t, 1)
    info["fingerprint"] = vae.fingerprint
    say(f"{FMNIST_VAE_NAME}: test reconstruction PSNR {info['test']['psnr']:.2f} dB (MSE {info['test']['mse']:.2f} "
        f"on 0..255, {info['test']['images']} images)")
    save_vae(vae.model.cpu(), path, info)
    partial_path(path).unlink(missing_ok=True)
    return info


def train_and_save_vae(path: str | os.PathLike, cfg: VAETrainConfig | None = None, arch: VAEArch | None = None,
                       data_path: str | None = None, device: str | torch.device = "cpu",
                       log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train fmnist-vae on the Fashion-MNIST training split (progress kept in partial_path(path), so that an
    interrupted training continues), measure its test PSNR and save it to the folder `path`, holding a lock on
    `path`'s parent against a second process training into it. Returns the info written beside the weights."""
    path = Path(path)
    with run_lock(path.parent, warn=log, name=f".{path.name}.lock"):
        return _train_and_save(path, cfg, arch, data_path, device, log, progress)


def load_vae(source: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
             data_path: str | None = None, log: Callable[[str], None] = print) -> VAE:
    """VAE.load(source), where the name "fmnist-vae" is the embedded autoencoder rrepa ships
    (rrepa.fmnist.shipped; nothing is trained on first use). data_path and log are accepted for the callers'
    uniformity."""
    if str(source) == FMNIST_VAE_NAME and not Path(source).exists():
        return VAE.load(shipped(FMNIST_VAE_NAME), device=device, dtype=dtype)
    return VAE.load(source, device=device, dtype=dtype)
