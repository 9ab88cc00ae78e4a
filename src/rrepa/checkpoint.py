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


def load_state_checked(model: nn.Module, state: Mapping[str, Tensor], source: str = "state dict",
                       hint: str = "build the model with the checkpoint's config") -> None:
    """load_state_dict with a one-line error naming the first missing, unexpected or mis-shaped key,
    ending with `hint` (how to fix it)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{source} does not match this model: missing keys {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected keys {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''}; {hint}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{source} does not match this model: {k} has shape {tuple(state[k].shape)}, "
                             f"expected {tuple(v.shape)}; {hint}")
    model.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# Training checkpoints: ckpt-{step:07d}.pt in a run folder, plus a `last` pointer file
# --------------------------------------------------------------------------------------------

CKPT_GLOB = "ckpt-*.pt"
LAST_POINTER = "last"  # text file naming the newest complete checkpoint
CKPT_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "config")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest first (by step)."""
    return sorted(Path(run_dir).glob(CKPT_GLOB), key=lambda p: p.name)


def save_checkpoint(run_dir: str | os.PathLike, state: Mapping, keep_last: int = 0) -> Path:
    """Write state (a dict with at least CKPT_KEYS) as ckpt-{step}.pt atomically, point `last` at it,
    then delete all but the newest keep_last checkpoints (0 keeps all). The pointer moves only after
    the file is complete, so a crash at any moment leaves a loadable checkpoint behind."""
    run_dir = Path(run_dir)
    path = run_dir / checkpoint_name(int(state["step"]))
    atomic_write(path, lambda tmp: torch.save(dict(state), tmp))
    atomic_write(run_dir / LAST_POINTER, lambda tmp: Path(tmp).write_text(path.name + "\n"))
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint as a dict on the CPU; ValueError naming the file if it is corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors all mean "unreadable"
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]})") from err
    missing = [k for k in CKPT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not an rrepa training checkpoint (missing {', '.join(missing)})")
    return state


def load_latest_checkpoint(run_dir: str | os.PathLike, warn: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The newest checkpoint of a run that loads. The `last` pointer is tried first; a corrupt file is
    reported through warn and the next older one is tried."""
    run_dir = Path(run_dir)
    candidates = list_checkpoints(run_dir)[::-1]
    pointer = run_dir / LAST_POINTER
    if pointer.is_file():
        named = run_dir / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    if not candidates:
        raise FileNotFoundError(f"no checkpoints ({CKPT_GLOB}) in {run_dir}; is it a run folder of `rrepa train`?")
    errors = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except ValueError as err:
            errors.append(str(err))
            warn(f"warning: {err}; trying an older checkpoint")
            continue
        return path, state
    raise ValueError(f"no loadable checkpoint in {run_dir}: {'; '.join(errors)}")


def resolve_checkpoint(path: str | os.PathLike, warn: Callable[[str], None] = print) -> tuple[Path, dict]:
    """A run folder (its newest loadable checkpoint) or a checkpoint file -> (file, state)."""
    path = Path(path)
    if path.is_dir():
        return load_latest_checkpoint(path, warn)
    return path, load_checkpoint(path)


def load_flow(path: str | os.PathLike, weights: str = "ema", device: str | torch.device = "cpu",
              warn: Callable[[str], None] = print) -> tuple[TARFlow, dict]:
    """A TARFlow from a run folder, a training checkpoint (.pt; weights "ema" or "raw") or exported
    weights (.safetensors). A run folder gives its exported ema.safetensors / model.safetensors when they
    are at least as new as its newest checkpoint (the same weights, a smaller file), else that checkpoint.
    Returns the model in eval mode and {"file", "step", "config"}: config is the run config as a dict (for
    a safetensors file, {"model": ...} plus the sections of a config.yaml beside it; step from its metadata)."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    path = Path(path)
    if path.is_dir():
        exported = path / ("ema.safetensors" if weights == "ema" else "model.safetensors")
        ckpts = list_checkpoints(path)
        newest = int(ckpts[-1].stem.split("-")[1]) if ckpts else None
        if exported.is_file() and (newest is None or (weights_step(exported) or -1) >= newest):
            path = exported
        elif not ckpts:
            raise FileNotFoundError(f"{path} holds neither {exported.name} nor {CKPT_GLOB} files; "
                                    f"is it a run folder of `rrepa train`?")
    if path.suffix == ".safetensors":
        model = load_weights(path, device)
        config = {"model": asdict(model.cfg)}
        if (path.parent / "config.yaml").is_file():
            import yaml

            stored = yaml.safe_load((path.parent / "config.yaml").read_text()) or {}
            config = {**stored, **config}
        return model.eval(), {"file": str(path), "step": weights_step(path), "config": config}
    file, state = resolve_checkpoint(path, warn)
    model = TARFlow(config_from_dict(state["config"]["model"]))
    load_state_checked(model, state["ema" if weights == "ema" else "model"], source=str(file))
    return model.to(device).eval(), {"file": str(file), "step": int(state["step"]), "config": state["config"]}


def weights_step(path: str | os.PathLike) -> int | None:
    """The training step stored in an exported safetensors file's metadata (None when absent or unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
        return int(step) if step is not None else None
    except Exception:  # noqa: BLE001 - unreadable metadata: load_weights reports it properly
        return None
