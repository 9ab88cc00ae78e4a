"""Features for representation alignment along the forward, detached and reverse paths of a TARFlow.

See docs/DESIGN.md section 2. h(t, l) is the hidden state after layer l of block t (1-indexed),
returned in RASTER token order, (B, N, width). The three strategies give the same VALUES on a training
image (the flow is invertible) and differ only in the gradient graph:

    forward (F-REPA)  the ordinary forward pass; gradient reaches blocks 1..t-1 (through the input)
                      and block t's embeddings and layers <= l.
    detach  (D-REPA)  block t's transformer run on stop_gradient(x^(t-1)); block t's embeddings and
                      layers <= l only.
    reverse (R-REPA)  the generative path: z = stop_gradient(f(x)), blocks T..t inverted, then block t's
                      transformer run on its own reconstructed input x_rec^(t-1) up to layer l; gradient
                      reaches every parameter of blocks t..T (block t's proj_out through mu and alpha,
                      block t's layers > l likewise) and never blocks < t.

Three ways to compute the reverse path (all reconstruct the cached forward values):

    naive   the exact autoregressive inverse (FlowBlock.reverse under autograd, N - 1 sequential steps per
            block). Exact gradient, slow. The reference.
    pseudo  the paper's accelerated pseudo-reverse: per block s = T..t, (mu, alpha) from ONE parallel pass
            of block s's transformer on the detached cached input x_hat^(s-1); x_rec^(s-1) =
            x_rec^(s) * exp(alpha) + mu (block order). The gradient replaces (I - J)^-1 by I
            (J = d x_rec / d context, strictly lower triangular over tokens); exact when J = 0.
            Note the features are read from a SECOND pass of block t on x_rec^(t-1): reading them from
            the pass on the detached cache would give D-REPA's gradient exactly.
    jacobi  K Jacobi refinements x <- x_rec(x) kept in the graph, started at the cached value: the values
            never change, the gradient is the truncated Neumann series sum_{k<K} J^k, exact at K = N
            (J is nilpotent). K = 1 is the pseudo-reverse.

Under bf16 autocast pseudo and jacobi rerun the forward's own bf16 passes and reconstruct the cache exactly;
naive's one-token products round differently, so its sequential inverse drifts from the cache (by ~1e-2).

The reverse paths need the block inputs of the forward pass, which `TARFlow.forward` returns in
`FlowOutput.inputs` (no extra memory: autograd keeps these tensors anyway), with the labels and the
label-dropout mask it used; `aligned_features` reuses the training forward's output and falls back to a
no-grad re-run of the forward when given none (one extra forward of all T blocks). The class embeddings
are recomputed from (y, drop), so the alignment graph shares no node with the NLL graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rrepa.flow.blocks import FlowBlock
from rrepa.flow.config import FlowOutput, Position, as_positions
from rrepa.flow.tarflow import TARFlow

STRATEGIES = ("forward", "detach", "reverse")
REVERSE_METHODS = ("pseudo", "naive", "jacobi")


@dataclass
class ReverseResult:
    """Output of a reverse path."""

    features: dict[Position, Tensor]  # (t, l) -> h(t, l) (B, N, width), raster order, in the order asked
    recon: dict[int, Tensor]  # s -> x_rec^(s) (B, N, D), raster order, s = t_min - 1 .. T (recon[T] = z, detached)


# --------------------------------------------------------------------------------------------
# Forward and detached features
# --------------------------------------------------------------------------------------------


def forward_features(model: TARFlow, x: Tensor, y: Tensor | None, positions: Sequence[Position],
                     forward_out: FlowOutput | None = None, drop: Tensor | None = None) -> dict[Position, Tensor]:
    """F-REPA: the forward pass's hidden states, attached to the forward graph.

    Taken from forward_out.hidden when it holds every position (the training forward, no extra cost);
    otherwise the forward is run with gradients through blocks 1..max t, with labels y and label-dropout
    mask drop (forward_out.drop when it has one).
    """
    positions = as_positions(positions, "aligned positions")
    groups = _group(model, positions)
    hidden = getattr(forward_out, "hidden", None) or {}
    if all(p in hidden for p in positions):
        return {p: hidden[p] for p in positions}
    model.check_images(x)
    model.check_labels(y, x.shape[0])
    drop = getattr(forward_out, "drop", None) if drop is None else drop
    es = model.embeddings(y, drop)
    tok = model.patchify(x)
    feats: dict[Position, Tensor] = {}
    t_max = max(groups)
    for t in range(1, t_max + 1):
        block, e = model.blocks[t - 1], es[t - 1]
        if t == t_max:  # the last block needed runs only up to its deepest aligned layer
            hs = _block_features(block, tok, e, groups[t])
        else:
            tok, _, hs = block(tok, e, groups.get(t, ()))
        feats.update({(t, l): h for l, h in hs.items()})
    return {p: feats[p] for p in positions}


def detach_features(model: TARFlow, cache: FlowOutput, positions: Sequence[Position]) -> dict[Position, Tensor]:
    """D-REPA: block t's transformer run on stop_gradient(x^(t-1)) up to layer l."""
    positions = as_positions(positions, "aligned positions")
    feats: dict[Position, Tensor] = {}
    es = model.embeddings(cache.y, cache.drop)
    for t, layers in _group(model, positions).items():
        hs = _block_features(model.blocks[t - 1], cache.inputs[t - 1].detach(), es[t - 1], layers)
        feats.update({(t, l): h for l, h in hs.items()})
    return {p: feats[p] for p in positions}


# --------------------------------------------------------------------------------------------
# Reverse paths (R-REPA)
# --------------------------------------------------------------------------------------------


def naive_reverse(model: TARFlow, cache: FlowOutput, positions: Sequence[Position]) -> ReverseResult:
    """Exact autoregressive reverse of blocks T..t_min from z = stop_gradient(z), autograd through every
    sequential step (FlowBlock.reverse; its KV cache concatenates under autograd). The reference."""

    def step(block: FlowBlock, x_next: Tensor, cached: Tensor, e: Tensor | None) -> Tensor:
        return block.reverse(x_next, e)

    return _reverse_chain(model, cache, positions, step)


def pseudo_reverse(model: TARFlow, cache: FlowOutput, positions: Sequence[Position]) -> ReverseResult:
    """The paper's pseudo-reverse: one parallel pass per block on the detached cached input gives
    (mu, alpha); x_rec^(s-1) = x_rec^(s) * exp(alpha) + mu; aligned features from a second pass of block t
    on x_rec^(t-1). Equal to jacobi_reverse with one step."""
    return _reverse_chain(model, cache, positions, _jacobi_step(1))


def jacobi_reverse(model: TARFlow, cache: FlowOutput, positions: Sequence[Position],
                   steps: int | None = None) -> ReverseResult:
    """K = steps Jacobi refinements x <- x_rec^(s) * exp(alpha(x)) + mu(x) per block, started at the
    detached cached input and all kept in the graph. Values equal the cache; the gradient is
    sum_{k<K} J^k applied to the one-step gradient, exact at K = N (default, steps=None)."""
    steps = model.cfg.num_tokens if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"jacobi steps must be >= 1 (1 is the pseudo-reverse), got {steps}")
    return _reverse_chain(model, cache, positions, _jacobi_step(steps))


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def aligned_features(model: TARFlow, x: Tensor, y: Tensor | None, positions: Sequence[Position],
                     strategy: str = "reverse", reverse: str = "pseudo", jacobi_steps: int | None = None,
                     forward_out: FlowOutput | None = None, drop: Tensor | None = None) -> dict[Position, Tensor]:
    """h(t, l) (B, N, width), raster order, for each 1-indexed position, computed by `strategy`.

    x (B, C, H, W) clean (i.e. the training input), y labels as in TARFlow.forward.
    strategy: forward | detach | reverse; reverse: pseudo | naive | jacobi (jacobi_steps K, default N).
    forward_out: the training forward's output, reused when it carries what the strategy needs:
      a FlowOutput of TARFlow.forward on (x, y). Without one the detach and reverse strategies re-run the
      forward under no_grad (one extra forward of all T blocks).
    drop: (B,) bool label-dropout mask of the training forward (rows with the null label); taken from
      forward_out.drop when None. The reverse must use the forward's embeddings to reconstruct its values.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown alignment strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if reverse not in REVERSE_METHODS:
        raise ValueError(f"unknown reverse method {reverse!r}; choose one of {', '.join(REVERSE_METHODS)}")
    positions = as_positions(positions, "aligned positions")
    _group(model, positions)  # validates before any work
    if strategy == "forward":
        return forward_features(model, x, y, positions, forward_out, drop)
    cache = _as_cache(model, x, y, forward_out, drop)
    if strategy == "detach":
        return detach_features(model, cache, positions)
    if reverse == "naive":
        return naive_reverse(model, cache, positions).features
    if reverse == "jacobi":
        return jacobi_reverse(model, cache, positions, jacobi_steps).features
    return pseudo_reverse(model, cache, positions).features


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _as_cache(model: TARFlow, x: Tensor, y: Tensor | None, forward_out: FlowOutput | None,
              drop: Tensor | None) -> FlowOutput:
    """The forward output with block inputs to reconstruct from: forward_out, or a no-grad re-run."""
    if forward_out is not None and forward_out.inputs:
        if len(forward_out.inputs) != len(model.blocks) + 1:
            raise ValueError(f"forward_out.inputs must hold T + 1 = {len(model.blocks) + 1} block inputs, "
                             f"got {len(forward_out.inputs)}")
        if drop is not None and forward_out.drop is None:
            forward_out = replace(forward_out, drop=drop)
        return forward_out
    with torch.no_grad():
        return model(x, y, drop=drop)


def _jacobi_step(steps: int) -> Callable[[FlowBlock, Tensor, Tensor, Tensor | None], Tensor]:
    def step(block: FlowBlock, x_next: Tensor, cached: Tensor, e: Tensor | None) -> Tensor:
        zp = block.permute(x_next)  # x_rec^(s), carries the gradient of the blocks above
        xp = block.permute(cached.detach())  # x_hat^(s-1): autoregressive context, no gradient
        for _ in range(steps):
            mu, alpha, _ = block.mu_alpha(xp, e)
            xp = zp * torch.exp(alpha) + mu
        return block.permute(xp)

    return step


def _reverse_chain(model: TARFlow, cache: FlowOutput, positions: Sequence[Position],
                   step: Callable[[FlowBlock, Tensor, Tensor, Tensor | None], Tensor]) -> ReverseResult:
    """Blocks T..t_min inverted by `step`, features from a pass of each aligned block on its reconstruction."""
    positions = as_positions(positions, "aligned positions")
    groups = _group(model, positions)
    T = len(model.blocks)
    if len(cache.inputs) != T + 1:
        raise ValueError(f"the forward cache must hold T + 1 = {T + 1} block inputs, got {len(cache.inputs)}")
    x = cache.inputs[T].detach()  # z = stop_gradient(f(x))
    recon = {T: x}
    feats: dict[Position, Tensor] = {}
    es = model.embeddings(cache.y, cache.drop)
    for s in range(T, min(groups) - 1, -1):
        block, e = model.blocks[s - 1], es[s - 1]
        x = step(block, x, cache.inputs[s - 1], e)
        recon[s - 1] = x
        if s in groups:
            hs = _block_features(block, x, e, groups[s])
            feats.update({(s, l): h for l, h in hs.items()})
    return ReverseResult({p: feats[p] for p in positions}, recon)


def _block_features(block: FlowBlock, x: Tensor, e: Tensor | None, layers: Sequence[int]) -> dict[int, Tensor]:
    """Block's transformer on x (B, N, D) raster order, stopped at the deepest layer asked:
    {l: h (B, N, width) raster order}."""
    _, hs = block.transformer(block.permute(x), e, keep=layers, upto=max(layers))
    return {l: block.permute(hs[l]) for l in layers}


def _group(model: TARFlow, positions: Iterable[Position]) -> dict[int, list[int]]:
    """{block t: sorted layers}, validated against the model (1-indexed)."""
    positions = list(positions)
    model.cfg.check_positions(positions, "aligned position")
    groups: dict[int, list[int]] = {}
    for t, l in positions:
        groups.setdefault(int(t), []).append(int(l))
    return {t: sorted(set(ls)) for t, ls in sorted(groups.items())}
