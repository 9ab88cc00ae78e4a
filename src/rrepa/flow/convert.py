"""Convert apple/ml-tarflow checkpoints (and apple/ml-starflow ones in the same layout) to rrepa's TARFlow layout.

`convert_state_dict` maps their state dict to ours (and infers the FlowConfig from the tensors);
`convert_file` reads their checkpoint and writes rrepa's safetensors weights (`rrepa convert`).

Their conventions and ours (T blocks, L_t layers in block t, N tokens of dimension D = C p^2, width W):

- Layers per block: read from each block's `attn_blocks.{l}` keys. ml-tarflow gives every block the same count;
  STARFlow's deep-shallow models give each block its own (e.g. [2, 2, 2, 2, 2, 18], the deep block last). Equal
  counts give FlowConfig.layers_per_block an int, different ones a tuple. STARFlow's RoPE (no pos_embed), SOS
  token, final norm, text conditioning and self-denoiser have no counterpart in rrepa's TARFlow: a checkpoint with
  any of them is refused with a list of them. Options that leave no trace in the weights cannot be checked and
  must be STARFlow's defaults: use_softplus and soft_clip off, seq_order R2L (L2R swaps identity and flip in every
  block).

- Keys. Theirs: `blocks.{t}.proj_in`, `.pos_embed`, `.class_embed`, `.attn_blocks.{l}.attention.norm`,
  `.attention.qkv`, `.attention.proj`, `.mlp.norm`, `.mlp.main.0`, `.mlp.main.2`, `.proj_out`,
  `.attn_mask`, and the model's `var`. Ours: `blocks.{t}.proj_in`, `.pos_embed`, `.class_embed`,
  `.layers.{l}.attn_norm`, `.qkv`, `.attn_out`, `.mlp_norm`, `.fc1`, `.fc2`, `.proj_out`.
  Their causal `attn_mask` buffer is dropped (ours is implicit).
- class_embed: theirs (K, 1, W), ours (K, W). Both use the mean embedding as the null label (their
  y < 0 or y = None; our y = None or uniform class weights).
- proj_out: theirs splits its 2D outputs as (log-scale, shift), ours as (mu, alpha) = (shift,
  log-scale): the two halves are swapped. Without `nvp` theirs has D outputs, a shift only; ours then
  gets zero log-scale rows, so the block is volume preserving as theirs. Their proj_out bias is not
  zeroed at initialisation (ours is), which only matters for training from scratch.
- pos_embed: both are indexed by raster position and flipped along the token axis in odd blocks, so
  the table is copied as it is.
- Patchify (`F.unfold`, raster order over patches, channel-major inside a token), the permutations
  (identity for even 0-indexed blocks, flip for odd), pre-norm layers with exact GELU, no final norm,
  the attention scale head_dim^-0.5, the one-token shift and z = (x - shift) * exp(-log_scale) are the
  same on both sides, so the converted model computes the same z.
- Log-determinant: their blocks return -mean(log_scale) over the N x D values of a token sequence and
  their loss is 0.5 mean(z^2) - mean(logdet), without the 0.5 log(2 pi) constant; ours is the sum
  -sum(log_scale) over all C H W dimensions. Ours = (sum of their per-block values) * N * D.
- Prior: their `var` buffer (N, D) scales z by sqrt(var) when sampling (it never enters their loss);
  rrepa samples z ~ N(0, I). Likelihoods are unaffected; a non-trivial var draws a warning.
- Not stored in their weights, so given by the caller: the image channels C (D = C p^2 fixes p), the
  attention head dimension (splitting W into heads leaves the weights' shapes unchanged) and the
  training noise sigma. Only square images exist in their code: H = W = p sqrt(N).
- Checkpoints may be a raw state dict or a dict wrapping it (see `WRAPPER_KEYS`, searched in that
  order, so EMA weights win when a file holds both), with `module.` (DDP) or `_orig_mod.`
  (torch.compile) prefixes. Weights keep their dtype in `convert_state_dict`; `convert_file` writes
  float32.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rrepa.flow.checkpoint import CKPT_KEYS, load_state_checked, read_file, save_weights
from rrepa.flow.config import FlowConfig
from rrepa.flow.tarflow import TARFlow

# Keys under which training scripts commonly wrap a state dict, searched in this order.
WRAPPER_KEYS = ("ema", "ema_model", "model_ema", "state_dict", "model", "module", "net")

# Their per-layer keys (after `blocks.{t}.attn_blocks.{l}.`) -> ours (after `blocks.{t}.layers.{l}.`).
_LAYER_KEYS = {
    "attention.norm": "attn_norm",
    "attention.qkv": "qkv",
    "attention.proj": "attn_out",
    "mlp.norm": "mlp_norm",
    "mlp.main.0": "fc1",
    "mlp.main.2": "fc2",
}

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_LAYER_KEY = re.compile(r"attn_blocks\.(\d+)\.(.+)")


# --------------------------------------------------------------------------------------------
# Reading their state dict
# --------------------------------------------------------------------------------------------


def _strip(key: str) -> str:
    """Drop DDP (`module.`) prefixes and torch.compile (`_orig_mod.`) segments from a key."""
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _looks_like_state_dict(obj: Mapping) -> bool:
    return any(isinstance(k, str) and _strip(k).startswith("blocks.") for k in obj)


def unwrap_state_dict(obj: object, _depth: int = 0) -> dict[str, Tensor]:
    """Their state dict from a raw or wrapped checkpoint, with prefixes stripped from the keys."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"the checkpoint holds a {type(obj).__name__}, not a state dict")
    if not _looks_like_state_dict(obj):
        for name in WRAPPER_KEYS:
            if isinstance(obj.get(name), Mapping) and _depth < 4:
                return unwrap_state_dict(obj[name], _depth + 1)
        keys = ", ".join(map(str, list(obj)[:8])) + (", ..." if len(obj) > 8 else "")
        raise ValueError(f"no ml-tarflow state dict found in the checkpoint (no `blocks.*` keys, and none of "
                         f"{', '.join(WRAPPER_KEYS)}); its top-level keys are: {keys}")
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        name = _strip(str(key))
        if not isinstance(value, Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        if name in state:
            raise ValueError(f"checkpoint key {key!r} duplicates {name!r} once the module./_orig_mod. "
                             f"prefixes are stripped")
        state[name] = value
    return state


def _shape_of(state: Mapping[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"missing key {key} in the ml-tarflow checkpoint")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"{key} has shape {shape}; expected {ndim} dimensions")
    return shape


def _isqrt_exact(n: int) -> int | None:
    r = math.isqrt(n)
    return r if r * r == n else None


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def convert_state_dict(theirs: Mapping[str, Tensor], in_channels: int = 3, head_dim: int = 64,
                       sigma: float = 0.05) -> tuple[FlowConfig, dict[str, Tensor]]:
    """An apple/ml-tarflow state dict (raw or wrapped, prefixes allowed) -> (FlowConfig, our state dict).

    Patch size, image size, width, blocks, layers, MLP ratio and classes are inferred from the
    tensors; in_channels, head_dim and sigma are not stored in their weights. Raises a one-line
    ValueError on an inconsistent, incomplete or unknown checkpoint.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    state = unwrap_state_dict(theirs)

    # --- architecture from the tensors --------------------------------------------------------
    _refuse_starflow_features(state)
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = _BLOCK_KEY.fullmatch(key)
        if m:
            layers = blocks.setdefault(int(m.group(1)), set())
            lm = _LAYER_KEY.fullmatch(m.group(2))
            if lm:
                layers.add(int(lm.group(1)))
    if not blocks:
        raise ValueError("the checkpoint has no blocks.* keys; is it an apple/ml-tarflow checkpoint?")
    T = max(blocks) + 1
    empty = [t for t in range(T) if t not in blocks]
    if empty:
        raise ValueError(f"block {empty[0]} has no weights (no blocks.{empty[0]}.* keys): STARFlow's identity blocks "
                         f"(0 layers) have none, and every rrepa block has at least one layer")
    # Block t's layers 0..max: a gap in between is reported below as a missing key.
    counts = [max(blocks[t], default=-1) + 1 for t in range(T)]
    if min(counts) == 0:
        t = counts.index(0)
        raise ValueError(f"missing key blocks.{t}.attn_blocks.0.attention.qkv.weight: block {t} of the checkpoint has "
                         f"no transformer layers")
    L: int | tuple[int, ...] = counts[0] if len(set(counts)) == 1 else tuple(counts)

    width, D = _shape_of(state, "blocks.0.proj_in.weight", 2)
    N = _shape_of(state, "blocks.0.pos_embed", 2)[0]
    hidden = _shape_of(state, "blocks.0.attn_blocks.0.mlp.main.0.weight", 2)[0]
    tables = [key for key in state if _BLOCK_KEY.fullmatch(key) and key.endswith(".class_embed")]
    conditional = bool(tables)  # a block without a table then counts as a missing key
    K = _shape_of(state, min(tables), 3)[0] if conditional else 0

    p = _isqrt_exact(D // in_channels) if D % in_channels == 0 else None
    if p is None:
        raise ValueError(f"token dimension {D} (blocks.0.proj_in.weight) is not in_channels * patch_size^2 "
                         f"for in_channels = {in_channels}; pass the checkpoint's channel count with "
                         f"--in-channels (3 for pixels, 4 for SD-VAE latents)")
    side = _isqrt_exact(N)
    if side is None:
        raise ValueError(f"blocks.0.pos_embed has {N} positions, not a square grid of patches; "
                         f"ml-tarflow checkpoints are for square images")
    if hidden % width:
        raise ValueError(f"MLP width {hidden} (blocks.0.attn_blocks.0.mlp.main.0.weight) is not a multiple "
                         f"of the model width {width}")
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}; pass the checkpoint's "
                         f"attention head dimension with --head-dim")
    cfg = FlowConfig(in_channels=in_channels, image_height=side * p, image_width=side * p, patch_size=p,
                     width=width, num_blocks=T, layers_per_block=L, head_dim=head_dim,
                     mlp_ratio=hidden // width, num_classes=K, sigma=sigma)

    # --- every expected key, its shape, and where it goes ---------------------------------------
    expected: dict[str, tuple[int, ...]] = {}
    optional = {"var": (N, D)}
    nvp: dict[int, bool] = {}
    for t in range(T):
        b = f"blocks.{t}."
        out_dim = _shape_of(state, b + "proj_out.weight", 2)[0]
        if out_dim not in (D, 2 * D):
            raise ValueError(f"{b}proj_out.weight has {out_dim} outputs; expected {2 * D} (nvp) or {D} "
                             f"(shift only) for token dimension {D}")
        nvp[t] = out_dim == 2 * D
        expected.update({
            b + "proj_in.weight": (width, D), b + "proj_in.bias": (width,), b + "pos_embed": (N, width),
            b + "proj_out.weight": (out_dim, width), b + "proj_out.bias": (out_dim,),
        })
        if conditional:
            expected[b + "class_embed"] = (K, 1, width)
        optional[b + "attn_mask"] = (N, N)
        for l in range(counts[t]):
            a = f"{b}attn_blocks.{l}."
            for name, (rows, cols) in {"attention.norm": (width, 0), "attention.qkv": (3 * width, width),
                                       "attention.proj": (width, width), "mlp.norm": (width, 0),
                                       "mlp.main.0": (hidden, width), "mlp.main.2": (width, hidden)}.items():
                expected[a + name + ".weight"] = (rows, cols) if cols else (rows,)
                expected[a + name + ".bias"] = (rows,)
    for key in state:
        if key not in expected and key not in optional:
            layout = f"{T} blocks of {L} layers" if isinstance(L, int) else f"{T} blocks of {list(L)} layers"
            raise ValueError(f"unknown key {key} in the ml-tarflow checkpoint (expected {layout}"
                             f"{', class-conditional' if conditional else ', unconditional'})")
    for key, shape in {**expected, **optional}.items():
        if key not in state:
            if key in optional:
                continue
            raise ValueError(f"missing key {key} in the ml-tarflow checkpoint")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(state[key].shape)}, expected {shape}")

    if "var" in state:
        var = state["var"].detach().double()
        if not bool(((var - 1).abs() <= 1e-3).all()):
            warnings.warn("the checkpoint's prior variance `var` is not all ones: ml-tarflow scales z by "
                          "sqrt(var) when sampling, while rrepa samples z ~ N(0, I), so samples differ; "
                          "likelihoods are unaffected", UserWarning, stacklevel=2)

    # --- the mapping ----------------------------------------------------------------------------
    ours: dict[str, Tensor] = {}
    for t in range(T):
        b = f"blocks.{t}."
        ours[b + "proj_in.weight"] = state[b + "proj_in.weight"]
        ours[b + "proj_in.bias"] = state[b + "proj_in.bias"]
        ours[b + "pos_embed"] = state[b + "pos_embed"]
        if conditional:
            ours[b + "class_embed"] = state[b + "class_embed"].reshape(K, width)
        for l in range(counts[t]):
            for their_name, our_name in _LAYER_KEYS.items():
                for kind in ("weight", "bias"):
                    ours[f"{b}layers.{l}.{our_name}.{kind}"] = state[f"{b}attn_blocks.{l}.{their_name}.{kind}"]
        w, bias = state[b + "proj_out.weight"], state[b + "proj_out.bias"]
        if nvp[t]:  # theirs: (log-scale, shift); ours: (mu, alpha)
            w = torch.cat([w[D:], w[:D]])
            bias = torch.cat([bias[D:], bias[:D]])
        else:  # a shift only: zero log-scale
            w = torch.cat([w, torch.zeros_like(w)])
            bias = torch.cat([bias, torch.zeros_like(bias)])
        ours[b + "proj_out.weight"] = w
        ours[b + "proj_out.bias"] = bias
    ours = {k: v.detach().contiguous() for k, v in ours.items()}
    return cfg, ours


# STARFlow parts rrepa's TARFlow lacks: (pattern on a key, what it is).
_STARFLOW_ONLY = (
    (re.compile(r"blocks\.\d+\.sos_embed"), "a start-of-sequence token (sos_embed)"),
    (re.compile(r"blocks\.\d+\.final_norm\..+"), "a final norm (final_norm)"),
    (re.compile(r"blocks\.\d+\.proj_txt\..+"), "text conditioning (proj_txt)"),
    (re.compile(r"learnable_self_denoiser\..+"), "a learned self-denoiser (learnable_self_denoiser)"),
)


def _refuse_starflow_features(state: Mapping[str, Tensor]) -> None:
    """ValueError listing the STARFlow features of a checkpoint that rrepa's TARFlow cannot represent."""
    found = [what for pattern, what in _STARFLOW_ONLY if any(pattern.fullmatch(k) for k in state)]
    has_layers = any(_LAYER_KEY.fullmatch(m.group(2)) for m in map(_BLOCK_KEY.fullmatch, state) if m)
    if has_layers and not any(_BLOCK_KEY.fullmatch(k) and k.endswith(".pos_embed") for k in state):
        found.append("rotary position embeddings (no pos_embed in any block)")
    if found:
        raise ValueError(f"the checkpoint uses STARFlow features rrepa's TARFlow does not have: {'; '.join(found)}; "
                         f"only checkpoints in ml-tarflow's layout (learned pos_embed, no SOS token, final norm or "
                         f"text encoder) convert")


def already_ours(obj: object, src: str | os.PathLike) -> None:
    """ValueError when `obj` (a loaded checkpoint) was written by rrepa: nothing to convert."""
    if isinstance(obj, Mapping) and all(k in obj for k in CKPT_KEYS):
        raise ValueError(f"{src} is already an rrepa training checkpoint (from `rrepa train`); use it as it is, e.g. "
                         f"`rrepa sample --ckpt {src}`, no conversion needed")
    state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if isinstance(state, Mapping) and any(isinstance(k, str) and re.match(r"(module\.)?blocks\.\d+\.layers\.", k)
                                          for k in state):
        use = ("pass it to --ckpt as it is" if Path(src).suffix == ".safetensors" else
               "load it into rrepa.TARFlow with load_state_dict")
        raise ValueError(f"{src} already holds rrepa-layout weights (blocks.*.layers.*), no conversion needed; {use}")


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, in_channels: int = 3, head_dim: int = 64,
                 sigma: float = 0.05) -> FlowConfig:
    """Convert an apple/ml-tarflow checkpoint file to rrepa's safetensors weights (float32, written
    atomically, with the FlowConfig in the metadata). Returns the inferred FlowConfig."""
    obj = read_file(src)
    already_ours(obj, src)
    cfg, state = convert_state_dict(obj, in_channels=in_channels, head_dim=head_dim, sigma=sigma)
    model = TARFlow(cfg)
    load_state_checked(model, state, source=f"converted {src}")
    save_weights(dst, model, metadata={"converted_from": "apple/ml-tarflow", "source_file": Path(src).name})
    return cfg
