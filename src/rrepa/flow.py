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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from rrepa.jacobi import Jacobi, SampleStats, as_sampler
from rrepa.precision import bf16_active, float32
from rrepa.utils import finite_rows

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


# --------------------------------------------------------------------------------------------
# Transformer layer with an optional KV cache
# --------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of one attention layer during autoregressive inversion.

    Without autograd the cache is preallocated and written in place (no copies per step); with
    autograd it grows by concatenation, because in-place writes would invalidate saved tensors.
    """

    def __init__(self, length: int):
        self.length = length
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.n = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v: (B, heads, n, head_dim) -> all keys and values so far, (B, heads, n_total, head_dim)."""
        n = k.shape[2]
        if torch.is_grad_enabled():
            self.k = k if self.k is None else torch.cat([self.k[:, :, : self.n], k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v[:, :, : self.n], v], dim=2)
        else:
            if self.k is None or self.k.shape[2] < self.length or self.k.dtype != k.dtype:
                shape = (*k.shape[:2], self.length, k.shape[3])
                k_buf, v_buf = k.new_empty(shape), v.new_empty(shape)
                if self.k is not None:
                    k_buf[:, :, : self.n] = self.k[:, :, : self.n]
                    v_buf[:, :, : self.n] = self.v[:, :, : self.n]
                self.k, self.v = k_buf, v_buf
            self.k[:, :, self.n : self.n + n] = k
            self.v[:, :, self.n : self.n + n] = v
        self.n += n
        return self.k[:, :, : self.n], self.v[:, :, : self.n]

    def rewind(self, n: int) -> None:
        """Forget every position from n on (a Jacobi iteration recomputes its chunk from the same prefix)."""
        if not 0 <= n <= self.n:
            raise ValueError(f"can rewind the cache to 0..{self.n} positions, got {n}")
        self.n = n


class Layer(nn.Module):
    """Pre-norm transformer layer: causal self-attention, then a GELU MLP, both residual."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: int):
        super().__init__()
        self.heads = width // head_dim
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, h: Tensor, q_scale: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """h: (B, n, width) -> (B, n, width).

        q_scale: (B, 1, 1, 1) multiplies the queries, i.e. an attention temperature 1 / q_scale per row.
        cache: when given, h holds the next n tokens and attends to everything cached so far and causally
        among themselves (n = 1 in sequential sampling, a chunk of tokens in Jacobi sampling); otherwise
        attention is causal over h.
        """
        B, n, width = h.shape
        q, k, v = self.qkv(self.attn_norm(h)).view(B, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if q_scale is not None:
            q = q * q_scale.to(q.dtype)
        attention = contextlib.nullcontext()
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # Under bf16 autocast on the CPU, attention runs in float32 (autocast would cast it back to bfloat16):
            # PyTorch's CPU attention kernels are ~3x slower in bfloat16 than in float32 (forward + backward;
            # benchmarks/bench_precision.py), and at these sequence lengths attention is a small share of a step's
            # FLOPs. The projections around it stay bfloat16.
            q, k, v = q.float(), k.float(), v.float()
            attention = torch.autocast("cpu", enabled=False)
        if cache is None:
            with attention:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start = cache.n
            k, v = cache.append(k, v)
            # Query j sits at position start + j: it sees every cached key and the chunk's keys up to itself.
            mask = None if n == 1 else torch.ones(n, start + n, dtype=torch.bool, device=h.device).tril(start)
            with attention:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.attn_out(a.transpose(1, 2).reshape(B, n, width))
        return h + self.fc2(F.gelu(self.fc1(self.mlp_norm(h))))


# --------------------------------------------------------------------------------------------
# One flow block
# --------------------------------------------------------------------------------------------


class FlowBlock(nn.Module):
    """One autoregressive affine flow over the (permuted) token sequence."""

    def __init__(self, cfg: FlowConfig, flip: bool, num_layers: int):
        """A block of `num_layers` transformer layers (cfg.layers(t) for block t) with cfg's widths."""
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"a flow block needs at least 1 transformer layer, got {num_layers}")
        N, D, width = cfg.num_tokens, cfg.token_dim, cfg.width
        self.flip = flip
        self.proj_in = nn.Linear(D, width)
        self.pos_embed = nn.Parameter(torch.randn(N, width) * 0.01)  # indexed by raster position
        self.class_embed = nn.Parameter(torch.randn(cfg.num_classes, width) * 0.01) if cfg.num_classes else None
        self.layers = nn.ModuleList(Layer(width, cfg.head_dim, cfg.mlp_ratio) for _ in range(num_layers))
        self.proj_out = nn.Linear(width, 2 * D)  # -> (mu, alpha)
        # A fresh block is the identity: training starts from z = x.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def permute(self, x: Tensor) -> Tensor:
        """Identity or flip of the token axis (-2: tokens (B, N, *) and the pos_embed table (N, width));
        the flip is its own inverse."""
        return x.flip(-2) if self.flip else x

    def embedding(self, y: Tensor | None) -> Tensor | None:
        """Class embedding added to every token.

        y: None (the null label: the mean embedding), (B,) int labels, or (B, K) float weights w
        (the embedding is w^T E; uniform weights give the null label). Returns (B, width), (width,)
        or None for an unconditional block.
        """
        if self.class_embed is None:
            return None
        if y is None:
            return self.class_embed.mean(0)
        if y.is_floating_point():
            return y.to(self.class_embed.dtype) @ self.class_embed
        return self.class_embed[y]

    def transformer(self, x: Tensor, e: Tensor | None, keep: Iterable[int] = (),
                    q_scale: Tensor | None = None, upto: int | None = None) -> tuple[Tensor, dict[int, Tensor]]:
        """Run the causal transformer on permuted tokens.

        x: (B, N, D) tokens in this block's order; e: class embedding (B, width) or (width,).
        Returns the unshifted proj_out output (B, N, 2D) (None when stopped early at layer `upto`)
        and the hidden states {l: (B, N, width)} after the layers in `keep`, in this block's order.
        """
        h = self.proj_in(x) + self.permute(self.pos_embed)
        if e is not None:
            h = h + (e[:, None] if e.dim() == 2 else e)
        keep = set(keep)
        hidden = {}
        for l, layer in enumerate(self.layers, start=1):
            h = layer(h, q_scale)
            if l in keep:
                hidden[l] = h
            if l == upto:
                return None, hidden
        return self.proj_out(h), hidden

    def mu_alpha(self, x: Tensor, e: Tensor | None, keep: Iterable[int] = (),
                 q_scale: Tensor | None = None) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """(mu, alpha) of every token given the preceding ones: x (B, N, D) in this block's order
        -> mu, alpha (B, N, D) in x's dtype, and the kept hidden states."""
        out, hidden = self.transformer(x, e, keep, q_scale)
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1).to(x.dtype)
        mu, alpha = out.chunk(2, dim=-1)
        return mu, alpha, hidden

    def forward(self, x: Tensor, e: Tensor | None,
                keep: Iterable[int] = ()) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """x: (B, N, D) raster order -> z (B, N, D) raster order, logdet (B,), {l: h (B, N, width) raster}."""
        xp = self.permute(x)
        mu, alpha, hidden = self.mu_alpha(xp, e, keep)
        z = (xp - mu) * torch.exp(-alpha)
        return self.permute(z), -alpha.sum(dim=(1, 2)), {l: self.permute(h) for l, h in hidden.items()}

    def reverse(self, z: Tensor, e: Tensor | None, e_null: Tensor | None = None, guidance: float = 0.0,
                anneal: bool = False, attn_temp: float = 1.0, kv_cache: bool = True) -> Tensor:
        """Invert the block: z (B, N, D) raster order -> x (B, N, D) raster order.

        Sequential over tokens: x_i = z_i * exp(alpha_i(x_<i)) + mu_i(x_<i).
        Guidance (w = guidance > 0): a second, unconditional branch with embedding e_null and attention
        temperature attn_temp runs in the same batch, and
        (mu, alpha) <- (1 + w_i) * conditional - w_i * unconditional, with w_i = w * (i + 1) / (N - 1)
        for token i + 1 when annealed, w_i = w otherwise.
        kv_cache=False recomputes the whole prefix at every step (the reference the cache is tested against).
        """
        B, N, _ = z.shape
        zp = self.permute(z)
        guided = guidance != 0
        e, q_scale = self._branches(z, e, e_null, guided, attn_temp)
        xs = [zp[:, 0]]  # token 0 has (mu, alpha) = (0, 0)
        caches = [KVCache(N) for _ in self.layers] if kv_cache else None
        pos = self.permute(self.pos_embed)
        for i in range(N - 1):
            if kv_cache:
                tok = xs[i][:, None]
                h = self.proj_in(torch.cat([tok, tok]) if guided else tok) + pos[i]
                if e is not None:
                    h = h + (e[:, None] if e.dim() == 2 else e)
                for layer, cache in zip(self.layers, caches):
                    h = layer(h, q_scale, cache)
                out = self.proj_out(h)[:, 0]
            else:
                prefix = torch.stack(xs, dim=1)
                if guided:
                    prefix = torch.cat([prefix, prefix])
                out = self._prefix_out(prefix, e, q_scale, pos)
            w = guidance * (i + 1) / (N - 1) if anneal else guidance
            mu, alpha = _guided_mu_alpha(out.to(z.dtype), B, w if guided else None)
            xs.append(zp[:, i + 1] * torch.exp(alpha) + mu)
        return self.permute(torch.stack(xs, dim=1))

    def reverse_jacobi(self, z: Tensor, e: Tensor | None, e_null: Tensor | None = None, guidance: float = 0.0,
                       anneal: bool = False, attn_temp: float = 1.0, tol: float = 0.0, chunk: int | None = None,
                       max_iters: int | None = None, x0: Tensor | None = None) -> tuple[Tensor, list[int]]:
        """Invert the block by Jacobi iterations: z (B, N, D) raster order -> x (B, N, D) raster order, and the
        iterations each chunk took.

        The input positions 0..N-2 (this block's order) are cut into chunks of `chunk` (None: one chunk of all
        N - 1). Chunk [s, s + c) produces tokens s + 1..s + c. Starting from x = z on those tokens, an iteration
        runs the transformer once over the chunk, attending to the finished prefix held in the KV cache, and
        sets x_i = z_i exp(alpha_i(x_<i)) + mu_i(x_<i) for all c tokens at once: Jacobi inside a chunk,
        Gauss-Seidel across chunks. Iteration k makes the chunk's first k tokens exact (the system is strictly
        triangular), so c iterations give the sequential solution and are never exceeded. A chunk stops
        earlier when max |dx| over the chunk and the batch drops below tol (tol = 0: never), or after
        max_iters. Guidance, its annealing and attn_temp are those of `reverse`, token by token.
        x0: (B, N, D) raster order, the starting point of the iterations (None: z), e.g. a bf16 solution that float32
        iterations refine; the bound of c iterations holds from any start.
        """
        B, N, _ = z.shape
        zp = self.permute(z)
        start = zp if x0 is None else self.permute(x0.to(z.dtype))
        guided = guidance != 0
        e, q_scale = self._branches(z, e, e_null, guided, attn_temp)
        caches = [KVCache(N) for _ in self.layers]
        pos = self.permute(self.pos_embed)
        size = N - 1 if chunk is None else chunk
        done = [zp[:, :1]]  # finished tokens, in chunks; token 0 has (mu, alpha) = (0, 0)
        iters = []
        for s in range(0, N - 1, size):
            c = min(size, N - 1 - s)
            cap = c if max_iters is None else min(c, max_iters)
            w = None
            if guided:  # token s + 1 + j gets w * (s + 1 + j) / (N - 1) when annealed, as in `reverse`
                w = guidance * torch.arange(s + 1, s + c + 1, dtype=z.dtype, device=z.device)[:, None] / (N - 1) \
                    if anneal else guidance
            z_c = zp[:, s + 1 : s + c + 1]
            x = start[:, s + 1 : s + c + 1]
            for k in range(1, cap + 1):
                for cache in caches:
                    cache.rewind(s)
                tokens = torch.cat([done[-1][:, -1:], x[:, :-1]], dim=1)  # inputs at positions s..s+c-1
                h = self.proj_in(torch.cat([tokens, tokens]) if guided else tokens) + pos[s : s + c]
                if e is not None:
                    h = h + (e[:, None] if e.dim() == 2 else e)
                for layer, cache in zip(self.layers, caches):
                    h = layer(h, q_scale, cache)
                mu, alpha = _guided_mu_alpha(self.proj_out(h).to(z.dtype), B, w)
                x_next = z_c * torch.exp(alpha) + mu
                # The keys and values cached for the next chunks are this iteration's inputs: with tol > 0 they
                # lag x_next by less than tol; at the cap they are exact.
                stop = k == cap or (tol > 0 and float((x_next - x).abs().max()) < tol)
                x = x_next
                if stop:
                    break
            done.append(x)
            iters.append(k)
        return self.permute(torch.cat(done, dim=1)), iters

    def _branches(self, z: Tensor, e: Tensor | None, e_null: Tensor | None, guided: bool,
                  attn_temp: float) -> tuple[Tensor | None, Tensor | None]:
        """Class embedding and query scale of the rows the reverse runs: z's B rows, or, guided, B conditional
        rows then B unconditional ones (embedding e_null, attention temperature attn_temp)."""
        if not guided:
            return e, None
        B = z.shape[0]
        q_scale = None
        if attn_temp != 1.0:
            q_scale = torch.cat([z.new_ones(B), z.new_full((B,), 1.0 / attn_temp)]).view(2 * B, 1, 1, 1)
        return _stack_branches(e, e_null, B), q_scale

    def _prefix_out(self, prefix: Tensor, e: Tensor | None, q_scale: Tensor | None, pos: Tensor) -> Tensor:
        """proj_out at the last position of a causal pass over the whole prefix (B, i + 1, D)."""
        n = prefix.shape[1]
        h = self.proj_in(prefix) + pos[:n]
        if e is not None:
            h = h + (e[:, None] if e.dim() == 2 else e)
        for layer in self.layers:
            h = layer(h, q_scale)
        return self.proj_out(h[:, -1])


def _guided_mu_alpha(out: Tensor, B: int, w: float | Tensor | None) -> tuple[Tensor, Tensor]:
    """proj_out's output (rows, ..., 2D) -> mu, alpha (B, ..., D). Unguided (w None) the rows are the B samples;
    guided they are B conditional then B unconditional rows, combined as (1 + w) cond - w uncond, where w is
    a float or a tensor that broadcasts over the token axis."""
    mu, alpha = out.chunk(2, dim=-1)
    if w is None:
        return mu, alpha
    return (1 + w) * mu[:B] - w * mu[B:], (1 + w) * alpha[:B] - w * alpha[B:]


def _stack_branches(e: Tensor | None, e_null: Tensor | None, B: int) -> Tensor | None:
    """Conditional and unconditional embeddings for a batch of 2B rows: (2B, width) or None."""
    if e is None:
        return None
    e = e.expand(B, -1) if e.dim() == 1 else e
    e_null = e if e_null is None else e_null
    return torch.cat([e, e_null.expand(B, -1) if e_null.dim() == 1 else e_null])


# --------------------------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------------------------


class TARFlow(nn.Module, PyTorchModelHubMixin, library_name="rrepa", tags=["normalizing-flow", "tarflow"]):
    """Transformer autoregressive flow over images (B, C, H, W) in [-1, 1].

    Shared like any hub model (huggingface_hub's PyTorchModelHubMixin): `model.save_pretrained(dir)` writes
    config.json (the FlowConfig) and model.safetensors; `TARFlow.from_pretrained(dir_or_hub_id)` reads them back.
    Every command that takes --ckpt takes such a folder or hub id too (rrepa.run.load_run)."""

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
                                 f"config.json); open it with rrepa.run.load_run({text!r}), or make one with "
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
