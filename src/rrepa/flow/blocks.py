"""One block of TARFlow: a causal transformer (layers with an optional KV cache) that maps the tokens before i
to (mu_i, alpha_i), and the block's forward, sequential reverse and Jacobi reverse (docs/DESIGN.md section 1)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rrepa.flow.config import FlowConfig

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
        # With autograd on, recompute each layer in the backward instead of keeping its activations
        # (TARFlow.activation_checkpointing): memory per sample falls to each layer's input.
        self.checkpointing = False

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
        recompute = self.checkpointing and torch.is_grad_enabled()
        for l, layer in enumerate(self.layers, start=1):
            h = checkpoint(layer, h, q_scale, use_reentrant=False) if recompute else layer(h, q_scale)
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
