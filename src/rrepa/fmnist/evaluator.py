"""The embedded evaluator: a small Fashion-MNIST CNN classifier that rrepa trained itself and ships.

It is the offline default feature network of ``rrepa evaluate`` (``--features fmnist``): no pretrained
weights can be downloaded here, and Inception-v3 features of 28 x 28 grey images say little anyway.
It is a supervised classifier, separate from any alignment encoder.

Network (``FMNISTCNN``): three 3 x 3 conv-BN-ReLU stages (32, 64, 128 channels; 2 x 2 max-pool after
each: 28 -> 14 -> 7 -> 3), flatten (1152), ``fc1`` Linear 1152 -> 128 + ReLU, dropout, ``fc2`` Linear
128 -> 10. The 128-d output of ``fc1`` (after the ReLU) is the penultimate feature used for FID,
precision and recall; the softmax of ``fc2`` gives the Inception Score and the class accuracy of
conditional samples (is a sample drawn for label k classified as k?).

Inputs are uint8 images, (N, C, H, W) tensors or (N, H, W, C) arrays (ADM's layout; see
``rrepa.utils.as_nchw_uint8``). RGB is converted to grey (ITU-R 601 luma), other sizes are resized to 28 x 28
(bilinear, antialiased), then pixels are scaled to [0, 1] and standardised with the Fashion-MNIST
training mean and std.

Training (``train_evaluator``): Adam with a one-cycle learning rate, batch 128, 3 epochs of the 60k
training images with random horizontal flips, seeded. The weights go to
``$RREPA_CACHE_DIR/evaluator/fmnist-cnn.safetensors`` (else ``$XDG_CACHE_HOME/rrepa/...``, else
``~/.cache/rrepa/...``), written atomically, with the test accuracy, training time and settings in the
file's metadata (``rrepa evaluator train``). ``load_evaluator()`` loads the copy rrepa ships
(rrepa.fmnist.shipped, ``fmnist-cnn@a46eda2ff3``) and never trains; a retrained file is used when given
(``--evaluator-weights``, ``train.eval_weights``). The training shows a progress bar (rate, ETA) and keeps its
exact state in ``fmnist-cnn.safetensors.partial.pt`` beside the weights (every 100 steps, and on Ctrl-C /
SIGTERM), so an interrupted training continues where it stopped and still gives the same weights, hence the
same name.

The evaluator's name, ``fmnist-cnn@<hash>``, carries the first 10 hex digits of a SHA-256 over its
weights (tensor names, shapes and bytes), so numbers and cached reference statistics from differently
trained evaluators are never mixed up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from rrepa.data.datasets import DataConfig, build_dataset
from rrepa.fmnist.dataset import find_fashion_mnist, load_fashion_mnist
from rrepa.fmnist.shipped import resolve_weights, shipped
from rrepa.precision import float32
from rrepa.utils import Interrupted, as_nchw_uint8, atomic_write, cache_dir, deferred_interrupts, run_lock, torch_save

logger = logging.getLogger(__name__)

EVALUATOR_NAME = "fmnist-cnn"
EVALUATOR_FILE = "fmnist-cnn.safetensors"
ARCH = "fmnist-cnn-v1"
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
NUM_CLASSES = 10
FEATURE_DIM = 128


def default_evaluator_path() -> Path:
    """Where `rrepa evaluator train` writes a retrained evaluator: <cache>/evaluator/fmnist-cnn.safetensors (the
    default evaluator is the shipped one, rrepa.fmnist.shipped)."""
    return cache_dir() / "evaluator" / EVALUATOR_FILE


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


class FMNISTCNN(nn.Module):
    """conv(32)-pool-conv(64)-pool-conv(128)-pool-fc(128)-fc(10); see the module docstring."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.body = nn.Sequential(stage(1, 32), stage(32, 64), stage(64, 128))
        self.fc1 = nn.Linear(128 * 3 * 3, FEATURE_DIM)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Standardised (B, 1, 28, 28) float images -> (B, 128) penultimate features."""
        return F.relu(self.fc1(self.body(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.features(x)))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)
        return h, self.fc2(h)


def preprocess(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> standardised float32 (B, 1, 28, 28): RGB to grey, resize, scale."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    x = images.to(torch.float32) / 255.0
    if x.shape[1] == 3:
        x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    elif x.shape[1] != 1:
        raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]}")
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return (x - FMNIST_MEAN) / FMNIST_STD


def weights_hash(state: dict[str, Tensor]) -> str:
    """First 10 hex digits of SHA-256 over the tensors (sorted names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:10]


# --------------------------------------------------------------------------------------------
# The evaluator as a feature network (rrepa.eval.samples)
# --------------------------------------------------------------------------------------------


@dataclass
class FMNISTEvaluator:
    """A trained FMNISTCNN as a feature network: ``extract(images)`` -> pool (N, 128), probs (N, 10)."""

    model: FMNISTCNN
    info: dict = field(default_factory=dict)
    device: torch.device | str = "cpu"
    batch_size: int = 500

    has_spatial = False
    num_classes = NUM_CLASSES
    feature_dim = FEATURE_DIM

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.model = self.model.to(self.device).eval()
        self.hash = weights_hash(self.model.state_dict())
        self.name = f"fmnist-cnn@{self.hash}"

    @property
    def test_accuracy(self) -> float | None:
        acc = self.info.get("test_accuracy")
        return None if acc is None else float(acc)

    @torch.no_grad()
    def extract(self, images, batch_size: int | None = None,
                progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """Features of uint8 images ((N, C, H, W) tensor or (N, H, W, C) array): {"pool": (N, 128)
        float32, "probs": (N, 10) float64}."""
        x = as_nchw_uint8(images)
        bs = batch_size or self.batch_size
        pools, probs = [], []
        for lo in range(0, x.shape[0], bs):
            xb = preprocess(x[lo:lo + bs]).to(self.device)
            with float32(self.device):  # the instrument stays fixed under a bf16 run: FIDs compare across precisions
                h, logits = self.model.features_and_logits(xb)
            pools.append(h.float().cpu())
            probs.append(torch.softmax(logits.double(), dim=1).cpu())
            if progress is not None:
                progress(xb.shape[0])
        if not pools:
            return {"pool": np.zeros((0, FEATURE_DIM), np.float32), "probs": np.zeros((0, NUM_CLASSES))}
        return {"pool": torch.cat(pools).numpy(), "probs": torch.cat(probs).numpy()}

    @torch.no_grad()
    def predict(self, images, batch_size: int | None = None) -> np.ndarray:
        """Predicted class (N,) int64 of uint8 images."""
        return self.extract(images, batch_size)["probs"].argmax(1)


# --------------------------------------------------------------------------------------------
# Training, saving, loading
# --------------------------------------------------------------------------------------------


def _load_split(split: str, data_dir: str | None, data: DataConfig | None = None) -> tuple[Tensor, Tensor]:
    """uint8 images (N, 1, S, S) and labels (N,) of Fashion-MNIST, or of the variant `data` names (fmnist-clutter)."""
    if data is None or data.name == "fmnist":
        return load_fashion_mnist(find_fashion_mnist(data_dir), split)
    ds = build_dataset(replace(data, path=data_dir or data.path), split)
    return ds.images, ds.targets


@torch.no_grad()
def accuracy(model: FMNISTCNN, images: Tensor, labels: Tensor, batch_size: int = 1000,
             device: torch.device | str = "cpu") -> float:
    """Fraction of uint8 (N, 1, 28, 28) images classified as their label."""
    was_training = model.training
    model.eval()
    correct = 0
    for lo in range(0, images.shape[0], batch_size):
        logits = model(preprocess(images[lo:lo + batch_size]).to(device))
        correct += int((logits.argmax(1).cpu() == labels[lo:lo + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, images.shape[0])


def partial_path(path: str | os.PathLike) -> Path:
    """Where the training of the evaluator destined for `path` keeps its progress until it is done."""
    path = Path(path)
    return path.with_name(path.name + ".partial.pt")


def train_evaluator(epochs: int = 3, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                    max_train: int | None = None, max_test: int | None = None, data_dir: str | None = None,
                    data: DataConfig | None = None, device: str | torch.device = "cpu",
                    log: Callable[[str], None] | None = None, state_file: str | os.PathLike | None = None,
                    save_every: int = 100, progress: bool = False) -> tuple[FMNISTCNN, dict]:
    """Train FMNISTCNN on Fashion-MNIST (the first ``max_train`` training images, all by default) and
    measure its accuracy on the test split (the first ``max_test`` images). data: a variant instead (fmnist-clutter;
    its canvases are resized to 28 px like every input). Returns (model, info) with
    info = {test_accuracy, train_seconds, epochs, train_images, test_images, ...}.

    state_file: the training saves its exact state there every ``save_every`` steps and when SIGINT or SIGTERM
    stops it (it then raises rrepa.utils.Interrupted); a later call with the same settings continues from
    that state and ends with the weights an uninterrupted run gives. progress: a tqdm bar over the steps."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    log = log or logger.info
    device = torch.device(device)
    x_train, y_train = _load_split("train", data_dir, data)
    x_test, y_test = _load_split("test", data_dir, data)
    if max_train is not None:
        x_train, y_train = x_train[:max_train], y_train[:max_train]
    if max_test is not None:
        x_test, y_test = x_test[:max_test], y_test[:max_test]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FMNISTCNN().to(device)
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    total_steps = epochs * steps_per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.2)
    settings = {"arch": ARCH, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                "train_images": int(x_train.shape[0]),
                **({"data": asdict(data)} if data is not None and data.name != "fmnist" else {})}
    step, spent, perm, total, seen = 0, 0.0, None, 0.0, 0
    state_file = Path(state_file) if state_file is not None else None
    if state_file is not None and state_file.is_file():
        try:
            st = torch.load(state_file, map_location="cpu", weights_only=True)
            usable = st.get("settings") == settings
        except Exception as err:  # noqa: BLE001 - a damaged progress file only costs the time it saved
            log(f"warning: ignoring the evaluator's unreadable progress file {state_file} ({type(err).__name__})")
            usable = False
        else:
            if not usable:
                log(f"note: {state_file} is from other settings; training the evaluator from the start")
        if usable:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            g.set_state(st["generator"])
            torch.set_rng_state(st["torch_rng"])
            step, spent, perm, total, seen = st["step"], st["seconds"], st["perm"], st["loss_sum"], st["seen"]
            log(f"continuing the evaluator's training from step {step} of {total_steps} ({state_file})")

    def save_state() -> None:
        state = {"settings": settings, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "generator": g.get_state(), "torch_rng": torch.get_rng_state(),
                 "step": step, "seconds": spent + time.perf_counter() - start, "perm": perm, "loss_sum": total,
                 "seen": seen}
        atomic_write(state_file, lambda tmp: torch_save(state, tmp))

    start = time.perf_counter()
    model.train()
    interrupts = deferred_interrupts() if state_file is not None else contextlib.nullcontext(None)
    with interrupts as stop, tqdm(total=total_steps, initial=step, desc="training the evaluator", unit="step",
                                  disable=not progress, dynamic_ncols=True) as bar:
        say = tqdm.write if progress else log
        while step < total_steps:
            epoch, b = divmod(step, steps_per_epoch)
            if b == 0:  # the same draws from g, in the same order, as an uninterrupted run
                perm = torch.randperm(x_train.shape[0], generator=g)
                total, seen = 0.0, 0
            idx = perm[b * batch_size:(b + 1) * batch_size]
            xb = preprocess(x_train[idx])
            flip = torch.rand(xb.shape[0], generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb).to(device)
            loss = F.cross_entropy(model(xb), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
            seen += idx.numel()
            step += 1
            bar.update(1)
            if step % steps_per_epoch == 0:
                say(f"evaluator epoch {epoch + 1}/{epochs}: train loss {total / max(1, seen):.4f} "
                    f"({spent + time.perf_counter() - start:.0f} s)")
            if state_file is not None and step < total_steps and (stop or step % save_every == 0):
                save_state()
            if stop:
                raise Interrupted(f"interrupted the evaluator's training at step {step} of {total_steps}; its "
                                  f"progress is saved in {state_file}: run the same command again to continue",
                                  stop.signum)
    train_seconds = spent + time.perf_counter() - start
    model.eval()
    acc = accuracy(model, x_test, y_test, device=device)
    info = {"arch": ARCH, "test_accuracy": acc, "train_seconds": round(train_seconds, 1), "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "seed": seed, "train_images": int(x_train.shape[0]),
            "test_images": int(x_test.shape[0]), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "data": settings.get("data", {"name": "fmnist"})}
    log(f"evaluator test accuracy {acc:.4f} on {x_test.shape[0]} images, trained in {train_seconds:.0f} s")
    return model.cpu(), info


def train_and_save_evaluator(path: str | os.PathLike, log: Callable[[str], None] | None = None,
                             **train_kwargs) -> Path:
    """train_evaluator with its progress kept beside `path` (so an interrupted training continues), a progress
    bar, and the folder locked against a second process training into it; then save_evaluator(path)."""
    path = Path(path)
    with run_lock(path.parent, warn=log or logger.warning):
        train_kwargs.setdefault("progress", True)
        model, info = train_evaluator(log=log, state_file=partial_path(path), **train_kwargs)
        save_evaluator(model, info, path)
        partial_path(path).unlink(missing_ok=True)
    return path


def save_evaluator(model: FMNISTCNN, info: dict, path: str | os.PathLike) -> Path:
    """Write the weights as safetensors (atomically), with ``info`` as JSON in the metadata."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"rrepa_evaluator": json.dumps(info, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return path


def load_evaluator_file(path: str | os.PathLike, device: str | torch.device = "cpu",
                        batch_size: int = 500) -> FMNISTEvaluator:
    """Load weights written by save_evaluator."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluator weights {path} not found (train them with `rrepa evaluator train`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise ValueError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}") from e
    info = json.loads(meta.get("rrepa_evaluator", "{}"))
    if info.get("arch", ARCH) != ARCH:
        raise ValueError(f"{path} holds a {info.get('arch')!r} evaluator; this rrepa expects {ARCH!r} "
                         f"(retrain with `rrepa evaluator train --overwrite`)")
    model = FMNISTCNN()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not hold FMNISTCNN weights: {str(e).splitlines()[0]}") from e
    info["path"] = str(path)
    return FMNISTEvaluator(model, info, device=device, batch_size=batch_size)


def load_evaluator(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                   batch_size: int = 500, log: Callable[[str], None] | None = None) -> FMNISTEvaluator:
    """The embedded evaluator from ``path``, or, without one, the copy rrepa ships (rrepa.fmnist.shipped: the
    network every FID in the README and results/ was measured with; nothing is trained on first use). A path
    given explicitly (a pinned file, or one `rrepa evaluator train` wrote) that is missing is an error naming it.
    ``log`` is accepted for the callers' uniformity; loading says nothing. ``path`` may name a shipped evaluator
    (fmnist-clutter-cnn)."""
    path = resolve_weights(path)
    if path is None:
        return load_evaluator_file(shipped(EVALUATOR_NAME), device=device, batch_size=batch_size)
    if not Path(path).is_file():
        raise FileNotFoundError(f"evaluator weights {path} do not exist (relative to {Path.cwd()}); check the path, "
                                f"train them there with `rrepa evaluator train --out {path}`, or give none to use "
                                f"the shipped {EVALUATOR_NAME}")
    return load_evaluator_file(path, device=device, batch_size=batch_size)
