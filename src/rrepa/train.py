"""Training a TARFlow by maximum likelihood on noise-augmented images (DESIGN.md section 1).

The recipe: data, model, optimiser; then per step: loss, backward, clip, step, EMA, log, sample,
checkpoint. The same code runs as one process or under `torchrun --nproc_per_node N` (DDP).

A run folder holds:

    config.yaml            the resolved RunConfig
    metrics.jsonl          one line per log_every steps (step, loss, nll, bpd, lr, grad_norm, skipped, ...)
    tb/                    TensorBoard events of the same numbers and the sample grids
    samples/step-*.png     EMA samples from fixed noise, one column per class
    ckpt-*.pt, last        checkpoints (the newest keep_last) and the name of the newest one
    ema.safetensors, model.safetensors, loss.png, bpd.json      written at the end
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from rrepa import distributed
from rrepa.checkpoint import (
    LAST_POINTER,
    atomic_write,
    list_checkpoints,
    load_latest_checkpoint,
    load_state_checked,
    resolve_checkpoint,
    save_checkpoint,
    save_weights,
)
from rrepa.config import RunConfig
from rrepa.data import build_dataset
from rrepa.distributed import Dist, GlobalBatchSampler
from rrepa.flow import TARFlow
from rrepa.sample import evaluate_bpd, grid_labels, save_grid

# What a run writes into its folder; --overwrite removes exactly these.
RUN_FILES = ("config.yaml", "metrics.jsonl", LAST_POINTER, "ema.safetensors", "model.safetensors", "loss.png",
             "bpd.json")
RUN_DIRS = ("samples", "tb")


class Objective(nn.Module):
    """The training loss as a module's forward, so that DDP (which hooks forward) and torch.compile
    wrap it: x (B, C, H, W) noisy images, y (B,) labels or None -> NLL per dimension (B,) in nats."""

    def __init__(self, flow: TARFlow):
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, y: Tensor | None, label_drop: float) -> Tensor:
        return self.flow.nll(x, y, label_drop=label_drop)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to min_ratio at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
          init_from: str | None = None, device: str = "auto") -> dict:
    """Train (or, with resume, continue) the run in run_dir. Returns a summary dict (rank 0 has bpd)."""
    d = distributed.setup(device)
    try:
        return _train(cfg, run_dir, resume, overwrite, init_from, d)
    finally:
        distributed.teardown()


def _train(cfg: RunConfig, run_dir, resume: bool, overwrite: bool, init_from: str | None, d: Dist) -> dict:
    t_start = time.time()
    cfg.validate()
    o, t = cfg.optim, cfg.train
    micro = cfg.micro_batch(d.world_size)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(d)
    prepare_run_dir(run_dir, resume, overwrite, d)
    say = tqdm.write if d.is_main else (lambda msg: None)

    # ---- data -----------------------------------------------------------------------------
    torch.manual_seed(t.seed)  # the same initial weights on every process
    dataset = build_dataset(cfg.data, "train")
    check_data_matches_model(dataset, cfg)
    sampler = GlobalBatchSampler(len(dataset), o.batch_size, t.seed, d, o.grad_accum)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=t.num_workers, pin_memory=d.device.type == "cuda",
        persistent_workers=t.num_workers > 0,
        generator=torch.Generator().manual_seed(t.seed + d.rank))  # keeps the global RNG untouched

    # ---- model, EMA, optimiser ------------------------------------------------------------
    model = TARFlow(cfg.model).to(d.device)
    if init_from is not None:
        init_weights(model, init_from, say)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    objective: nn.Module = Objective(model)
    if d.world_size > 1:
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=[d.local_rank] if d.device.type == "cuda"
                                                        else None)
    if t.compile:
        objective = torch.compile(objective)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and LayerNorm gains
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=o.betas, fused=d.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=o.warmup_steps, total=t.steps, min_ratio=o.min_lr_ratio))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=t.bf16 and d.device.type == "cuda")

    step, skipped = 0, 0
    if resume:
        path, state = load_latest_checkpoint(run_dir, warn=say)
        load_state_checked(model, state["model"], source=str(path))
        load_state_checked(ema, state["ema"], source=str(path))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, skipped = int(state["step"]), int(state.get("skipped", 0))
        set_rng_state(state, d, t.seed)
        say(f"resumed {path} at step {step}")
    else:
        seed_everything(t.seed + d.rank)  # different noise and label drops on every process
    if d.is_main:
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(cfg.to_yaml()))
        say(f"run folder {run_dir}: {model.num_params() / 1e6:.2f} M parameters, {len(dataset)} training images, "
            f"{d.world_size} process(es) x {o.grad_accum} x {micro} images per step on {d.device}")

    # ---- what a run shows ---------------------------------------------------------------------
    log = RunLog(run_dir, step, d) if d.is_main else None
    grid_y, grid_cols = grid_labels(model, t.sample_rows)
    grid_z = torch.randn((len(grid_y) if grid_y is not None else t.sample_rows * grid_cols, cfg.model.in_channels,
                          cfg.model.image_height, cfg.model.image_width),
                         generator=torch.Generator().manual_seed(t.seed))  # fixed noise: grids are comparable
    window = Window(d.device)

    # ---- the loop -----------------------------------------------------------------------------
    sigma = cfg.model.sigma
    conditional = cfg.model.num_classes > 0
    batches = micro_batches(loader, sampler, step)
    bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", disable=not d.is_main, dynamic_ncols=True)
    while step < t.steps:
        t0 = time.time()
        loss = torch.zeros((), device=d.device)
        for a in range(o.grad_accum):
            x, y = next(batches)
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            x = x + sigma * torch.randn_like(x)  # noise augmentation: train on x + sigma * eps
            # Only the last micro-batch all-reduces its gradients.
            sync = a == o.grad_accum - 1 or d.world_size == 1
            with (contextlib.nullcontext() if sync else objective.no_sync()), autocast:
                micro_loss = objective(x, y if conditional else None, t.label_drop).mean()
                (micro_loss / o.grad_accum).backward()
            loss += micro_loss.detach() / o.grad_accum
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf)
        # A non-finite loss or gradient on any process skips the step on all of them.
        if distributed.any_true(not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)), d):
            skipped += 1
        else:
            optimizer.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - t.ema_decay)
            window.add(loss, grad_norm)
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        window.tick(time.time() - t0, o.batch_size)
        bar.update(1)

        if step % t.log_every == 0 or step == t.steps:
            row = window.flush(d)  # collective: every process takes part
            if log is not None:
                row.update(step=step, lr=lr, skipped=skipped, epoch=step / sampler.batches_per_epoch)
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", skipped=skipped)
        if d.is_main and t.sample_every and step % t.sample_every == 0 and step < t.steps:
            log.grid(ema, grid_z, grid_y, grid_cols, t.sample_guidance, step)
        if step % t.ckpt_every == 0 or step == t.steps:
            checkpoint(run_dir, model, ema, optimizer, scheduler, step, skipped, sampler, cfg, d)
    bar.close()

    # ---- the end: weights, samples, loss curve, test bits/dim ---------------------------------
    summary = {"run_dir": str(run_dir), "step": step, "skipped": skipped}
    if d.is_main:
        meta = {"step": str(step)}
        save_weights(run_dir / "ema.safetensors", ema, {**meta, "weights": "ema"})
        save_weights(run_dir / "model.safetensors", model, {**meta, "weights": "raw"})
        log.grid(ema, grid_z, grid_y, grid_cols, t.sample_guidance, step)
        log.loss_curve()
        log.close()
    if t.eval_bpd:
        test_set = build_dataset(cfg.data, "test")
        result = evaluate_bpd(ema, test_set, t.eval_batch_size, d, seed=t.seed)
        result.update(split="test", weights="ema", step=step, conditional=conditional)
        summary["bpd"] = result["bpd"]
        if d.is_main:
            atomic_write(run_dir / "bpd.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
            say(f"test bits/dim (EMA weights, uniform dequantization, {result['images']} images): "
                f"{result['bpd']:.4f}")
    summary["wall_s"] = time.time() - t_start
    say(f"done: {step} steps in {summary['wall_s'] / 60:.1f} min, {skipped} skipped; results in {run_dir}")
    return summary


# --------------------------------------------------------------------------------------------
# Pieces of the loop
# --------------------------------------------------------------------------------------------


def micro_batches(loader: torch.utils.data.DataLoader, sampler: GlobalBatchSampler, step: int) -> Iterator:
    """Endless (x, y) micro-batches, starting at global batch `step` of the epoch sequence."""
    epoch, start = divmod(step, sampler.batches_per_epoch)
    while True:
        sampler.set_epoch(epoch, start)
        yield from loader
        epoch, start = epoch + 1, 0


class Window:
    """Loss, grad norm and throughput since the last log line."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # (loss, grad_norm, finite steps)
        self.seconds, self.images = 0.0, 0

    def add(self, loss: Tensor, grad_norm: Tensor) -> None:
        self.sums += torch.stack([loss.double(), grad_norm.double(), torch.ones((), device=loss.device,
                                                                               dtype=torch.float64)])

    def tick(self, seconds: float, images: int) -> None:
        self.seconds += seconds
        self.images += images

    def flush(self, d: Dist) -> dict:
        sums = distributed.all_reduce_mean(self.sums, d).tolist()
        n = max(sums[2], 1e-12)
        nll = sums[0] / n if sums[2] else float("nan")
        row = {"loss": nll, "nll": nll,
               # bits/dim of the noisy training images (nats -> bits, plus log2(128) for the 8-bit scale):
               # a running proxy; bpd.json holds the dequantized test figure.
               "bpd": nll / math.log(2) + 7.0,
               "grad_norm": sums[1] / n if sums[2] else float("nan"),
               "images_per_s": self.images / max(self.seconds, 1e-9)}
        self.sums.zero_()
        self.seconds, self.images = 0.0, 0
        return row


class RunLog:
    """Rank 0's outputs: metrics.jsonl, TensorBoard, sample grids and the loss curve."""

    def __init__(self, run_dir: Path, step: int, d: Dist):
        self.run_dir = run_dir
        self.metrics = run_dir / "metrics.jsonl"
        if self.metrics.exists():  # a resumed run rewrites the steps after its checkpoint
            rows = [r for r in self.metrics.read_text().splitlines() if r and json.loads(r)["step"] <= step]
            self.metrics.write_text("".join(r + "\n" for r in rows))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=step or None)
        except ImportError:
            tqdm.write("warning: tensorboard is not installed; writing metrics.jsonl only (pip install tensorboard)")
            self.tb = None

    def write(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def grid(self, ema: TARFlow, z: Tensor, y: Tensor | None, cols: int, guidance: float, step: int) -> None:
        """Samples of the EMA weights from the fixed noise z (rows x cols, one column per class)."""
        device = next(ema.parameters()).device
        with torch.no_grad():
            x = ema.reverse(z.to(device), None if y is None else y.to(device), guidance=guidance)
        if ema.cfg.sigma > 0:
            x = ema.denoise(x, None if y is None else y.to(device))
        path = self.run_dir / "samples" / f"step-{step:07d}.png"
        save_grid(x, path, cols)
        if self.tb is not None:
            self.tb.add_image("samples", np.asarray(_read_png(path)), step, dataformats="HW" if x.shape[1] == 1
                              else "HWC")

    def loss_curve(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(r) for r in self.metrics.read_text().splitlines() if r]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in rows], [r["bpd"] for r in rows])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (bits/dim of noisy images)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.run_dir / "loss.png", dpi=120)
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _read_png(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.copy()


def checkpoint(run_dir: Path, model: TARFlow, ema: TARFlow, optimizer, scheduler, step: int, skipped: int,
               sampler: GlobalBatchSampler, cfg: RunConfig, d: Dist) -> None:
    """Everything needed to continue exactly: weights, optimiser, schedule, data position, RNG of every process."""
    rng = distributed.gather_objects(rng_state(), d)  # collective
    if d.is_main:
        epoch, batch = divmod(step, sampler.batches_per_epoch)
        save_checkpoint(run_dir, {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "skipped": skipped,
            "epoch": epoch, "batch_in_epoch": batch, "world_size": d.world_size, "rng": rng,
            "config": cfg.to_dict(),
        }, keep_last=cfg.train.keep_last)


# --------------------------------------------------------------------------------------------
# Run folder, RNG, initial weights
# --------------------------------------------------------------------------------------------


def default_run_dir(d: Dist) -> Path:
    """runs/<date-time>, chosen by rank 0 so every process agrees."""
    name = [f"runs/{datetime.now():%Y%m%d-%H%M%S}"]
    if d.world_size > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, d: Dist) -> None:
    """Refuse to mix two runs in one folder: a non-empty folder needs --resume or --overwrite."""
    if resume:
        if not list_checkpoints(run_dir):
            raise FileNotFoundError(f"--resume {run_dir}: no checkpoints (ckpt-*.pt) there to continue from")
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            what = "a training run" if (run_dir / "config.yaml").exists() else "files"
            raise ValueError(f"output folder {run_dir} already holds {what}; continue it with --resume {run_dir}, "
                             f"replace it with --overwrite, or choose another --out")
        if d.is_main:
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
            for path in list_checkpoints(run_dir):
                path.unlink()
            for name in RUN_DIRS:
                shutil.rmtree(run_dir / name, ignore_errors=True)
    if d.world_size > 1:
        dist.barrier()  # every process checked the folder before rank 0 writes into it
    run_dir.mkdir(parents=True, exist_ok=True)


def check_data_matches_model(dataset, cfg: RunConfig) -> None:
    m = cfg.model
    if (dataset.channels, dataset.image_size, dataset.image_size) != (m.in_channels, m.image_height, m.image_width):
        raise ValueError(f"the data is {dataset.channels} x {dataset.image_size} x {dataset.image_size} but the model "
                         f"takes {m.in_channels} x {m.image_height} x {m.image_width}; set data.image_size or "
                         f"model.in_channels / image_height / image_width to match")
    if m.num_classes and dataset.num_classes != m.num_classes:
        raise ValueError(f"the data has {dataset.num_classes} classes but model.num_classes is {m.num_classes}; "
                         f"set model.num_classes={dataset.num_classes} (or 0 for an unconditional model)")


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


def set_rng_state(ckpt: dict, d: Dist, seed: int) -> None:
    """Restore this rank's RNG states; with a different process count, reseed from (seed, rank, step)."""
    states = ckpt.get("rng") or []
    if len(states) != d.world_size:
        tqdm.write(f"note: the checkpoint was written by {len(states)} process(es), this run has {d.world_size}; "
                   f"the noise stream is reseeded, so the run continues, though not bit for bit")
        seed_everything(seed + d.rank + 1_000_003 * int(ckpt["step"]))
        return
    s = states[d.rank]
    torch.set_rng_state(s["torch"])
    random.setstate(_as_tuple(s["python"]))
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    if "cuda" in s and d.device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"])


def _as_tuple(x):
    """random.setstate wants the tuples that a checkpoint may have turned into lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def init_weights(model: TARFlow, source: str, say) -> None:
    """--init-from: weights only (raw weights of a checkpoint or run, or a .safetensors file)."""
    path = Path(source)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise FileNotFoundError(f"--init-from {path} does not exist")
        state = load_file(str(path))
    else:
        path, ckpt = resolve_checkpoint(path, warn=say)
        state = ckpt["model"]
    load_state_checked(model, state, source=str(path))
    say(f"initialised the weights from {path}")
