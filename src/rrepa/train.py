"""Training a TARFlow by maximum likelihood on noise-augmented images (DESIGN.md section 1).

The recipe: data, model, optimiser; then per step: loss, backward, clip, step, EMA, log, sample,
checkpoint. The same code runs as one process or under `torchrun --nproc_per_node N` (DDP).

A run folder holds:

    config.yaml            the resolved RunConfig
    metrics.jsonl          one line per log_every steps (step, loss, nll, bpd, lr, grad_norm, skipped, ...; with
                           alignment also align_loss and align_t{t}_l{l}); with train.eval_every, one line per
                           evaluation (step, eval_fid, eval_is, eval_precision, eval_recall, ...)
    tb/                    TensorBoard events of the same numbers and the sample grids
    samples/step-*.png     EMA samples from fixed noise, one column per class
    ckpt-*.pt, last        checkpoints (the newest keep_last; with alignment they hold the projectors, under
                           "align_head") and the name of the newest one
    ema.safetensors, model.safetensors, loss.png, bpd.json      written at the end (flow weights only)
    .lock                  while a process trains into the folder (rrepa.checkpoint.run_lock): its PID

Representation alignment (align.enabled, DESIGN.md section 2): the loss is NLL + align.weight * the alignment
loss of the flow's hidden states against a frozen encoder's patch tokens of the CLEAN image (the flow sees
x + sigma * eps). The Objective module owns the projectors (so DDP and the optimiser see them) and calls the
flow once per micro-batch; the alignment reuses that forward's FlowOutput. Targets come from a feature cache
(align.feature_cache: the loader then yields dataset indices and flip flags) or from the encoder, online.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import shutil
import signal
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
from rrepa.align import AlignHead, position_key
from rrepa.checkpoint import (
    LAST_POINTER,
    LOCK_FILE,
    Interrupted,
    InterruptFlag,
    RunInUseError,
    atomic_write,
    deferred_interrupts,
    list_checkpoints,
    load_latest_checkpoint,
    load_state_checked,
    resolve_checkpoint,
    run_lock,
    save_checkpoint,
    save_weights,
)
from rrepa.classify import evaluate as classify_images
from rrepa.config import RunConfig
from rrepa.data import build_dataset
from rrepa.distributed import Dist, GlobalBatchSampler
from rrepa.flow import TARFlow
from rrepa.sample import describe_bpd, draw, evaluate_bpd, grid_labels, save_grid

# What a run writes into its folder; --overwrite removes exactly these.
RUN_FILES = ("config.yaml", "metrics.jsonl", LAST_POINTER, "ema.safetensors", "model.safetensors", "loss.png",
             "bpd.json")
RUN_DIRS = ("samples", "tb")


class Objective(nn.Module):
    """The training loss as a module's forward, so that DDP (which hooks forward) and torch.compile
    wrap it: x (B, C, H, W) noisy images, y (B,) labels or None -> NLL per dimension (B,) in nats.

    With an AlignHead (`align`, whose projectors thereby sit in DDP and in the optimiser) it also takes the
    encoder's tokens of the clean images, enc_tokens (B, n, d) on the grid enc_hw, and returns
    (nll (B,), weighted alignment loss (), per-position unweighted losses (P,) detached); the flow runs
    once and the alignment reuses that forward's output (its hidden states for the forward strategy, its
    block inputs for the detach and reverse ones)."""

    def __init__(self, flow: TARFlow, align: AlignHead | None = None):
        super().__init__()
        self.flow = flow
        self.align = align

    def forward(self, x: Tensor, y: Tensor | None, label_drop: float, enc_tokens: Tensor | None = None,
                enc_hw: tuple[int, int] | None = None):
        if self.align is None:
            return self.flow.nll(x, y, label_drop=label_drop)
        a = self.align.cfg
        out = self.flow(x, y, hidden=a.positions if a.strategy == "forward" else (), label_drop=label_drop)
        z = out.z.flatten(1)  # TARFlow.log_prob / nll, on the output we keep
        log_prob = -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi)) + out.logdet
        nll = -log_prob / self.flow.cfg.num_dims
        al = self.align(self.flow, x, y, enc_tokens, enc_hw, forward_out=out)
        return nll, al.loss, torch.stack([al.per_position[p] for p in a.positions])


class Targets:
    """Encoder targets of the clean training images: from the feature cache (batches carry dataset indices
    and flip flags) or from the frozen encoder, online. Builds nothing when alignment is off."""

    def __init__(self, cfg: RunConfig, dataset, d: Dist, say):
        from rrepa.encoders import build_encoder

        a = cfg.align
        self.encoder = build_encoder(a.encoder, a.encoder_weights, a.encoder_image_size, d.device)
        self.dim = self.encoder.dim
        self.hw = tuple(self.encoder.grid((cfg.model.image_height, cfg.model.image_width)))
        self.cache = None
        self.device = d.device
        if a.feature_cache:
            from rrepa.encoders import cache_dir
            from rrepa.features import FeatureCache

            root = Path(a.feature_cache_dir) if a.feature_cache_dir else cache_dir() / "features"
            self.cache = FeatureCache.build_or_load(self.encoder, dataset, root, hflip=cfg.data.hflip,
                                                    log=say, progress=d.is_main)
            self.hw = tuple(self.cache.grid)
            self.encoder = None  # not needed any more: free its memory
        say(f"alignment: {a.strategy}{'-' + a.reverse if a.strategy == 'reverse' else ''} at positions "
            f"{a.positions}, weight {a.weight}, encoder {a.encoder} ({self.dim}-d tokens on a {self.hw[0]} x "
            f"{self.hw[1]} grid), targets {'from ' + str(self.cache.path) if self.cache else 'computed online'}")

    def wrap(self, dataset, hflip: bool):
        """The training dataset as the loader should see it: with indices and flip flags for the cache."""
        if self.cache is None:
            return dataset
        from rrepa.features import IndexedFlipDataset

        return IndexedFlipDataset(dataset, hflip)

    def split(self, batch) -> tuple[Tensor, Tensor, Tensor]:
        """A loader batch -> (x clean on the device, y on the device, targets (B, n, d) on the device)."""
        if self.cache is not None:
            x, y, index, flipped = batch
            tokens = self.cache.lookup(index, flipped, self.device)
        else:
            x, y = batch
        x = x.to(self.device, non_blocking=True)
        if self.cache is None:
            tokens = self.encoder(x)  # no_grad, eval, float32
        return x, y.to(self.device, non_blocking=True), tokens


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to min_ratio at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
          init_from: str | None = None, device: str = "auto") -> dict:
    """Train (or, with resume, continue) the run in run_dir. Returns a summary dict (rank 0 has bpd).

    Rank 0 holds the folder's lock (rrepa.checkpoint.run_lock) throughout: a second training into the same
    folder is refused. SIGINT or SIGTERM during the loop finishes the current step, saves a checkpoint and
    raises rrepa.checkpoint.Interrupted("interrupted at step N; resume with --resume DIR")."""
    with distributed.process_group(device) as d:
        run_dir = Path(run_dir) if run_dir is not None else default_run_dir(d)
        with locked(run_dir, d), deferred_interrupts() as stop, contextlib.ExitStack() as cleanup:
            stop.armed = False  # before the loop a signal stops at once: there is nothing to save yet
            return _train(cfg, run_dir, resume, overwrite, init_from, d, stop, cleanup)


@contextlib.contextmanager
def locked(run_dir: Path, d: Dist) -> Iterator[None]:
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


def _train(cfg: RunConfig, run_dir, resume: bool, overwrite: bool, init_from: str | None, d: Dist,
           stop: InterruptFlag | None = None, cleanup: contextlib.ExitStack | None = None) -> dict:
    t_start = time.time()
    cfg.validate()
    o, t = cfg.optim, cfg.train
    micro = cfg.micro_batch(d.world_size)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(d)
    check_run_dir(run_dir, resume, overwrite)
    say = tqdm.write if d.is_main else (lambda msg: None)

    # ---- data -----------------------------------------------------------------------------
    dataset = build_dataset(cfg.data, "train")
    check_data_matches_model(dataset, cfg)
    targets = Targets(cfg, dataset, d, say) if cfg.align.enabled else None
    sampler = GlobalBatchSampler(len(dataset), o.batch_size, t.seed, d, o.grad_accum)
    loader = torch.utils.data.DataLoader(
        targets.wrap(dataset, cfg.data.hflip) if targets is not None else dataset,
        batch_sampler=sampler, num_workers=t.num_workers, pin_memory=d.device.type == "cuda",
        persistent_workers=t.num_workers > 0, worker_init_fn=_ignore_interrupts,
        generator=torch.Generator().manual_seed(t.seed + d.rank))  # keeps the global RNG untouched

    # ---- model, EMA, optimiser ------------------------------------------------------------
    # Seeded here, after the encoder (whose construction draws random initial weights before loading its own):
    # the same initial weights on every process, with or without alignment.
    torch.manual_seed(t.seed)
    model = TARFlow(cfg.model).to(d.device)
    # The data were validated on loading (finite uint8 images, labels in range, class count matched to the model
    # above), so the flow's per-forward value checks, each a device sync and a torch.compile graph break, are off.
    model.validate_inputs = False
    if init_from is not None:
        init_weights(model, init_from, say)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # The projectors are built after the flow (and its EMA copy), so the flow's initial weights do not depend
    # on whether alignment is on.
    head = AlignHead(cfg.align, cfg.model.width, targets.dim).to(d.device) if targets is not None else None
    objective: nn.Module = Objective(model, head)
    if d.world_size > 1:
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=[d.local_rank] if d.device.type == "cuda"
                                                        else None)
    if t.compile:
        objective = torch.compile(objective)
    trainable = [*model.parameters(), *(head.parameters() if head is not None else ())]
    matrices = [p for p in trainable if p.dim() >= 2]  # weights and embeddings: decayed
    vectors = [p for p in trainable if p.dim() < 2]  # biases and LayerNorm gains: not decayed
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": o.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}],
                                  lr=o.lr, betas=o.betas, fused=d.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=o.warmup_steps, total=t.steps, min_ratio=o.min_lr_ratio))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=t.bf16 and d.device.type == "cuda")

    step, skipped, elapsed = 0, 0, 0.0  # elapsed: wall seconds of the run before this process, across resumes
    if resume:
        path, state = load_latest_checkpoint(run_dir, warn=say)
        load_state_checked(model, state["model"], source=str(path))
        load_state_checked(ema, state["ema"], source=str(path))
        if head is not None:
            if "align_head" not in state:
                raise ValueError(f"{path} was written without alignment (no projectors) but align.enabled is true; "
                                 f"start a new run from its weights with --init-from instead")
            load_state_checked(head, state["align_head"], source=f"{path} (align_head)")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, skipped = int(state["step"]), int(state.get("skipped", 0))
        elapsed = float(state.get("elapsed_s", 0.0))
        set_rng_state(state, d, t.seed)
        say(f"resumed {path} at step {step}")
    else:
        seed_everything(t.seed + d.rank)  # different noise and label drops on every process
    # Only now, with data, encoder, model and checkpoint loaded, is the folder touched: a run that cannot start
    # leaves nothing behind (and --overwrite has removed nothing).
    make_run_dir(run_dir, resume, overwrite, d)
    if d.is_main:
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(cfg.to_yaml()))
        proj = f" + {sum(p.numel() for p in head.parameters()) / 1e6:.2f} M projector" if head is not None else ""
        say(f"run folder {run_dir}: {model.num_params() / 1e6:.2f} M parameters{proj}, {len(dataset)} training images, "
            f"{d.world_size} process(es) x {o.grad_accum} x {micro} images per step on {d.device}")

    # ---- what a run shows ---------------------------------------------------------------------
    log = RunLog(run_dir, step, d) if d.is_main else None
    grid_y, grid_cols = grid_labels(model, t.sample_rows)
    grid_z = torch.randn((len(grid_y) if grid_y is not None else t.sample_rows * grid_cols, cfg.model.in_channels,
                          cfg.model.image_height, cfg.model.image_width),
                         generator=torch.Generator().manual_seed(t.seed)) * t.sample_temperature  # fixed noise
    window = Window(d.device, [position_key(p) for p in cfg.align.positions] if head is not None else None)
    with rng_preserved():  # building the evaluator (its random init, reference statistics) leaves training as is
        evaluation = InTrainingEval(cfg, d, say) if t.eval_every and d.is_main else None

    # ---- the loop -----------------------------------------------------------------------------
    t_run = time.time() - elapsed  # the run's wall clock started here, as far as its checkpoints tell
    sigma = cfg.model.sigma
    conditional = cfg.model.num_classes > 0
    batches = micro_batches(loader, sampler, step)
    bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", disable=not d.is_main, dynamic_ncols=True)
    if cleanup is not None:
        cleanup.callback(bar.close)  # an error leaves the bar finished, so its message starts on a line of its own
    if stop is not None:
        stop.armed = True  # from here on a signal ends the run at the next step boundary, with a checkpoint
    while step < t.steps:
        t0 = time.time()
        loss = torch.zeros((), device=d.device)
        parts = None  # with alignment: (nll, unweighted align loss, per-position losses) of the step
        for a in range(o.grad_accum):
            if targets is None:
                x, y = next(batches)
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            else:
                x, y, tokens = targets.split(next(batches))  # tokens of the clean images
            if t.dequantize:  # TARFlow's likelihood protocol: uniform noise over each 8-bit level's bin
                x = ((x + 1) * 127.5 + torch.rand_like(x)) / 128 - 1
            x = x + sigma * torch.randn_like(x)  # noise augmentation: train on x + sigma * eps
            # Only the last micro-batch all-reduces its gradients.
            sync = a == o.grad_accum - 1 or d.world_size == 1
            with contextlib.nullcontext() if sync else objective.no_sync():
                with autocast:
                    if targets is None:
                        micro_loss = objective(x, y if conditional else None, t.label_drop).mean()
                    else:
                        nll, align_loss, per = objective(x, y if conditional else None, t.label_drop, tokens,
                                                         targets.hw)
                        nll = nll.mean()
                        micro_loss = nll + align_loss
                        part = torch.cat([nll.detach().float()[None], per.float().mean()[None], per.float()])
                        parts = part / o.grad_accum if parts is None else parts + part / o.grad_accum
                (micro_loss / o.grad_accum).backward()
            loss += micro_loss.detach() / o.grad_accum
        grad_norm = nn.utils.clip_grad_norm_(trainable, o.grad_clip if o.grad_clip > 0 else math.inf)
        # A non-finite loss or gradient on any process skips the step on all of them.
        if distributed.any_true(not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)), d):
            skipped += 1
        else:
            optimizer.step()
            # Warm-up of the EMA decay: otherwise the initial (identity) weights linger in the average
            # for ~1 / (1 - decay) steps, and early sample grids show a much worse model than the real one.
            ema_decay = min(t.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - ema_decay)
            window.add(loss, grad_norm, parts)
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
                extra = {"nll": f"{row['nll']:.4f}", "align": f"{row['align_loss']:.4f}"} if head is not None else {}
                bar.set_postfix(loss=f"{row['loss']:.4f}", **extra, skipped=skipped)
        if d.is_main and t.sample_every and step % t.sample_every == 0 and step < t.steps:
            log.grid(ema, grid_z, grid_y, grid_cols, t.sample_guidance, step)
        if evaluation is not None and step % t.eval_every == 0:
            with rng_preserved():
                log.write_eval(step, {**evaluation(ema, step), "wall_s": round(time.time() - t_run, 1)})
        if step % t.ckpt_every == 0 or step == t.steps:
            checkpoint(run_dir, model, ema, optimizer, scheduler, step, skipped, sampler, cfg, d, head,
                       elapsed=time.time() - t_run)
        if stop is not None and distributed.any_true(bool(stop), d):  # collective: every process stops here
            if not (step % t.ckpt_every == 0 or step == t.steps):
                checkpoint(run_dir, model, ema, optimizer, scheduler, step, skipped, sampler, cfg, d, head,
                           elapsed=time.time() - t_run)
            bar.close()
            if log is not None:
                log.close()
            raise Interrupted(f"interrupted at step {step}; resume with --resume {run_dir}",
                              stop.signum or signal.SIGINT)
    bar.close()
    if stop is not None:
        stop.armed = False

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
        # "bpd" follows rrepa bpd's default, the null label (TARFlow's protocol); a conditional model also gets
        # the true-label figure. Both carry their protocol and the training noise sigma.
        result = evaluate_bpd(ema, test_set, t.eval_batch_size, d, seed=t.seed, conditional=False)
        result.update(split="test", weights="ema", step=step, train_dequantize=t.dequantize)
        lines = [describe_bpd(result)]
        if conditional:
            cond = evaluate_bpd(ema, test_set, t.eval_batch_size, d, seed=t.seed, conditional=True)
            result.update(bpd_conditional=cond["bpd"], protocol_conditional=cond["protocol"])
            lines.append(describe_bpd(cond))
        summary["bpd"] = result["bpd"]
        if d.is_main:
            atomic_write(run_dir / "bpd.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
            say(f"test split, EMA weights, {result['images']} images: {'; '.join(lines)}")
    summary["wall_s"] = time.time() - t_start
    say(f"done: {step} steps in {summary['wall_s'] / 60:.1f} min, {skipped} skipped; results in {run_dir}")
    return summary


# --------------------------------------------------------------------------------------------
# Pieces of the loop
# --------------------------------------------------------------------------------------------


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave SIGINT / SIGTERM to the main process, which stops at a step boundary; a worker
    that died of the signal would fail the step in progress. They exit with the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def micro_batches(loader: torch.utils.data.DataLoader, sampler: GlobalBatchSampler, step: int) -> Iterator:
    """Endless (x, y) micro-batches, starting at global batch `step` of the epoch sequence."""
    epoch, start = divmod(step, sampler.batches_per_epoch)
    while True:
        sampler.set_epoch(epoch, start)
        yield from loader
        epoch, start = epoch + 1, 0


class Window:
    """Loss, grad norm and throughput since the last log line; with alignment (align_keys: the positions'
    names) also the NLL, the unweighted alignment loss and each position's."""

    def __init__(self, device: torch.device, align_keys: list[str] | None = None):
        self.align_keys = align_keys
        # (loss, grad_norm, finite steps[, nll, align_loss, per position...])
        self.sums = torch.zeros(3 + (2 + len(align_keys) if align_keys else 0), dtype=torch.float64, device=device)
        self.seconds, self.images = 0.0, 0

    def add(self, loss: Tensor, grad_norm: Tensor, parts: Tensor | None = None) -> None:
        values = [loss.double()[None], grad_norm.double()[None], torch.ones(1, device=loss.device,
                                                                           dtype=torch.float64)]
        if self.align_keys:
            values.append(parts.double())
        self.sums += torch.cat(values)

    def tick(self, seconds: float, images: int) -> None:
        self.seconds += seconds
        self.images += images

    def flush(self, d: Dist) -> dict:
        sums = distributed.all_reduce_mean(self.sums, d).tolist()
        n = max(sums[2], 1e-12)
        loss = sums[0] / n if sums[2] else float("nan")
        nll = (sums[3] / n if sums[2] else float("nan")) if self.align_keys else loss
        row = {"loss": loss, "nll": nll,
               # bits/dim of the noisy training images (nats -> bits, plus log2(128) for the 8-bit scale):
               # a running proxy; bpd.json holds the dequantized test figure.
               "bpd": nll / math.log(2) + 7.0,
               "grad_norm": sums[1] / n if sums[2] else float("nan"),
               "images_per_s": self.images / max(self.seconds, 1e-9)}
        if self.align_keys:  # unweighted negative cosine similarities, in [-1, 1]
            row["align_loss"] = sums[4] / n if sums[2] else float("nan")
            for i, key in enumerate(self.align_keys):
                row[f"align_{key}"] = sums[5 + i] / n if sums[2] else float("nan")
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

    def write(self, row: dict, prefix: str = "train") -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{prefix}/{k}", v, row["step"])

    def write_eval(self, step: int, res: dict) -> None:
        """One metrics.jsonl line {step, eval_fid, eval_is, ...} and TensorBoard scalars eval/fid, ..."""
        row = {"step": step, **{f"eval_{k}": v for k, v in res.items()
                                if v is None or isinstance(v, (int, float, str))}}
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in res.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"eval/{k}", v, step)

    def grid(self, ema: TARFlow, z: Tensor, y: Tensor | None, cols: int, guidance: float, step: int) -> None:
        """Samples of the EMA weights from the fixed noise z (rows x cols, one column per class)."""
        device = next(ema.parameters()).device
        x = draw(ema, z.to(device), None if y is None else y.to(device), guidance)
        path = self.run_dir / "samples" / f"step-{step:07d}.png"
        save_grid(x, path, cols)
        if self.tb is not None:
            self.tb.add_image("samples", np.asarray(_read_png(path)), step, dataformats="HW" if x.shape[1] == 1
                              else "HWC")

    def loss_curve(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in (json.loads(r) for r in self.metrics.read_text().splitlines() if r) if "bpd" in r]
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


class InTrainingEval:
    """train.eval_every (rank 0): FID, IS, precision / recall and (fmnist evaluator, conditional model) class
    accuracy of train.eval_samples samples of the EMA weights. The samples use fixed noise (seeded by
    train.seed, never the global RNG, so evaluating does not change the training run) and labels cycling
    through the classes; the reference statistics are computed once here (and cached by
    rrepa.metrics.reference_stats). With train.eval_test_images (conditional model), also the one-step and
    Bayes top-1 and the bits/dim of that many test images, with fixed noise too."""

    def __init__(self, cfg: RunConfig, d: Dist, say):
        from rrepa.metrics import build_feature_network, reference_stats

        t = cfg.train
        weights = {"inception_weights" if t.eval_features == "inception" else "evaluator_weights": t.eval_weights}
        self.net = build_feature_network(t.eval_features, device=d.device, log=say, **weights)
        ref = t.eval_ref or default_eval_ref(cfg)
        self.ref = reference_stats(ref, self.net, data_dir=cfg.data.path if cfg.data.name == "fmnist" else None,
                                   progress=True)
        self.cfg, self.d = cfg, d
        self.test_set = None
        if t.eval_test_images and cfg.model.num_classes:
            self.test_set = build_dataset(cfg.data, "test")
        say(f"evaluation every {t.eval_every} steps: {t.eval_samples} EMA samples vs {ref} "
            f"({self.ref.num_images} images) with {self.net.name}"
            + (f"; one-step and Bayes top-1 and bits/dim of {min(t.eval_test_images, len(self.test_set))} test "
               f"images" if self.test_set is not None else ""))

    def __call__(self, ema: TARFlow, step: int) -> dict:
        from rrepa.metrics import evaluate_in_training

        m, t = self.cfg.model, self.cfg.train
        device = next(ema.parameters()).device
        drawn = [0]

        def sampler(b: int):
            lo = drawn[0]
            drawn[0] += b
            g = torch.Generator(device).manual_seed(t.seed * 1_000_003 + lo)
            z = torch.randn((b, m.in_channels, m.image_height, m.image_width), generator=g, device=device)
            y = torch.arange(lo, lo + b, device=device) % m.num_classes if m.num_classes else None
            return draw(ema, z, y, t.eval_guidance), None if y is None else y.cpu()

        res = evaluate_in_training(sampler, self.net, self.ref, t.eval_samples, batch_size=t.eval_batch_size)
        if self.test_set is not None:
            res.update(self.test_scores(ema))
        tqdm.write(f"step {step}: FID {res['fid']:.3f} ({res['num_samples']} samples, {self.net.name}), IS "
                   f"{res['is']:.3f}" + (f", class accuracy {res['class_accuracy']:.3f}"
                                         if res.get("class_accuracy") is not None else "")
                   + (f", one-step top-1 {res['one_step_top1']:.3f}, Bayes top-1 {res['bayes_top1']:.3f}, "
                      f"bits/dim {res['bpd']:.4f}" if "bpd" in res else "")
                   + f" [{res['eval_seconds']:.0f} s]")
        return res

    def test_scores(self, ema: TARFlow) -> dict:
        """One-step and Bayes top-1 (inputs x + sigma * eps, as trained) and dequantized bits/dim (true labels)
        of the first train.eval_test_images test images; seeded by train.seed, so every evaluation of a run
        sees the same inputs."""
        t = self.cfg.train
        start = time.perf_counter()
        n = min(t.eval_test_images, len(self.test_set))
        cls = classify_images(ema, self.test_set, methods=("one-step", "bayes"), limit=n,
                              batch_size=t.eval_batch_size, seed=t.seed, progress=False)
        bpd = evaluate_bpd(ema, self.test_set, t.eval_batch_size, self.d, seed=t.seed, conditional=True,
                           max_images=n, progress=False)
        return {"one_step_top1": cls["methods"]["one-step"]["top1"], "bayes_top1": cls["methods"]["bayes"]["top1"],
                "bpd": bpd["bpd"], "bpd_protocol": "uniform dequantization, true labels", "test_images": n,
                "eval_seconds_test": round(time.perf_counter() - start, 2)}


def default_eval_ref(cfg: RunConfig) -> str:
    """The training split as the reference of train.eval_every: fmnist:train, or the npz file of data.path."""
    if cfg.data.name == "fmnist":
        return "fmnist:train"
    if cfg.data.name == "npz" and cfg.data.path and Path(cfg.data.path).is_file():
        return cfg.data.path
    raise ValueError(f"train.eval_every needs reference images or statistics for {cfg.data.name} data: set "
                     f"train.eval_ref to an npz of images (arr_0) or of statistics (mu, sigma)")


def _read_png(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.copy()


def checkpoint(run_dir: Path, model: TARFlow, ema: TARFlow, optimizer, scheduler, step: int, skipped: int,
               sampler: GlobalBatchSampler, cfg: RunConfig, d: Dist, head: AlignHead | None = None,
               elapsed: float = 0.0) -> None:
    """Everything needed to continue exactly: weights, optimiser, schedule, data position, RNG of every process
    (and the run's wall seconds so far, so that a resumed run's clock continues)."""
    rng = distributed.gather_objects(rng_state(), d)  # collective
    if d.is_main:
        epoch, batch = divmod(step, sampler.batches_per_epoch)
        save_checkpoint(run_dir, {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "skipped": skipped,
            "epoch": epoch, "batch_in_epoch": batch, "world_size": d.world_size, "rng": rng,
            "config": cfg.to_dict(), "elapsed_s": elapsed,
            **({"align_head": head.state_dict()} if head is not None else {}),
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


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: a non-empty folder needs --resume or --overwrite."""
    if resume:
        if not list_checkpoints(run_dir):
            raise FileNotFoundError(f"--resume {run_dir}: no checkpoints (ckpt-*.pt) there to continue from")
    elif run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()) and not overwrite:
        what = "a training run" if (run_dir / "config.yaml").exists() else "files"
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


def check_data_matches_model(dataset, cfg: RunConfig) -> None:
    m = cfg.model
    if (dataset.channels, dataset.image_size, dataset.image_size) != (m.in_channels, m.image_height, m.image_width):
        raise ValueError(f"the data is {dataset.channels} x {dataset.image_size} x {dataset.image_size} but the model "
                         f"takes {m.in_channels} x {m.image_height} x {m.image_width}; set data.image_size or "
                         f"model.in_channels / image_height / image_width to match")
    if m.num_classes and dataset.num_classes != m.num_classes:
        raise ValueError(f"the data has {dataset.num_classes} classes but model.num_classes is {m.num_classes}; "
                         f"set model.num_classes={dataset.num_classes} (or 0 for an unconditional model)")


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


def set_rng_state(ckpt: dict, d: Dist, seed: int) -> None:
    """Restore this rank's RNG states; with a different process count, reseed from (seed, rank, step)."""
    states = ckpt.get("rng") or []
    if len(states) != d.world_size:
        tqdm.write(f"note: the checkpoint was written by {len(states)} process(es), this run has {d.world_size}; "
                   f"the noise stream is reseeded, so the run continues, though not bit for bit")
        seed_everything(seed + d.rank + 1_000_003 * int(ckpt["step"]))
        return
    restore_rng_state(states[d.rank], cuda=d.device.type == "cuda")


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
