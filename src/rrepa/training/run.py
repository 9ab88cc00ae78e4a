"""Run folders: what `rrepa train` writes into one, its lock (one writer at a time), and the one way to open a
trained model, `load_run`, from a run folder, a training checkpoint (ckpt-*.pt) or exported weights
(.safetensors). Every command that takes --ckpt goes through it."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from rrepa import distributed
from rrepa.data.latent_run import ImageSpace, with_vae
from rrepa.distributed import Dist
from rrepa.flow.checkpoint import (
    CKPT_GLOB,
    LAST_POINTER,
    checkpoint_step,
    list_checkpoints,
    load_state_checked,
    load_weights,
    resolve_checkpoint,
    weights_kind,
    weights_step,
)
from rrepa.flow.config import FlowConfig
from rrepa.flow.sample import generate
from rrepa.flow.tarflow import TARFlow
from rrepa.precision import autocast, resolve_for_run
from rrepa.training.config import RunConfig, load_yaml, merge, parse_overrides
from rrepa.utils import LOCK_FILE, RunInUseError, drop_diverged, is_offline, naming, run_lock, temp_dir_beside, to_uint8

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"  # the resolved RunConfig of the run
PRETRAINED_CONFIG, PRETRAINED_WEIGHTS = "config.json", "model.safetensors"  # TARFlow.save_pretrained's files
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name
# What a run writes into its folder; --overwrite removes exactly these.
RUN_FILES = (CONFIG_FILE, "metrics.jsonl", LAST_POINTER, "ema.safetensors", "model.safetensors", "loss.png",
             "bpd.json")
RUN_DIRS = ("samples", "tb")


# --------------------------------------------------------------------------------------------
# Opening a trained model
# --------------------------------------------------------------------------------------------


def load_run(path: str | os.PathLike, weights: str = "ema", device: str | torch.device = "cpu",
             warn: Callable[[str], None] = print) -> tuple[TARFlow, dict]:
    """A TARFlow from a run folder, a training checkpoint (.pt; weights "ema" or "raw"), exported weights
    (.safetensors), a pretrained folder (TARFlow.save_pretrained / `rrepa export`: config.json +
    model.safetensors) or a hub id ("owner/name", online only). A run folder gives its exported ema.safetensors /
    model.safetensors when they are at least as new as its newest checkpoint (the same weights, a smaller file),
    else that checkpoint. Returns the model in eval mode and {"file", "step", "weights", "config", "data"}: config
    is the run config as a dict (for a safetensors file or a pretrained folder, {"model": ...} plus the sections
    of a config.yaml beside it; step from its metadata), data its data section (a dict) or None."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    path = Path(path)
    if not path.exists() and HUB_ID.fullmatch(str(path)):
        return _from_pretrained(str(path), weights, device)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (give a run folder, a ckpt-*.pt file, a "
                                f".safetensors file, a pretrained folder or a hub id)")
    if path.is_file() and path.suffix not in (".safetensors", ".pt"):
        raise ValueError(f"{path} is neither a .safetensors file, a ckpt-*.pt file nor a run folder")
    if path.is_dir() and (path / PRETRAINED_CONFIG).is_file():
        return _from_pretrained(path, weights, device)
    if path.suffix == ".safetensors" and weights == "raw" and weights_kind(path) == "ema":
        raise ValueError(f"{path} holds only the EMA weights, so --weights raw cannot be read from it; give the run "
                         f"folder, its model.safetensors or a ckpt-*.pt file (or drop --weights raw)")
    if path.is_dir():
        exported = path / ("ema.safetensors" if weights == "ema" else "model.safetensors")
        ckpts = list_checkpoints(path)
        newest = checkpoint_step(ckpts[-1]) if ckpts else None
        if exported.is_file() and (newest is None or (weights_step(exported) or -1) >= newest):
            path = exported
        elif not ckpts:
            raise FileNotFoundError(f"{path} holds neither {exported.name} nor {CKPT_GLOB} files; "
                                    f"is it a run folder of `rrepa train`?")
    if path.suffix == ".safetensors":
        model = load_weights(path, device)
        return model.eval(), _info(path, weights_step(path), weights, _config_beside(path.parent, model))
    file, state = resolve_checkpoint(path, warn)
    model = TARFlow(FlowConfig.from_dict(state["config"]["model"]))
    load_state_checked(model, state["ema" if weights == "ema" else "model"], source=str(file))
    return model.to(device).eval(), _info(file, int(state["step"]), weights, state["config"])


def export_pretrained(model: TARFlow, out: str | os.PathLike, run_config: RunConfig | dict | None = None) -> Path:
    """model.save_pretrained(out) (config.json + model.safetensors, huggingface_hub's layout), plus the run's
    config.yaml when given (so that commands reading the data section, e.g. `rrepa classify`, find it), written
    into a temporary folder that is renamed into place: `out` is never half-written."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose another --out or remove it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise naming(err, out) from err
    tmp = temp_dir_beside(out)
    try:
        model.save_pretrained(tmp)
        if run_config is not None:
            d = run_config.to_dict() if isinstance(run_config, RunConfig) else dict(run_config)
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(d, sort_keys=False))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _from_pretrained(source: str | Path, weights: str, device: str | torch.device) -> tuple[TARFlow, dict]:
    """TARFlow.from_pretrained of a local folder or a hub id. Such a folder holds one set of weights (the EMA ones
    when written by `rrepa export`), whatever `weights` asks for."""
    if not isinstance(source, Path) and is_offline():
        raise FileNotFoundError(f"{source} is not a local path, and the hub is off (HF_HUB_OFFLINE / RREPA_OFFLINE); "
                                f"download it first (huggingface-cli download {source} --local-dir DIR) and pass DIR")
    model = TARFlow.from_pretrained(str(source), map_location=str(device)).to(device).eval()
    folder = source if isinstance(source, Path) else None
    config = _config_beside(folder, model) if folder is not None else {"model": model.cfg.to_dict()}
    return model, _info(Path(str(source)) / PRETRAINED_WEIGHTS, None, weights, config)


def _config_beside(folder: Path, model: TARFlow) -> dict:
    """{"model": the weights' own FlowConfig} plus the other sections of a run config.yaml in `folder`."""
    config = {"model": model.cfg.to_dict()}
    if (folder / CONFIG_FILE).is_file():
        stored = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
        config = {**stored, **config}
    return config


def _info(file: Path, step: int | None, weights: str, config: dict) -> dict:
    data = config.get("data")
    return {"file": str(file), "step": step, "weights": weights, "config": config,
            "data": dict(data) if isinstance(data, dict) else None}


def stored_config(run_dir: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """The RunConfig of an existing run folder (for --resume), with `key=value` overrides applied."""
    run = Path(run_dir)
    if run.is_file():
        hint = f" (its run folder is {run.parent})" if run.parent.joinpath(CONFIG_FILE).is_file() else ""
        raise ValueError(f"--resume takes a run folder (the --out of `rrepa train`), not the file {run}{hint}")
    if not run.is_dir():
        raise FileNotFoundError(f"--resume {run}: no such run folder")
    stored = run / CONFIG_FILE
    if not stored.is_file():
        raise FileNotFoundError(f"--resume {run}: not a run folder of `rrepa train` (it has no {CONFIG_FILE})")
    if not load_yaml(stored):  # an empty file would resume with the defaults and fail on a mismatch far away
        raise ValueError(f"--resume {run}: {stored} is empty; restore it (every checkpoint holds the run's config: "
                         f"rrepa.flow.checkpoint.load_checkpoint(...)['config']) or start a new run")
    cfg = merge(RunConfig.from_dict(load_yaml(stored)), parse_overrides(list(overrides)), source="--set")
    cfg.validate()
    return cfg


def init_weights(model: TARFlow, source: str, say: Callable[[str], None]) -> None:
    """--init-from: the raw weights of a run folder, a checkpoint or a .safetensors file, into `model`."""
    if not Path(source).exists():
        raise FileNotFoundError(f"--init-from {source} does not exist")
    # A .safetensors file holds one set of weights: those (asking for "ema" never refuses one).
    loaded, info = load_run(source, "ema" if Path(source).suffix == ".safetensors" else "raw", warn=say)
    load_state_checked(model, loaded.state_dict(), source=info["file"])
    say(f"initialised the weights from {info['file']}")


# --------------------------------------------------------------------------------------------
# Run folders: one writer at a time
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked_by_rank0(run_dir: Path, d: Dist) -> Iterator[None]:
    """Rank 0 holds run_dir's lock; when it cannot take it, every process stops (none waits in a collective)."""
    with contextlib.ExitStack() as stack:
        refused: Exception | None = None
        if d.is_main:
            try:
                stack.enter_context(run_lock(run_dir, warn=tqdm.write))
            except (RunInUseError, OSError) as err:
                refused = err
        if distributed.any_true(refused is not None, d):
            raise refused or RunInUseError(f"run folder {run_dir}: rank 0 could not lock it (see its error)")
        yield


def default_run_dir(d: Dist) -> Path:
    """runs/<date-time>, chosen by rank 0 so every process agrees."""
    name = [f"runs/{datetime.now():%Y%m%d-%H%M%S}"]
    if d.world_size > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: a non-empty folder needs --resume or --overwrite."""
    if resume:
        if not list_checkpoints(run_dir):
            raise FileNotFoundError(f"--resume {run_dir}: no checkpoints (ckpt-*.pt) there to continue from")
    elif run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()) and not overwrite:
        what = "a training run" if (run_dir / CONFIG_FILE).exists() else "files"
        raise ValueError(f"output folder {run_dir} already holds {what}; continue it with --resume {run_dir}, "
                         f"replace it with --overwrite, or choose another --out")


def make_run_dir(run_dir: Path, resume: bool, overwrite: bool, d: Dist) -> None:
    """Create the checked folder; with overwrite, first remove what an earlier run wrote there (only that)."""
    if d.world_size > 1:
        dist.barrier()  # every process checked the folder before rank 0 changes it
    if d.is_main:
        if overwrite and not resume and run_dir.exists():
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
            for path in list_checkpoints(run_dir):
                path.unlink()
            for name in RUN_DIRS:
                shutil.rmtree(run_dir / name, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------
# Samples of a run
# --------------------------------------------------------------------------------------------


def samples_from_checkpoint(ckpt: str, num_samples: int, *, batch_size: int = 100, seed: int = 0,
                            device: str | torch.device = "cpu", weights: str = "ema", progress: bool = False,
                            precision: str | None = None, log: Callable[[str], None] | None = None,
                            vae: str | None = None, report: dict | None = None,
                            **sampler_kwargs) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw ``num_samples`` images from a run folder, a training checkpoint or a .safetensors file and return (arr_0
    (N, H, W, C) uint8, labels (N,) int64 or None), exactly what ``rrepa sample --format npz`` writes with the same
    arguments (rrepa.flow.sample.generate: batch j seeded (seed, j); labels cycle through the classes of a conditional
    model). ``sampler_kwargs`` go to generate: guidance, anneal, attn_temp, temperature, denoise. A latent run's
    samples are denoised in latent space and decoded with the run's VAE (rrepa.data.latent_run.ImageSpace): the images
    are the decoded ones. precision: auto | fp32 | bf16 (rrepa.precision; None: the run's own), resolved on `device`
    as `rrepa sample --precision` resolves it. vae: a latent run's VAE from another folder or hub id than its config
    names (as `rrepa sample --vae`; its fingerprint is still checked). report: a dict that receives the resolved
    precision ("dtype"). Samples that diverge (NaN or inf) are left out, as `rrepa sample` leaves them out, and
    reported by index and class through `log` (default: a logging warning): fewer than num_samples come back then."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    device = torch.device(device)
    model, info = load_run(ckpt, weights, device, warn=lambda m: logger.warning("%s", m))
    info = with_vae(info, vae)  # a latent run's VAE from another place (its fingerprint is still checked)
    model.validate_inputs = False  # a diverged sample is left out below, not an error of the denoising step
    space = ImageSpace.for_run(info["config"], device, log=lambda m: logger.warning("%s", m))
    K = model.cfg.num_classes
    labels = torch.arange(num_samples) % K if K else None
    precision = resolve_for_run(precision, info, device)
    if report is not None:
        report["dtype"] = precision
    with autocast(precision, device):
        parts = generate(model, labels, num_samples, batch_size, seed, Dist(device=device), progress=progress,
                         to_images=space, **sampler_kwargs)
    x, labels, diverged = drop_diverged(torch.cat([parts[j] for j in sorted(parts)]), labels)
    if diverged:
        (log or (lambda m: logger.warning("%s", m)))(f"warning: {diverged}")
    return (to_uint8(x).permute(0, 2, 3, 1).numpy(),
            None if labels is None else labels.numpy().astype(np.int64))
