"""Saving and loading flow weights (safetensors, with the FlowConfig in the metadata) and training checkpoints
(ckpt-*.pt in a run folder, plus the `last` pointer), with clear errors on a corrupt file or a mismatch.
Opening a trained model for use is rrepa.training.run.load_run.

Write errors come out as OSError naming the file the caller asked for (never a temporary name) with the
system's cause (errno, strerror), also where the writer is a library that reports them its own way
(PyTorch's "unexpected pos", safetensors' "os error N")."""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rrepa.flow.config import FlowConfig
from rrepa.flow.tarflow import TARFlow
from rrepa.utils import atomic_write, torch_save

CONFIG_KEY = "rrepa_flow_config"  # safetensors metadata key holding the FlowConfig as JSON


def save_weights(path: str | os.PathLike, model: TARFlow, metadata: Mapping[str, str] | None = None) -> None:
    """Export the flow's weights (only the flow: no optimiser, no projector) to a safetensors file,
    with its FlowConfig in the metadata."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: json.dumps(model.cfg.to_dict(), sort_keys=True), **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> TARFlow:
    """A TARFlow built from the config stored in a safetensors file written by save_weights."""
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
    model = TARFlow(FlowConfig.from_dict(json.loads(meta[CONFIG_KEY])))
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
LAST_POINTER = "last"  # text file naming the newest complete checkpoint, for people and outside tools
CKPT_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "config")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}.pt"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint's file name carries (the inverse of checkpoint_name): ckpt-0000300.pt -> 300."""
    return int(Path(path).stem.split("-")[1])


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest first (by step)."""
    return sorted(Path(run_dir).glob(CKPT_GLOB), key=lambda p: p.name)


def save_checkpoint(run_dir: str | os.PathLike, state: Mapping, keep_last: int = 0) -> Path:
    """Write state (a dict with at least CKPT_KEYS) as ckpt-{step}.pt atomically, point `last` at it,
    then delete all but the newest keep_last checkpoints (0 keeps all). The pointer moves only after
    the file is complete, so a crash at any moment leaves a loadable checkpoint behind."""
    run_dir = Path(run_dir)
    path = run_dir / checkpoint_name(int(state["step"]))
    try:
        atomic_write(path, lambda tmp: torch_save(dict(state), tmp))
    except OSError as err:
        raise CheckpointWriteError(path, err) from err
    pointer = run_dir / LAST_POINTER
    try:
        atomic_write(pointer, lambda tmp: Path(tmp).write_text(path.name + "\n"))
    except OSError as err:
        raise CheckpointWriteError(path, err, pointer=pointer) from err
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, read-only folder, ...). The message names the file that
    failed (the checkpoint, or the `last` pointer after a complete checkpoint), the cause, the newest checkpoint
    still intact (all are written atomically, so every ckpt-*.pt is whole) and what will work next: --resume
    when a checkpoint exists, else starting again with --overwrite."""

    def __init__(self, path: Path, err: OSError, pointer: Path | None = None):
        super().__init__(err.errno, err.strerror)
        older = [p for p in list_checkpoints(path.parent) if p != path]
        if path.is_file():  # written; only the `last` pointer failed
            older.append(path)
        fix = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
               errno.EROFS: "make the folder writable", errno.EACCES: "make the folder writable",
               errno.EPERM: "make it writable (check its permissions and attributes: chattr -i)"
               }.get(err.errno, "fix the cause")
        cause = err.strerror or err
        if pointer is not None:  # loading never reads the pointer: the checkpoint just written is the newest one
            self.message = (f"could not update the checkpoint pointer {pointer}: {cause}; nothing is lost: {path} "
                            f"is complete (the pointer names it for people and outside tools; --resume does not "
                            f"read it); {fix} and continue with --resume {path.parent}")
        elif older:
            self.message = (f"could not write checkpoint {path}: {cause}; nothing is lost: {older[-1]} (step "
                            f"{checkpoint_step(older[-1])}) is intact; {fix} and continue with --resume "
                            f"{path.parent}")
        else:  # nothing to resume from: --resume would fail with "no checkpoints"
            self.message = (f"could not write checkpoint {path}: {cause}; no earlier checkpoint exists, so "
                            f"there is nothing to resume; {fix} and start the run again with --overwrite (or "
                            f"another --out)")

    def __str__(self) -> str:
        return self.message


def describe_load_error(err: BaseException) -> str:
    """torch.load's error in a few words. PyTorch's advice to retry with weights_only=False is dropped: it
    never helps with a corrupt file and runs arbitrary code from a foreign one."""
    text = " ".join(str(err).split())
    if "weights_only" in text or "Weights only load failed" in text:
        detail = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed| Check the documentation|\. |$)", text)
        return ("a pickle of something other than tensors and plain values"
                + (f": {detail.group(1).strip()[:120]}" if detail else ""))
    text = text.split(". This is an internal miniz error")[0]
    return f"{type(err).__name__}: {text[:200]}"


class UnreadableFile(ValueError):
    """A weights or checkpoint file that exists but does not load (truncated, corrupt, or not tensors)."""

    def __init__(self, path: Path, how: str, detail: str):
        super().__init__(f"{path} could not be read as {how} ({detail}); it may be truncated or corrupt, or hold "
                         f"objects other than tensors")
        self.detail = detail


def read_file(path: str | os.PathLike) -> object:
    """What a weights file holds, on the CPU: safetensors for *.safetensors, else torch.load(weights_only=True)
    (tensors and plain values only: a pickle of anything else is refused, never run). The one reader of files
    for training checkpoints and foreign ones (rrepa convert); raises FileNotFoundError or UnreadableFile."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    safetensors = path.suffix == ".safetensors"
    try:
        if safetensors:
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle, EOF and Rust errors all mean "unreadable"
        how = "a safetensors file" if safetensors else "a PyTorch checkpoint with torch.load(weights_only=True)"
        raise UnreadableFile(path, how, describe_load_error(err)) from err


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint as a dict on the CPU; ValueError naming the file if it is corrupt."""
    try:
        state = read_file(path)
    except UnreadableFile as err:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({err.detail})") from err
    missing = [k for k in CKPT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not an rrepa training checkpoint (missing {', '.join(missing)})")
    return state


def load_latest_checkpoint(run_dir: str | os.PathLike, warn: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The newest checkpoint of a run that loads (by step); a corrupt file is reported through warn and the
    next older one is tried. The `last` pointer is not consulted: every ckpt-*.pt is renamed into place whole,
    and a kill between that rename and the pointer's update would otherwise lose a checkpoint interval."""
    run_dir = Path(run_dir)
    candidates = list_checkpoints(run_dir)[::-1]
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


def weights_step(path: str | os.PathLike) -> int | None:
    """The training step stored in an exported safetensors file's metadata (None when absent or unreadable)."""
    step = _metadata(path).get("step")
    return int(step) if step is not None else None


def weights_kind(path: str | os.PathLike) -> str | None:
    """Which weights an exported safetensors file holds, "ema" or "raw" (None when its metadata does not say)."""
    return _metadata(path).get("weights")


def _metadata(path: str | os.PathLike) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable metadata: load_weights reports it properly
        return {}
