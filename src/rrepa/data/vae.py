"""The VAE of latent TARFlow: diffusers' ``AutoencoderKL`` (no VAE of rrepa's own) and its latent scaling.

``VAE.load(source)`` opens a local folder in diffusers layout (``config.json`` +
``diffusion_pytorch_model.safetensors``, as ``save_pretrained`` writes it; a pipeline folder's ``vae/``
subfolder is used when the folder itself has no ``config.json``), or, only when rrepa may download
(``utils.is_offline``), a hub id such as ``stabilityai/sd-vae-ft-ema`` (``owner/name/subfolder`` names a
subfolder of a hub repository, e.g. ``stabilityai/stable-diffusion-2-1/vae``). The scaling comes from the
VAE's own config: latents are

    z = (m - shift_factor) * scaling_factor

with m the posterior mean (``encode(x)``) or a posterior sample (``encode(x, sample=True)``); shift_factor
is 0 when the config has none (SD's VAE: scaling_factor 0.18215, no shift), and decoding inverts it,
``decode(z) = D(z / scaling_factor + shift_factor)``. The per-channel ``latents_mean`` / ``latents_std`` of some
configs (SDXL-era VAEs) are refused rather than silently ignored.

Precision: ``dtype=torch.float32`` (the default), ``torch.float64`` (weights and math in float64, for tests of the
math) or ``torch.bfloat16`` (float32 weights, convolutions under ``torch.autocast`` in bf16, on CUDA or CPU;
diffusers' GroupNorm runs in float32 under autocast). Outputs are float32 (float64 for dtype=float64). Always
in eval mode, without gradients, in batches.

diffusers takes seconds to import, and only the latent path needs it: it is imported inside the functions that
use it, so ``import rrepa.data.vae`` (and the ``rrepa`` command) stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rrepa.utils import is_offline, state_fingerprint

if TYPE_CHECKING:  # for annotations only; imported for real in autoencoder_kl
    from diffusers import AutoencoderKL

CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LAYOUT = "a folder in diffusers layout (config.json + diffusion_pytorch_model.safetensors)"
# owner/name or owner/name/subfolder; anything else that does not exist locally is a missing path
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)?")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def autoencoder_kl() -> type[AutoencoderKL]:
    """diffusers' AutoencoderKL class."""
    # Function-local: diffusers takes seconds to import and only the latent path uses it (see the docstring).
    from diffusers import AutoencoderKL
    return AutoencoderKL


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32 / float64 / bfloat16, also by name ("float32", "bf16", ...)."""
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"VAE dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(f"VAE dtype must be float32, float64 or bfloat16, got {dtype}")
    return dtype


class VAE:
    """diffusers AutoencoderKL + its latent scaling. Latents z = (mean_or_sample - shift) * scaling_factor.

    Attributes: model (the AutoencoderKL, eval mode, frozen), name (the source as given, for messages),
    scaling_factor, shift_factor (from the config; shift 0 when absent), in_channels, latent_channels, factor
    (spatial downsampling, 2 ** (len(block_out_channels) - 1)), device, dtype, fingerprint (sha256 of the
    float32 weights, the config and the scaling: keys caches of latents, so another VAE never reuses them)."""

    def __init__(self, model: AutoencoderKL, name: str = "vae", device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32):
        self.dtype = as_dtype(dtype)
        self.device = torch.device(device)
        self.name = str(name)
        cfg = dict(model.config)
        if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
            raise ValueError(f"VAE {self.name}: its config has per-channel latents_mean / latents_std, which rrepa "
                             f"does not apply; use a VAE scaled by scaling_factor (and shift_factor) only")
        self.scaling_factor = float(cfg["scaling_factor"])
        self.shift_factor = float(cfg.get("shift_factor") or 0.0)
        if not self.scaling_factor > 0:
            raise ValueError(f"VAE {self.name}: scaling_factor must be > 0, got {self.scaling_factor}")
        self.in_channels = int(cfg["in_channels"])
        self.latent_channels = int(cfg["latent_channels"])
        self.factor = 2 ** (len(cfg["block_out_channels"]) - 1)
        model.float()  # the fingerprint is of float32 weights, whatever dtype they are used in
        public = {k: v for k, v in cfg.items() if not k.startswith("_")}  # not _name_or_path, _diffusers_version
        self.fingerprint = state_fingerprint(model, json.dumps(
            {"config": public, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor},
            sort_keys=True, default=str))
        weights = torch.float64 if self.dtype == torch.float64 else torch.float32
        if weights == torch.float64:
            model.double()  # not .to(dtype), about which diffusers warns for every model (fp32 modules [])
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.out_dtype = weights

    @classmethod
    def load(cls, source: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype | str = torch.float32) -> VAE:
        """The VAE of a local folder in diffusers layout or (online only) a hub id; one-line errors for a
        missing path, a folder that is not an AutoencoderKL, a hub id while offline."""
        name = str(source)
        path = Path(source).expanduser()
        if path.exists():
            folder = _model_folder(path, name)
            AutoencoderKL = autoencoder_kl()
            try:  # low_cpu_mem_usage=False: what diffusers does without `accelerate`, minus a warning at each load
                model = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
            except Exception as err:  # noqa: BLE001 - a damaged or foreign file fails in many ways (safetensors, torch)
                raise ValueError(f"VAE {name}: diffusers could not load {folder} as an AutoencoderKL "
                                 f"({_first_line(err)})") from err
        elif not HUB_ID.fullmatch(name) or name.startswith((".", "/", "~")):
            raise FileNotFoundError(f"VAE {name}: no such folder; pass {LAYOUT} (e.g. the --out of "
                                    f"`rrepa vae train`) or, when online, a hub id such as stabilityai/sd-vae-ft-ema")
        elif is_offline():
            raise FileNotFoundError(f"VAE {name}: no such folder, and downloads are off (RREPA_OFFLINE / "
                                    f"HF_HUB_OFFLINE); pass {LAYOUT}, e.g. a local copy of {name}")
        else:
            owner, repo, *sub = name.split("/")
            AutoencoderKL = autoencoder_kl()
            try:
                model = AutoencoderKL.from_pretrained(f"{owner}/{repo}", subfolder=sub[0] if sub else None,
                                                      low_cpu_mem_usage=False)
            except Exception as err:  # noqa: BLE001 - the hub's errors are many (HTTP, missing repo, gated, ...)
                raise FileNotFoundError(f"VAE {name}: not a local folder, and the hub could not provide it "
                                        f"({_first_line(err)}); pass {LAYOUT}") from err
        return cls(model, name, device=device, dtype=dtype)

    # -- shapes ------------------------------------------------------------------------------
    def latent_shape(self, image_hw: tuple[int, int]) -> tuple[int, int, int]:
        """(latent_channels, H / factor, W / factor) of (H, W) images; ValueError when not divisible."""
        h, w = (int(s) for s in image_hw)
        if h % self.factor or w % self.factor or h < 1 or w < 1:
            raise ValueError(f"image size {h} x {w} is not divisible by VAE {self.name}'s downsampling factor "
                             f"{self.factor}; use a multiple of {self.factor} (data.image_size)")
        return self.latent_channels, h // self.factor, w // self.factor

    def _check_images(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"VAE {self.name} encodes images (B, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"VAE {self.name} encodes float images in [-1, 1], got {x.dtype} "
                             f"(rrepa.utils.from_uint8 converts uint8)")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"VAE {self.name} takes {self.in_channels}-channel images, got {x.shape[1]} channels "
                             f"(images {tuple(x.shape)}); use a VAE for {x.shape[1]}-channel images")
        self.latent_shape(x.shape[-2:])

    def _autocast(self):
        if self.dtype != torch.bfloat16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # -- encode / decode ---------------------------------------------------------------------
    @torch.no_grad()
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of the posterior of one batch of images x (B, C, H, W) in [-1, 1], each (B, c, h, w),
        unscaled, on the VAE's device, in the output dtype."""
        with self._autocast():
            post = self.model.encode(x.to(self.device, self.out_dtype)).latent_dist
        return post.mean.to(self.out_dtype), post.std.to(self.out_dtype)

    @torch.no_grad()
    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None,
               batch_size: int = 64) -> Tensor:
        """Images x (B, C, H, W) in [-1, 1] -> scaled latents z (B, c, H / f, W / f), float32 (float64 for
        dtype=float64), on x's device.

        sample=False: z from the posterior mean (deterministic; what a latent dataset is usually made of).
        sample=True: z from a posterior sample m + std * eps; eps (B, c, h, w) is drawn in one torch.randn call
        from `generator` (on the generator's device; the global RNG when None), so the latents do not depend on
        batch_size."""
        self._check_images(x)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = x.shape[0]
        eps = None
        if sample:
            where = generator.device if generator is not None else torch.device("cpu")
            eps = torch.randn((n, *self.latent_shape(x.shape[-2:])), generator=generator, device=where,
                              dtype=self.out_dtype)
        out = []
        for lo in range(0, n, batch_size):
            m, s = self.posterior(x[lo:lo + batch_size])
            if eps is not None:
                m = m + s * eps[lo:lo + batch_size].to(self.device)
            out.append(((m - self.shift_factor) * self.scaling_factor).to(x.device))
        if not out:
            return torch.empty((0, *self.latent_shape(x.shape[-2:])), dtype=self.out_dtype, device=x.device)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, z: Tensor, batch_size: int = 64, clamp: bool = True) -> Tensor:
        """Scaled latents z (B, c, h, w) -> images (B, C, h * f, w * f), float32 (float64 for dtype=float64), on
        z's device; clamped to [-1, 1] unless clamp=False (the decoder may overshoot a little)."""
        if not isinstance(z, Tensor) or z.ndim != 4 or z.shape[1] != self.latent_channels:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"VAE {self.name} decodes latents (B, {self.latent_channels}, h, w), got {shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = []
        for lo in range(0, z.shape[0], batch_size):
            zb = z[lo:lo + batch_size].to(self.device, self.out_dtype) / self.scaling_factor + self.shift_factor
            with self._autocast():
                x = self.model.decode(zb).sample
            x = x.to(self.out_dtype)
            out.append((x.clamp(-1, 1) if clamp else x).to(z.device))
        if not out:
            h, w = z.shape[-2] * self.factor, z.shape[-1] * self.factor
            return torch.empty((0, self.in_channels, h, w), dtype=self.out_dtype, device=z.device)
        return torch.cat(out)

    def __repr__(self) -> str:
        return (f"VAE({self.name!r}, in_channels={self.in_channels}, latent_channels={self.latent_channels}, "
                f"factor={self.factor}, scaling_factor={self.scaling_factor:g}, shift_factor={self.shift_factor:g}, "
                f"device={self.device}, dtype={self.dtype})")


def check_latent_channels(vae: VAE, model_in_channels: int) -> None:
    """ValueError unless the VAE's latents have the channels the flow takes (model.in_channels)."""
    if vae.latent_channels != int(model_in_channels):
        raise ValueError(f"VAE {vae.name} gives {vae.latent_channels} latent channels but model.in_channels is "
                         f"{model_in_channels}; use a VAE with {model_in_channels} latent channels or set "
                         f"model.in_channels={vae.latent_channels}")


def _model_folder(path: Path, name: str) -> Path:
    """The folder holding the AutoencoderKL's config and weights: `path`, or its vae/ subfolder (a pipeline)."""
    if not path.is_dir():
        raise FileNotFoundError(f"VAE {name} is a file; pass {LAYOUT}")
    folder = path
    if not (path / CONFIG_FILE).is_file() and (path / "vae" / CONFIG_FILE).is_file():
        folder = path / "vae"
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"VAE {name}: no {CONFIG_FILE} in {folder}; pass {LAYOUT}")
    if not any((folder / f).is_file() for f in WEIGHTS_FILES):
        raise FileNotFoundError(f"VAE {name}: no weights in {folder} (expected {WEIGHTS_FILES[0]}); pass {LAYOUT}")
    try:
        cls = json.loads((folder / CONFIG_FILE).read_text()).get("_class_name", "AutoencoderKL")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"VAE {name}: {folder / CONFIG_FILE} is not a readable JSON object ({err})") from err
    if cls != "AutoencoderKL":
        raise ValueError(f"VAE {name}: {folder} holds a {cls}, not an AutoencoderKL")
    return folder


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
