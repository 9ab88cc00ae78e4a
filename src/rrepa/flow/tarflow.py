"""TARFlow: a stack of autoregressive affine flows whose autoregression is a causal transformer.

Notation follows docs/DESIGN.md section 1 and the R-REPA paper:

    x      image in [-1, 1]^(C x H x W), cut into N = (H/p)(W/p) tokens of dimension D = C p^2
    t      block index, 1..T (block T is the last in the forward direction, the first in generation)
    l      layer index inside a block, 1..L_t (block t's own count, FlowConfig.layers(t): one L for every block,
           or a per-block list as in STARFlow's deep-shallow design)
    h      hidden state of a block's transformer, (B, N, width)
    mu     shift, alpha log-scale of the affine transform, (B, N, D)
    z      z_i = (x_i - mu_i(x_<i)) * exp(-alpha_i(x_<i)); standard Gaussian prior
    logdet log|det dz/dx| = -sum(alpha), summed over every dimension (not a mean)

Block t permutes its tokens (identity for odd t, reversed for even t, 1-indexed; i.e. the first
block keeps raster order), runs its transformer on the permuted sequence and shifts the output by one
position, so token 0 gets (mu, alpha) = (0, 0). Block inputs and outputs are in raster order.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from rrepa.flow.blocks import FlowBlock
from rrepa.flow.config import FlowConfig, FlowOutput, Position
from rrepa.flow.jacobi import Jacobi, SampleStats, as_sampler
from rrepa.precision import bf16_active, float32
from rrepa.utils import finite_rows

# --------------------------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------------------------


class TARFlow(nn.Module, PyTorchModelHubMixin, library_name="rrepa", tags=["normalizing-flow", "tarflow"]):
    """Transformer autoregressive flow over images (B, C, H, W) in [-1, 1].

    Shared like any hub model (huggingface_hub's PyTorchModelHubMixin): `model.save_pretrained(dir)` writes
    config.json (the FlowConfig) and model.safetensors; `TARFlow.from_pretrained(dir_or_hub_id)` reads them back.
    Every command that takes --ckpt takes such a folder or hub id too (rrepa.training.run.load_run)."""

    def __init__(self, cfg: FlowConfig | dict):
        super().__init__()
        # A dict is a FlowConfig as from_pretrained reads it back from config.json.
        self.cfg = cfg = FlowConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
        # Block t (1-indexed) flips when t is even: the first block reads raster order. It has cfg.layers(t) layers.
        self.blocks = nn.ModuleList(FlowBlock(cfg, flip=bool(t % 2), num_layers=cfg.layers(t + 1))
                                    for t in range(cfg.num_blocks))
        # The value checks of the inputs (finite images and class weights, labels in range) each cost a device
        # sync and break torch.compile's graph; a training loop whose data were validated on loading turns them off.
        self.validate_inputs = True

    @property
    def activation_checkpointing(self) -> bool:
        """Whether the transformer layers are recomputed in the backward instead of keeping their activations
        (torch.utils.checkpoint, non-reentrant, under the forward's autocast): the same gradients for one more
        forward's compute; only where autograd records (training, the R-REPA reverse paths)."""
        return all(b.checkpointing for b in self.blocks)

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        for b in self.blocks:
            b.checkpointing = bool(on)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> TARFlow:
        """A model from a pretrained folder (config.json + model.safetensors, as save_pretrained and `rrepa export`
        write it) or a hub id ("owner/name"); huggingface_hub's keyword arguments pass through. A missing local
        path or a run folder of `rrepa train` (which has no config.json) is a one-line error saying what works."""
        text = str(pretrained_model_name_or_path)
        source = Path(text).expanduser()
        if source.is_dir() and not (source / "config.json").is_file():
            if any(source.glob("ckpt-*.pt")) or (source / "ema.safetensors").is_file():
                raise ValueError(f"{source} is a run folder of `rrepa train`, not a pretrained folder (it has no "
                                 f"config.json); open it with rrepa.training.run.load_run({text!r}), or make one with "
                                 f"`rrepa export --ckpt {text} --out DIR` and load DIR")
            raise FileNotFoundError(f"{source} holds no config.json: not a pretrained folder (config.json + "
                                    f"model.safetensors, as save_pretrained and `rrepa export` write it)")
        hub_id = re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", text)  # owner/name; never ./x, ../x, /x or ~/x
        if not source.exists() and not hub_id:
            raise FileNotFoundError(f"{text} does not exist (and is no hub id owner/name); give a pretrained "
                                    f"folder (config.json + model.safetensors) or a hub id")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # --- tokens ------------------------------------------------------------------------------

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, D), raster order over patches, channel-major inside a token."""
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, C, H, W); the inverse of patchify."""
        B = x.shape[0]
        cfg, p = self.cfg, self.cfg.patch_size
        gh, gw = cfg.grid
        x = x.reshape(B, gh, gw, cfg.in_channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, cfg.in_channels, cfg.image_height, cfg.image_width)

    # --- input checks ------------------------------------------------------------------------

    def check_images(self, x: Tensor, name: str = "x") -> None:
        cfg = self.cfg
        expected = (cfg.in_channels, cfg.image_height, cfg.image_width)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{name} must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}) for this model, "
                f"got {tuple(x.shape)}; resize the images or build the model with a matching FlowConfig")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor in [-1, 1], got {x.dtype}; "
                             f"convert uint8 images with x / 127.5 - 1")
        if self.validate_inputs and not bool(torch.isfinite(x).all()):
            bad = (~finite_rows(x)).nonzero().flatten().tolist()
            raise ValueError(f"{name} contains NaN or infinite values in {len(bad)} of {x.shape[0]} images (rows "
                             f"{bad[:5]}{' ...' if len(bad) > 5 else ''}); give finite images in [-1, 1] (data: check "
                             f"the pipeline; samples: the model or sampler diverged on those rows)")

    def check_labels(self, y: Tensor | None, batch: int) -> None:
        K = self.cfg.num_classes
        if y is None:
            return
        if K == 0:
            raise ValueError("labels were given to an unconditional model (num_classes = 0); "
                             "pass y=None or build the model with num_classes > 0")
        if y.is_floating_point():
            if y.shape != (batch, K):
                raise ValueError(f"class weights must have shape ({batch}, {K}), got {tuple(y.shape)}")
            if self.validate_inputs and not bool(torch.isfinite(y).all()):
                raise ValueError("class weights contain NaN or infinite values")
            return
        if y.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(y.shape)}")
        if self.validate_inputs and y.numel() and (int(y.min()) < 0 or int(y.max()) >= K):
            raise ValueError(f"labels must lie in [0, {K}), got values in "
                             f"[{int(y.min())}, {int(y.max())}]")

    def embeddings(self, y: Tensor | None, drop: Tensor | None = None) -> list[Tensor | None]:
        """Per-block class embeddings; rows where drop (B,) bool is True get the null label."""
        es = []
        for block in self.blocks:
            e = block.embedding(y)
            if drop is not None and e is not None and e.dim() == 2:
                e = torch.where(drop[:, None], block.embedding(None), e)
            es.append(e)
        return es

    # --- density -----------------------------------------------------------------------------

    def forward(self, x: Tensor, y: Tensor | None = None, hidden: Iterable[Position] = (),
                label_drop: float = 0.0, drop: Tensor | None = None) -> FlowOutput:
        """x (B, C, H, W) -> z (B, C, H, W), logdet (B,), and the hidden states at the requested
        1-indexed (block, layer) positions, each (B, N, width) in raster token order.

        y: None (null label), (B,) int labels in [0, K), or (B, K) float class weights.
        label_drop: probability of replacing each label by the null label (training).
        drop: (B,) bool, the rows to give the null label (drawn with probability label_drop when None).
        """
        self.check_images(x)
        self.check_labels(y, x.shape[0])
        keep = self._positions(hidden)
        if y is None:
            drop = None
        elif drop is None and label_drop > 0:
            drop = torch.rand(x.shape[0], device=x.device) < label_drop
        x = self.patchify(x)
        inputs = [x]
        logdet = x.new_zeros(x.shape[0])
        states = {}
        for t, (block, e) in enumerate(zip(self.blocks, self.embeddings(y, drop)), start=1):
            x, ld, hs = block(x, e, keep.get(t, ()))
            inputs.append(x)
            logdet = logdet + ld
            states.update({(t, l): h for l, h in hs.items()})
        return FlowOutput(self.unpatchify(x), logdet, states, inputs, y, drop)

    @staticmethod
    def log_prob_of(out: FlowOutput) -> Tensor:
        """log p(x | y) in nats, (B,), of a forward's output: the standard Gaussian prior of z plus the logdet."""
        z = out.z.flatten(1)
        return -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi)) + out.logdet

    def log_prob(self, x: Tensor, y: Tensor | None = None, label_drop: float = 0.0) -> Tensor:
        """log p(x | y) in nats, (B,): standard Gaussian prior plus the log-determinant."""
        return self.log_prob_of(self(x, y, label_drop=label_drop))

    def nll(self, x: Tensor, y: Tensor | None = None, label_drop: float = 0.0) -> Tensor:
        """Negative log-likelihood per dimension in nats, (B,): the training loss. Inputs far outside [-1, 1]
        (|x| > 10: another scale, e.g. 0..255 pixels; a latent flow's unit-variance latents stay below) get a
        warning: their likelihood means nothing. (log_prob does not warn: the denoising step takes it of samples,
        which a weak model may put anywhere.)"""
        if self.validate_inputs and x.is_floating_point() and x.numel():
            top = float(x.detach().abs().max())
            if top > 10:  # NaN and inf are check_images's errors
                warnings.warn(f"x holds values up to {top:g}, far outside [-1, 1]: the model takes images as x = "
                              f"pixel / 127.5 - 1, so its likelihood of these is meaningless; rescale them",
                              RuntimeWarning, stacklevel=2)
        return -self.log_prob(x, y, label_drop) / self.cfg.num_dims

    def bits_per_dim(self, x: Tensor, y: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Bits per dimension of 8-bit images x (B, C, H, W) uint8 with uniform dequantization, (B,).

        The dequantized value v = x + u, u ~ U[0, 1), lies in [0, 256); it is mapped to [-1, 1) by
        v / 128 - 1, so the density on [0, 256) is the model's divided by 128 per dimension: the
        log(128) term. noise: (B, C, H, W) values in [0, 1) to use for u (drawn when None).
        """
        if x.dtype != torch.uint8:
            raise ValueError(f"bits_per_dim takes uint8 images (0..255), got {x.dtype}")
        dtype = next(self.parameters()).dtype
        u = torch.rand(x.shape, device=x.device, dtype=dtype) if noise is None else noise.to(dtype)
        v = (x.to(u.dtype) + u) / 128.0 - 1.0
        return (self.nll(v, y) + math.log(128.0)) / math.log(2.0)

    # --- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def reverse(self, z: Tensor, y: Tensor | None = None, guidance: float = 0.0, anneal: bool = False,
                attn_temp: float = 1.0, kv_cache: bool = True, sampler: str | Jacobi = "sequential",
                return_stats: bool = False) -> Tensor | tuple[Tensor, SampleStats]:
        """z (B, C, H, W) -> x (B, C, H, W): the blocks inverted in reverse order.

        guidance w: TARFlow guidance, (mu, alpha) <- (1 + w) cond - w uncond, where the unconditional
        branch uses the null label and attention temperature attn_temp (which also serves
        unconditional models); anneal ramps w linearly along the token index.
        sampler: "sequential" (one token per transformer pass, KV cache), "jacobi" (Jacobi() defaults) or a
        Jacobi with options. return_stats: also return the SampleStats (passes per block).
        For autograd through the reverse, call reverse_with_grad.
        """
        return self.reverse_with_grad(z, y, guidance, anneal, attn_temp, kv_cache, sampler, return_stats)

    def reverse_with_grad(self, z: Tensor, y: Tensor | None = None, guidance: float = 0.0, anneal: bool = False,
                          attn_temp: float = 1.0, kv_cache: bool = True, sampler: str | Jacobi = "sequential",
                          return_stats: bool = False) -> Tensor | tuple[Tensor, SampleStats]:
        """reverse, differentiable when autograd is enabled (N sequential steps per block)."""
        self.check_images(z, "z")
        self.check_labels(y, z.shape[0])
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        if attn_temp <= 0:
            raise ValueError(f"attn_temp must be > 0, got {attn_temp}")
        jacobi = as_sampler(sampler)
        x = self.patchify(z)
        N = x.shape[1]
        stats = SampleStats([], [], [])
        nulls = self.embeddings(None)
        steps = reversed(list(enumerate(zip(self.blocks, self.embeddings(y), nulls), start=1)))
        for g, (t, (block, e, e_null)) in enumerate(steps):
            sequential = jacobi is None or g < jacobi.sequential_blocks
            if sequential:
                # Sampling on the CPU stays float32 under bf16 autocast: one token per pass is too small a matrix
                # product for bf16 to be faster there, and its rounding accumulates along the tokens
                # (benchmarks/bench_precision.py; docs/DESIGN.md section 13). With autograd (naive R-REPA) it follows
                # the training's precision.
                exact = x.device.type == "cpu" and not torch.is_grad_enabled() and bf16_active(x.device)
                with float32(x.device) if exact else contextlib.nullcontext():
                    x = block.reverse(x, e, e_null, guidance, anneal, attn_temp, kv_cache)
                iters = [1] * (N - 1)
            else:
                args = (e, e_null, guidance, anneal, attn_temp)
                limits = (jacobi.chunk, jacobi.max_iters)
                z_t = x
                if jacobi.refine and bf16_active(x.device):  # bf16 to a coarse tolerance, then float32 from there
                    x, iters = block.reverse_jacobi(z_t, *args, max(jacobi.tol, jacobi.coarse_tol), *limits)
                    with float32(x.device):
                        x, more = block.reverse_jacobi(z_t, *args, jacobi.tol, *limits, x0=x)
                    iters = [a + b for a, b in zip(iters, more)]
                else:
                    x, iters = block.reverse_jacobi(z_t, *args, jacobi.tol, *limits)
            stats.blocks.append(t)
            stats.sequential.append(sequential)
            stats.iters.append(iters)
        x = self.unpatchify(x)
        return (x, stats) if return_stats else x

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, guidance: float = 0.0, anneal: bool = False,
               attn_temp: float = 1.0, denoise: bool = True, generator: torch.Generator | None = None,
               z: Tensor | None = None, sampler: str | Jacobi = "sequential",
               return_stats: bool = False) -> Tensor | tuple[Tensor, SampleStats]:
        """Draw n images (n, C, H, W): z ~ N(0, I) (or the given prior noise z, (n, C, H, W)), reverse with
        `sampler` (see reverse), then one score step to remove the training noise (when cfg.sigma > 0 and
        denoise is True). Values are not clipped. return_stats: also return the reverse's SampleStats.
        A sample on which the model or sampler diverges (NaN or inf) is returned as it is, undenoised, with a
        warning naming its row; `rrepa.utils.finite_rows(x)` selects the others."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n (the number of samples) must be an int >= 1, got {n!r}")
        if not math.isfinite(guidance) or not math.isfinite(attn_temp):
            raise ValueError(f"guidance and attn_temp must be finite numbers, got {guidance} and {attn_temp}")
        p = next(self.parameters())
        cfg = self.cfg
        shape = (n, cfg.in_channels, cfg.image_height, cfg.image_width)
        if z is None:
            z = torch.randn(shape, generator=generator, device=p.device, dtype=p.dtype)
        elif tuple(z.shape) != shape:
            raise ValueError(f"z must have shape (n, C, H, W) = {shape}, got {tuple(z.shape)}")
        x, stats = self.reverse(z, y, guidance, anneal, attn_temp, sampler=sampler, return_stats=True)
        ok = finite_rows(x)
        every = bool(ok.all())
        if not every:
            warnings.warn(f"{int((~ok).sum())} of {n} samples diverged (NaN or inf) and are returned as they are: "
                          f"rows {(~ok).nonzero().flatten().tolist()[:10]}", RuntimeWarning, stacklevel=3)
        if denoise and cfg.sigma > 0 and every:
            x = self.denoise(x, y, cfg.sigma)
        elif denoise and cfg.sigma > 0 and bool(ok.any()):  # the finite rows only: the others stay as they are
            rows = ok.nonzero().flatten()
            x = x.clone()
            x[rows] = self.denoise(x[rows], None if y is None else y[rows], cfg.sigma).to(x.dtype)
        return (x, stats) if return_stats else x

    def denoise(self, x: Tensor, y: Tensor | None = None, sigma: float | None = None) -> Tensor:
        """One score step (Tweedie): x + sigma^2 * grad_x log p(x | y), gradient through the whole flow.
        x: (B, C, H, W) -> (B, C, H, W), detached."""
        sigma = self.cfg.sigma if sigma is None else sigma
        # float32 even inside a bf16 region: the step adds sigma^2 * score to the image, so an error of the score
        # is an error of every pixel (docs/DESIGN.md section 13); it is one pass, next to the reverse's N.
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            x = x.detach().requires_grad_(True)
            (score,) = torch.autograd.grad(self.log_prob(x, y).sum(), x)
        return (x + sigma**2 * score).detach()

    # --- helpers -----------------------------------------------------------------------------

    def _positions(self, hidden: Iterable[Position]) -> dict[int, list[int]]:
        hidden = list(hidden)
        self.cfg.check_positions(hidden, "hidden position")
        keep: dict[int, list[int]] = {}
        for t, l in hidden:
            keep.setdefault(t, []).append(l)
        return keep

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
