"""Saving and loading flow weights: atomic writes, safetensors export, clear errors on mismatch."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from rrepa.flow import FlowConfig, TARFlow

CONFIG_KEY = "rrepa_flow_config"  # safetensors metadata key holding the FlowConfig as JSON


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file so that `path` holds either its old content or the complete new one, never a part:
    write(tmp) fills a temporary file in the same folder, which is synced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def config_to_json(cfg: FlowConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


def config_from_dict(d: Mapping) -> FlowConfig:
    known = {f.name for f in fields(FlowConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"incompatible flow config: unknown keys {unknown}; was it written by a newer rrepa?")
    return FlowConfig(**d)


def save_weights(path: str | os.PathLike, model: TARFlow, metadata: Mapping[str, str] | None = None) -> None:
    """Export the flow's weights (only the flow: no optimiser, no projector) to a safetensors file,
    with its FlowConfig in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: config_to_json(model.cfg), **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> TARFlow:
    """A TARFlow built from the config stored in a safetensors file written by save_weights."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; train a model with `rrepa train` "
                                f"or convert one with `rrepa convert`")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt") from err
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path} has no rrepa flow config in its metadata; it was not written by rrepa")
    model = TARFlow(config_from_dict(json.loads(meta[CONFIG_KEY])))
    load_state_checked(model, state, source=str(path))
    return model.to(device)


def load_state_checked(model: nn.Module, state: Mapping[str, Tensor], source: str = "state dict") -> None:
    """load_state_dict with a one-line error naming the first missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{source} does not match this model: missing keys {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected keys {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{source} does not match this model: {k} has shape {tuple(state[k].shape)}, "
                             f"expected {tuple(v.shape)}; build the model with the checkpoint's config")
    model.load_state_dict(state)
