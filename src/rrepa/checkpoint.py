"""Saving and loading flow weights: atomic writes, safetensors export, clear errors on mismatch; and what
keeps a run folder consistent: its lock (`run_lock`) and interrupts deferred to a step boundary
(`deferred_interrupts`, `Interrupted`).

Write errors come out as OSError naming the file the caller asked for (never a temporary name) with the
system's cause (errno, strerror), also where the writer is a library that reports them its own way
(PyTorch's "unexpected pos", safetensors' "os error N")."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise naming(err, path) from err
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise naming(err, path) from err
        code = _errno_in_message(err)
        if code is not None:
            raise OSError(code, os.strerror(code), str(path)) from err
        raise


def naming(err: OSError, path: str | os.PathLike) -> OSError:
    """err as an OSError of the same kind (PermissionError, ...) whose filename is `path`."""
    if err.errno is None:
        return err
    return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))


def _errno_in_message(err: BaseException) -> int | None:
    """The errno that a library folded into its message: safetensors (Rust) says "(os error 28)"."""
    m = re.search(r"os error (\d+)", str(err))
    return int(m.group(1)) if m else None


class _RecordingWriter:
    """A file for torch.save that remembers the first OSError: PyTorch's zip writer replaces it by
    "unexpected pos A vs B", which names neither the file nor the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save(obj, path), raising the OSError of a failed write (ENOSPC, EFBIG, EIO, ...) itself."""
    with open(path, "wb") as f:
        w = _RecordingWriter(f)
        try:
            torch.save(obj, w)
        except OSError:
            raise
        except Exception:
            if w.error is not None:
                raise w.error from None
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
    try:
        atomic_write(path, lambda tmp: torch_save(dict(state), tmp))
        atomic_write(run_dir / LAST_POINTER, lambda tmp: Path(tmp).write_text(path.name + "\n"))
    except OSError as err:
        raise CheckpointWriteError(path, err) from err
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, read-only folder, ...). The message names the file, the
    cause and the newest checkpoint still intact (all are written atomically, so every ckpt-*.pt is whole)."""

    def __init__(self, path: Path, err: OSError):
        super().__init__(err.errno, err.strerror)
        older = [p for p in list_checkpoints(path.parent) if p != path]
        if path.is_file():  # written; only the `last` pointer failed
            older.append(path)
        kept = (f"nothing is lost: {older[-1]} (step {int(older[-1].stem.split('-')[1])}) is intact" if older
                else "no earlier checkpoint exists")
        fix = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
               errno.EROFS: "make the folder writable", errno.EACCES: "make the folder writable"}
        self.message = (f"could not write checkpoint {path}: {err.strerror or err}; {kept}; "
                        f"{fix.get(err.errno, 'fix the cause')} and continue with --resume {path.parent}")

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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint as a dict on the CPU; ValueError naming the file if it is corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors all mean "unreadable"
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({describe_load_error(err)})") from err
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


# --------------------------------------------------------------------------------------------
# Run folders: one writer at a time; interrupts at a step boundary
# --------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"


class RunInUseError(ValueError):
    """Another live process holds the run folder's lock."""


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, warn: Callable[[str], None] = print, name: str = LOCK_FILE) -> Iterator[Path]:
    """Hold the exclusive lock of a run folder: `RUN/.lock`, flock'ed, holding "PID@HOST". A second holder
    is refused at once with RunInUseError naming the first one's PID. The kernel drops a flock when its
    process dies, so a lock file left by a killed process is stale: it is taken over (and reported through
    warn). Creates the folder when needed; on leaving removes the lock file, and the folder too when this
    call created it and nothing was written into it. Any tool writing into a run folder may use it:

        with run_lock("runs/x"):
            ...  # the only writer of runs/x
    """
    import fcntl

    run_dir = Path(run_dir)
    path = run_dir / name  # another name: a second, independent lock on the same folder
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                pid = holder.split("@")[0]
                raise RunInUseError(f"{run_dir} is in use by process {pid} (lock file {path}: {holder}); wait for it "
                                    f"to finish, stop it, or use another folder (--out)") from None
            # The holder before us may have removed the file after we opened it: then ours is not the lock.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
    except OSError as err:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise naming(err, path) from err
    try:
        stale = os.read(fd, 200).decode(errors="replace").strip()
        if stale:
            warn(f"note: {path} was left by process {stale}, which no longer holds it (killed?); taking it over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty: a run that could not start leaves nothing behind


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a long job at a consistent point, after saving what it could. The message
    is the one line for the user; exit_code is 128 + the signal's number (130 for Ctrl-C)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.message, self.signum = message, int(signum)
        self.exit_code = 128 + int(signum)

    def __str__(self) -> str:
        return self.message


class InterruptFlag:
    """Set by deferred_interrupts' handler: the signal's number once one has arrived, else None. While
    `armed` is False a signal raises KeyboardInterrupt at once, as without the handler."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = True

    def __bool__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def deferred_interrupts(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[InterruptFlag]:
    """Turn SIGINT / SIGTERM into a flag that a loop checks between steps, so that it stops in a consistent
    state (a KeyboardInterrupt raised inside an optimiser step would leave a half-updated model). A second
    SIGINT raises KeyboardInterrupt at once, for a user who cannot wait for the step to end. Outside the
    main thread (where signal handlers cannot be set) the flag is never set."""
    flag = InterruptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if not flag.armed or (flag.signum is not None and signum == signal.SIGINT):
            raise KeyboardInterrupt
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
