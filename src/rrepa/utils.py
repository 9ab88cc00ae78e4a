"""Helpers that every part of rrepa shares, one function per job: where the cache lives and whether the
network may be used; atomic file writes (also of npz archives); 8-bit images to and from the flow's [-1, 1]
scale; seeds and RNG states; interrupts deferred to a step boundary.

Nothing here imports another rrepa module, so any module may import it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import math
import os
import random
import re
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

CACHE_ENV = "RREPA_CACHE_DIR"  # moves the cache (datasets, embedded networks, feature caches, statistics)
OFFLINE_ENV = "RREPA_OFFLINE"  # 1: rrepa downloads nothing (HF_HUB_OFFLINE=1 means the same)
SEED_STRIDE = 1_000_003  # a prime: derive_seed(s, i) never collides for i < SEED_STRIDE


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where rrepa keeps what it downloads or trains once (datasets, the embedded encoder and evaluator,
    feature caches, reference statistics): $RREPA_CACHE_DIR, else $XDG_CACHE_HOME/rrepa, else ~/.cache/rrepa."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg, "rrepa") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "rrepa")
    return Path(base)


def is_offline() -> bool:
    """True when downloads are off: RREPA_OFFLINE or HF_HUB_OFFLINE is set to 1 / true / yes / on."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in (OFFLINE_ENV, "HF_HUB_OFFLINE"))


# --------------------------------------------------------------------------------------------
# Files: a write leaves the old content or the complete new one, never a part
# --------------------------------------------------------------------------------------------


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
        try:  # the mode an overwrite in place would keep, or a plain open() would give (mkstemp's is 0600)
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            publish_mode(tmp)
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


def publish_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a temporary file or folder (mkstemp's 0600, mkdtemp's 0700: private) the mode a plain open() or mkdir
    would have given it under the process's umask, before it is renamed into place: caches and run folders are
    shared on clusters."""
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A new empty folder next to `path` (same file system, so it can be renamed onto `path`), with the mode mkdir
    would give: where a folder is built before it is published whole."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    publish_mode(tmp, directory=True)
    return tmp


def naming(err: OSError, path: str | os.PathLike) -> OSError:
    """err as an OSError of the same kind (PermissionError, ...) whose filename is `path`. mkdir's "File exists"
    where a folder on the way to `path` is a regular file becomes "Not a directory", naming that file."""
    if err.errno is None:
        return err
    if err.errno == errno.EEXIST:
        blocking = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return OSError(errno.ENOTDIR, f"{os.strerror(errno.ENOTDIR)} (it is a file, so {path} cannot be "
                                          f"written under it)", str(blocking))
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


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """np.savez(path, **arrays), atomically (see atomic_write); the name is kept as given."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    atomic_write(path, write)
    return path


# --------------------------------------------------------------------------------------------
# Images: uint8 pixels <-> the flow's scale x = pixel / 127.5 - 1 in [-1, 1]
# --------------------------------------------------------------------------------------------


def from_uint8(u: Tensor) -> Tensor:
    """uint8 images (any shape) -> float32 in [-1, 1]: u / 127.5 - 1."""
    return u.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: Tensor, strict: bool = True) -> Tensor:
    """Images in [-1, 1] (any shape) -> uint8 (x + 1) * 127.5, rounded and clipped; uint8 input passes through.
    strict: NaN or inf is an error (a diverged model or sampler) rather than a wrong pixel; pictures of a
    training run in progress pass strict=False, so that a bad sample does not end the run."""
    if x.dtype == torch.uint8:
        return x
    if strict and not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf (a diverged model or sampler?)")
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def finite_rows(x: Tensor) -> Tensor:
    """(N,) bool: which of the N items of x (N, ...) hold only finite values (no NaN or inf)."""
    return torch.isfinite(x.flatten(1)).all(1)


def drop_diverged(x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None, str | None]:
    """Samples (N, ...) without the ones holding NaN or inf (a diverged model or sampler): (the finite samples,
    their labels, None) or, when some diverged, a one-line report of them by index and class as the third item."""
    bad = (~finite_rows(x)).nonzero().flatten()
    if not len(bad):
        return x, labels, None
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[bad] = False
    shown = [f"{int(i)}" + (f" (class {int(labels[i])})" if labels is not None else "") for i in bad[:10]]
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    report = (f"{len(bad)} of {x.shape[0]} samples diverged (NaN or inf) and were left out: sample "
              f"{', '.join(shown)}{more}; {int(keep.sum())} finite samples remain")
    return x[keep], None if labels is None else labels[keep], report


def check_nhwc_uint8(images: np.ndarray, what: str = "image arrays") -> np.ndarray:
    """A numpy image array in ADM's layout, (N, H, W, C) uint8 with C in {1, 3} ((N, H, W) grey gets C = 1);
    ValueError naming `what` otherwise."""
    if images.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must be (N, H, W, C) with C = 1 or 3 (ADM's layout), got {images.shape}")
    return images


def as_nchw_uint8(images) -> Tensor:
    """uint8 (N, C, H, W) tensor, C in {1, 3}, from a torch tensor (N, C, H, W) or (N, H, W), or a numpy
    array in ADM's layout (N, H, W, C) or (N, H, W)."""
    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(check_nhwc_uint8(images))).permute(0, 3, 1, 2)
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image tensors must be (N, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
    return images


# --------------------------------------------------------------------------------------------
# Seeds and RNG states
# --------------------------------------------------------------------------------------------


def derive_seed(seed: int, index: int) -> int:
    """The seed of stream `index` (a batch, an epoch, a step) of a run seeded with `seed`."""
    return seed * SEED_STRIDE + index


def generator(seed: int, index: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded with derive_seed(seed, index): noise that depends on (seed, index) only, not on
    the process count or on what else drew from the global RNG."""
    return torch.Generator(device).manual_seed(derive_seed(seed, index))


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """What runs inside may draw from the global RNGs without changing what the training loop draws next: a run
    then does not depend on whether an evaluation ran, or on whether its reference statistics were cached."""
    state = rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global state that data code may draw from
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 - see seed_everything
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(s: dict, cuda: bool = True) -> None:
    """Set this process's RNGs to a state of rng_state() (also as loaded back from a checkpoint)."""
    torch.set_rng_state(s["torch"])
    random.setstate(_as_tuple(s["python"]))
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    if "cuda" in s and cuda:
        torch.cuda.set_rng_state(s["cuda"])


def _as_tuple(x):
    """random.setstate wants the tuples that a checkpoint may have turned into lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x



# --------------------------------------------------------------------------------------------
# Learning-rate schedule (the flow's, and the embedded networks' trainings)
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, schedule: str = "cosine",
              cooldown: float = 0.2) -> float:
    """Linear warm-up over `warmup` steps, then to min_ratio at step `total`: by a cosine (schedule "cosine"), or
    constant until the last `cooldown` share of the steps and linear from there (schedule "wsd")."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "wsd":
        start = max(warmup, total - round(cooldown * total))
        return 1.0 - (1 - min_ratio) * min(1.0, max(0, step - start) / max(1, total - start))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(optim, steps: int) -> Callable[[int], float]:
    """step -> lr_factor under an OptimConfig's warm-up, schedule and cool-down, for a run of `steps` steps."""
    return partial(lr_factor, warmup=optim.warmup_steps, total=steps, min_ratio=optim.min_lr_ratio,
                   schedule=optim.schedule, cooldown=optim.cooldown_fraction)


# --------------------------------------------------------------------------------------------
# Interrupts: SIGINT / SIGTERM stop a long job at a step boundary
# --------------------------------------------------------------------------------------------


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
        self.at = 0.0  # time.monotonic() of the first signal

    def __bool__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def deferred_interrupts(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                        same_press: float = 2.0) -> Iterator[InterruptFlag]:
    """Turn SIGINT / SIGTERM into a flag that a loop checks between steps, so that it stops in a consistent
    state (a KeyboardInterrupt raised inside an optimiser step would leave a half-updated model). A second
    SIGINT raises KeyboardInterrupt at once, for a user who cannot wait for the step to end, unless it comes
    within `same_press` seconds of the first: Ctrl-C in a terminal reaches a whole process group, so a child of
    `rrepa experiment run` gets it from the terminal and again from the runner, which forwards it; that pair is one
    press, and the step still ends with its checkpoint. Outside the main thread (where signal handlers cannot be
    set) the flag is never set."""
    flag = InterruptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if not flag.armed:
            raise KeyboardInterrupt
        if flag.signum is not None:
            if signum == signal.SIGINT and time.monotonic() - flag.at > same_press:
                raise KeyboardInterrupt
            return
        flag.signum, flag.at = signum, time.monotonic()

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------
# Folders: one writer at a time
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


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`, waited for: processes that would build the same file (DDP ranks on one
    host) take turns. Not atomic_write's job, which keeps a reader from seeing a half-written file but lets two
    writers both do the work; not run_lock's, which refuses a second writer instead of waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Modules: the weights' hash
# --------------------------------------------------------------------------------------------


def state_fingerprint(module: nn.Module, extra: str = "") -> str:
    """sha256 of the module's state dict (names, dtypes, shapes, bytes, in key order) and `extra`."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(extra.encode())
    return h.hexdigest()
