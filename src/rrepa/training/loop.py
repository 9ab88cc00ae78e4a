"""Training a TARFlow by maximum likelihood on noise-augmented images (docs/DESIGN.md section 1).

The recipe: data, model, optimiser; then per step: loss terms, backward, clip, step, EMA, log, evaluate,
sample, checkpoint. The same code runs as one process or under `torchrun --nproc_per_node N` (DDP).

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
    .lock                  while a process trains into the folder (rrepa.utils.run_lock): its PID

Representation alignment (align.enabled, docs/DESIGN.md section 2) is one more term of the objective
(rrepa.training.objective): NLL + align.weight * the alignment loss of the flow's hidden states against a frozen
encoder's patch tokens of the CLEAN image (the flow sees x + sigma * eps).

A latent run (data.vae set; rrepa.data.latent_run) trains on the cached VAE latents of the clean images (the VAE, the
latent caches and the feature cache are made on first use), pins the VAE's fingerprint in the stored config, and
decodes its grid and evaluation samples with that VAE after the latent-space score step; bpd.json is then in bits
and nats per latent dimension.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from rrepa import distributed
from rrepa.align.head import AlignHead
from rrepa.data.datasets import build_dataset
from rrepa.data.latent_run import (
    ImageSpace,
    check_vae_matches_model,
    eval_dataset,
    is_latent,
    latent_dataset,
    load_run_vae,
)
from rrepa.data.latents import image_dataset
from rrepa.distributed import Dist, GlobalBatchSampler
from rrepa.eval.bpd import describe_bpd, evaluate_bpd
from rrepa.flow.checkpoint import (
    checkpoint_step,
    list_checkpoints,
    load_latest_checkpoint,
    load_state_checked,
    save_checkpoint,
    save_weights,
    weights_step,
)
from rrepa.flow.sample import grid_labels
from rrepa.flow.tarflow import TARFlow
from rrepa.fmnist.shipped import resolve_weights
from rrepa.precision import autocast as precision_autocast
from rrepa.precision import describe as describe_precision
from rrepa.precision import resolve_precision
from rrepa.training.config import RunConfig
from rrepa.training.evaluation import InTrainingEval
from rrepa.training.objective import Batches, Objective
from rrepa.training.run import check_run_dir, default_run_dir, init_weights, locked_by_rank0, make_run_dir
from rrepa.training.runlog import RunLog, Window, final_summary
from rrepa.utils import (
    Interrupted,
    InterruptFlag,
    atomic_write,
    deferred_interrupts,
    derive_seed,
    lr_schedule,
    restore_rng_state,
    rng_preserved,
    rng_state,
    seed_everything,
)


def train(cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
          init_from: str | None = None, device: str = "auto") -> dict:
    """Train (or, with resume, continue) the run in run_dir. Returns a summary dict (rank 0 has bpd).

    Rank 0 holds the folder's lock (rrepa.utils.run_lock) throughout: a second training into the same
    folder is refused. SIGINT or SIGTERM during the loop finishes the current step, saves a checkpoint and
    raises rrepa.utils.Interrupted("interrupted at step N; resume with --resume DIR")."""
    if run_dir is not None and not str(run_dir):  # Path("") would be the current folder
        raise ValueError("the run folder is empty; give a path (or None for runs/<date-time>)")
    with distributed.process_group(device) as d:
        run_dir = Path(run_dir) if run_dir is not None else default_run_dir(d)
        with locked_by_rank0(run_dir, d), deferred_interrupts() as stop, contextlib.ExitStack() as cleanup:
            stop.armed = False  # before the loop a signal stops at once: there is nothing to save yet
            return _train(cfg, run_dir, resume, overwrite, init_from, d, stop, cleanup)


def _train(cfg: RunConfig, run_dir: Path, resume: bool, overwrite: bool, init_from: str | None, d: Dist,
           stop: InterruptFlag, cleanup: contextlib.ExitStack) -> dict:
    t_start = time.time()
    cfg.validate()
    check_pinned_files(cfg)
    # The resolved precision is what the run stores (config.yaml, checkpoints): a resume keeps it on any machine.
    setting = cfg.train.precision
    cfg = replace(cfg, train=replace(cfg.train, precision=resolve_precision(setting, d.device)))
    o, t = cfg.optim, cfg.train
    micro = cfg.micro_batch(d.world_size)
    check_run_dir(run_dir, resume, overwrite)
    if resume:
        check_not_finished(run_dir, cfg)
    say = tqdm.write if d.is_main else (lambda msg: None)

    # ---- data (and, with alignment, the encoder targets of the clean images) -----------------
    # A latent run (data.vae): the flow trains on the cached VAE latents of the clean images; the images themselves
    # are what the alignment targets are computed from, and the VAE decodes what the run shows (rrepa.data.latent_run).
    vae = None
    if is_latent(cfg.data):
        vae = load_run_vae(cfg.data, d.device, log=say)
        check_vae_matches_model(vae, cfg.data, cfg.model)
        # Pinned in the stored config: sampling, evaluation and --resume refuse another VAE under the same name.
        cfg = replace(cfg, data=replace(cfg.data, vae_fingerprint=vae.fingerprint))
        with distributed.main_first(d):  # rank 0 encodes a missing cache, showing its progress; the others open it
            dataset = latent_dataset(cfg.data, vae, "train", hflip=cfg.data.hflip, device=d.device,
                                     progress=d.is_main, log=say)
        images = image_dataset(cfg.data, "train")
    else:
        dataset = images = build_dataset(cfg.data, "train")
    check_data_matches_model(dataset, cfg)
    batches = Batches(cfg, images, d, say)
    sampler = GlobalBatchSampler(len(dataset), o.batch_size, t.seed, d, o.grad_accum)
    loader = torch.utils.data.DataLoader(
        batches.wrap(dataset, cfg.data.hflip), batch_sampler=sampler, num_workers=t.num_workers,
        pin_memory=d.device.type == "cuda", persistent_workers=t.num_workers > 0, worker_init_fn=_ignore_interrupts,
        generator=torch.Generator().manual_seed(t.seed + d.rank))  # keeps the global RNG untouched

    # ---- model, EMA, objective, optimiser -----------------------------------------------------
    # Seeded here, after the encoder (whose construction draws random initial weights before loading its own):
    # the same initial weights on every process, with or without alignment.
    torch.manual_seed(t.seed)
    model = TARFlow(cfg.model).to(d.device)
    # The data were validated on loading (finite uint8 images, labels in range, class count matched to the model
    # above), so the flow's per-forward value checks, each a device sync and a torch.compile graph break, are off.
    model.validate_inputs = False
    model.activation_checkpointing = t.activation_checkpointing
    if init_from is not None:
        init_weights(model, init_from, say)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # The projectors are built after the flow (and its EMA copy), so the flow's initial weights do not depend
    # on whether alignment is on.
    head = AlignHead(cfg.align, cfg.model.width, batches.dim).to(d.device) if batches.aligned else None
    objective = Objective(model, head)
    loss_fn: nn.Module = objective
    if d.world_size > 1:
        loss_fn = nn.parallel.DistributedDataParallel(loss_fn, device_ids=[d.local_rank] if d.device.type == "cuda"
                                                      else None)
    if t.compile:
        loss_fn = torch.compile(loss_fn)
    trainable = list(objective.parameters())  # the flow's, then the projectors'
    optimizer, scheduler = build_optimizer(trainable, cfg, d)
    autocast = precision_autocast(t.precision, d.device)  # training, evaluation and sampling alike

    step, skipped, elapsed = 0, 0, 0.0  # elapsed: wall seconds of the run before this process, across resumes
    if resume:
        step, skipped, elapsed = resume_from(run_dir, model, ema, head, optimizer, scheduler, d, cfg, say)
    else:
        seed_everything(t.seed + d.rank)  # different noise and label drops on every process
    # Only now, with data, encoder, model and checkpoint loaded, is the folder touched: a run that cannot start
    # leaves nothing behind (and --overwrite has removed nothing).
    make_run_dir(run_dir, resume, overwrite, d)
    if d.is_main:
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(cfg.to_yaml()))
        proj = f" + {sum(p.numel() for p in head.parameters()) / 1e6:.2f} M projector" if head is not None else ""
        what = f"latents of VAE {vae.name} (decoded for grids and evaluation)" if vae is not None else "images"
        say(f"run folder {run_dir}: {model.num_params() / 1e6:.2f} M parameters{proj}, {len(dataset)} training {what}, "
            f"{d.world_size} process(es) x {o.grad_accum} x {micro} {'latents' if vae else 'images'} per step on "
            f"{d.device}, precision {describe_precision(t.precision, setting)}")

    # ---- what a run shows ---------------------------------------------------------------------
    space = ImageSpace(vae) if vae is not None else None  # model outputs -> images, for grids and evaluation
    log = RunLog(run_dir, step, space) if d.is_main else None
    grid_y, grid_cols = grid_labels(model, t.sample_rows)
    grid_z = torch.randn((len(grid_y) if grid_y is not None else t.sample_rows * grid_cols, cfg.model.in_channels,
                          cfg.model.image_height, cfg.model.image_width),
                         generator=torch.Generator().manual_seed(t.seed)) * t.sample_temperature  # fixed noise
    window = Window(d.device, objective.log_keys, latent=vae is not None)
    # Building the evaluator (random init, reference statistics) leaves training's RNG as is; rank 0's alone, all cores
    with rng_preserved(), distributed.all_cores(d):
        evaluation = InTrainingEval(cfg, d, say, vae=vae) if t.eval_every and d.is_main else None

    # ---- the loop -----------------------------------------------------------------------------
    t_run = time.time() - elapsed  # the run's wall clock started here, as far as its checkpoints tell
    conditional = cfg.model.num_classes > 0
    micro_batches = endless(loader, sampler, step)
    bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", disable=not d.is_main, dynamic_ncols=True)
    cleanup.callback(bar.close)  # an error leaves the bar finished, so its message starts on a line of its own
    stop.armed = True  # from here on a signal ends the run at the next step boundary, with a checkpoint
    divergence = DivergenceCheck(t.max_skipped_fraction, t.steps)
    last_eval = None  # the latest evaluation row, shown at the end when it is of the last step
    while step < t.steps:
        t0 = time.time()
        loss = torch.zeros((), device=d.device)
        logs: dict[str, Tensor] = {}
        for a in range(o.grad_accum):
            x, y, tokens = batches.split(next(micro_batches))  # tokens: the encoder's, of the clean images
            x = augment(x, cfg.model.sigma, t.dequantize)
            sync = a == o.grad_accum - 1 or d.world_size == 1  # only the last micro-batch all-reduces gradients
            with contextlib.nullcontext() if sync else loss_fn.no_sync():
                with autocast:
                    micro_loss, micro_logs = loss_fn(x, y if conditional else None, t.label_drop, tokens, batches.hw)
                (micro_loss / o.grad_accum).backward()
            loss += micro_loss.detach() / o.grad_accum
            for k, v in micro_logs.items():
                logs[k] = logs.get(k, 0.0) + v.float() / o.grad_accum
        grad_norm = nn.utils.clip_grad_norm_(trainable, o.grad_clip if o.grad_clip > 0 else math.inf)
        # A non-finite loss or gradient on any process skips the step on all of them.
        non_finite = distributed.any_true(not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)), d)
        divergence.add(non_finite)
        if non_finite:
            skipped += 1
        else:
            optimizer.step()
            update_ema(ema, model, t.ema_decay, step)
            window.add(loss, grad_norm, logs)
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]  # the one this step used
        scheduler.step()
        step += 1
        window.tick(time.time() - t0, o.batch_size)
        bar.update(1)

        if step % t.log_every == 0 or step == t.steps:
            row = window.flush(d)  # collective: every process takes part
            if log is not None:
                row.update(step=step, lr=lr, skipped=skipped, epoch=step / sampler.batches_per_epoch)
                log.write(row)
                terms = {"nll": f"{row['nll']:.4f}", "align": f"{row['align_loss']:.4f}"} if "align_loss" in row else {}
                bar.set_postfix(loss=f"{row['loss']:.4f}", **terms, skipped=skipped)
        if evaluation is not None and step % t.eval_every == 0:
            with rng_preserved(), autocast, distributed.all_cores(d):
                last_eval = {**evaluation(ema, step), "step": step, "dtype": t.precision,
                             "wall_s": round(time.time() - t_run, 1)}
                log.write_eval(step, last_eval)
        if d.is_main and t.sample_rows and t.sample_every and step % t.sample_every == 0 and step < t.steps:
            with autocast, distributed.all_cores(d):
                log.grid(ema, grid_z, grid_y, grid_cols, t.sample_guidance, step)
        if divergence.diverged:  # every process agrees (any_true above): all stop, no checkpoint of this state
            bar.close()
            if log is not None:
                log.close()
            raise divergence.error(step, run_dir)
        stopping = distributed.any_true(bool(stop), d)  # collective: every process stops here
        if step % t.ckpt_every == 0 or step == t.steps or stopping:
            checkpoint(run_dir, model, ema, optimizer, scheduler, step, skipped, sampler, cfg, d, head,
                       elapsed=time.time() - t_run)
        if stopping:
            bar.close()
            if log is not None:
                log.close()
            raise Interrupted(f"interrupted at step {step}; resume with --resume {run_dir}",
                              stop.signum or signal.SIGINT)
    bar.close()
    stop.armed = False

    # ---- the end: weights, samples, loss curve, test bits/dim ---------------------------------
    # The last checkpoint holds them: AdamW's moments and the gradients are freed for the final grid's KV caches
    # (8 GB for 10 guided samples of a 1024-token, 64-layer flow), which on top of them overflowed 24 GB.
    optimizer.state.clear()
    optimizer.zero_grad(set_to_none=True)
    summary = {"run_dir": str(run_dir), "step": step, "skipped": skipped}
    if d.is_main:
        meta = {"step": str(step)}
        save_weights(run_dir / "ema.safetensors", ema, {**meta, "weights": "ema"})
        save_weights(run_dir / "model.safetensors", model, {**meta, "weights": "raw"})
        if t.sample_rows:
            with autocast, distributed.all_cores(d):
                log.grid(ema, grid_z, grid_y, grid_cols, t.sample_guidance, step)
        log.loss_curve()
        log.close()
    if t.eval_bpd:
        with autocast:
            summary["bpd"] = final_bpd(ema, cfg, step, run_dir, d, say, vae)
    summary["wall_s"] = time.time() - t_start
    say(f"done: {step} steps in {summary['wall_s'] / 60:.1f} min, {skipped} skipped; results in {run_dir}")
    if d.is_main:
        final_eval = last_eval if last_eval is not None and last_eval.get("step") == step else None
        grid_guidance = t.sample_guidance if t.sample_rows else None
        say(final_summary(run_dir, step, grid_guidance, final_eval, summary.get("bpd"), vae is not None,
                          t.eval_guidance, evaluation.reference if final_eval else ""))
    return summary


# --------------------------------------------------------------------------------------------
# Pieces of the recipe
# --------------------------------------------------------------------------------------------


def augment(x: Tensor, sigma: float, dequantize: bool) -> Tensor:
    """Clean images (B, C, H, W) in [-1, 1] -> the noisy images the flow is trained on, x + sigma * eps; with
    dequantize first uniform noise over each 8-bit level's bin (TARFlow's likelihood protocol)."""
    if dequantize:
        x = ((x + 1) * 127.5 + torch.rand_like(x)) / 128 - 1
    return x + sigma * torch.randn_like(x)


def build_optimizer(params: list[nn.Parameter], cfg: RunConfig, d: Dist):
    """AdamW (weight decay on matrices and embeddings only) and the warm-up + cosine schedule."""
    o = cfg.optim
    matrices = [p for p in params if p.dim() >= 2]  # weights and embeddings: decayed
    vectors = [p for p in params if p.dim() < 2]  # biases and LayerNorm gains: not decayed
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": o.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}],
                                  lr=o.lr, betas=o.betas, fused=d.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(o, cfg.train.steps))
    return optimizer, scheduler


class TrainingDiverged(ValueError):
    """Too many steps of a run were skipped as non-finite (train.max_skipped_fraction)."""


class DivergenceCheck:
    """The skipped (non-finite) steps among the last `window` ones (100, or all steps of a shorter run); diverged
    once more than max_fraction of a window are skipped (a partial window counts against the whole one, so a
    diverging run stops as soon as the outcome is certain)."""

    WINDOW = 100

    def __init__(self, max_fraction: float, steps: int):
        self.max_fraction = max_fraction
        self.window = max(1, min(self.WINDOW, steps))
        self.recent: collections.deque[bool] = collections.deque(maxlen=self.window)

    def add(self, skipped: bool) -> None:
        self.recent.append(skipped)

    @property
    def count(self) -> int:
        return sum(self.recent)

    @property
    def diverged(self) -> bool:
        return self.max_fraction < 1 and self.count > self.max_fraction * self.window

    def error(self, step: int, run_dir: Path) -> TrainingDiverged:
        ckpts = list_checkpoints(run_dir)
        kept = (f"the newest checkpoint, {ckpts[-1]}, is kept and no later one was written" if ckpts
                else "no checkpoint was written")
        return TrainingDiverged(
            f"training diverged at step {step}: {self.count} of the last {len(self.recent)} steps had a non-finite "
            f"loss or gradient and were skipped, more than train.max_skipped_fraction={self.max_fraction:g} of "
            f"{self.window}; {kept}; lower optim.lr (or raise optim.warmup_steps / lower optim.grad_clip) and "
            f"start again, or raise train.max_skipped_fraction")


@torch.no_grad()
def update_ema(ema: TARFlow, model: TARFlow, decay: float, step: int) -> None:
    """ema <- decay * ema + (1 - decay) * model, with the decay warmed up as (1 + step) / (10 + step): otherwise
    the initial weights linger in the average for ~1 / (1 - decay) steps, and early sample grids show a much
    worse model than the real one."""
    decay = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave SIGINT / SIGTERM to the main process, which stops at a step boundary; a worker
    that died of the signal would fail the step in progress. They exit with the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def endless(loader: torch.utils.data.DataLoader, sampler: GlobalBatchSampler, step: int) -> Iterator:
    """Endless (x, y) micro-batches, starting at global batch `step` of the epoch sequence."""
    epoch, start = divmod(step, sampler.batches_per_epoch)
    while True:
        sampler.set_epoch(epoch, start)
        yield from loader
        epoch, start = epoch + 1, 0


def resume_from(run_dir: Path, model: TARFlow, ema: TARFlow, head: AlignHead | None, optimizer, scheduler, d: Dist,
                cfg: RunConfig, say) -> tuple[int, int, float]:
    """Load the newest loadable checkpoint of run_dir into everything; returns (step, skipped, elapsed_s)."""
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
    for g, base in zip(optimizer.param_groups, scheduler.base_lrs):  # a run given more steps: its new schedule now
        g["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
    set_rng_state(state, d, cfg.train.seed)
    say(f"resumed {path} at step {int(state['step'])}")
    return int(state["step"]), int(state.get("skipped", 0)), float(state.get("elapsed_s", 0.0))


def set_rng_state(ckpt: dict, d: Dist, seed: int) -> None:
    """Restore this rank's RNG states; with a different process count, reseed from (seed, rank, step)."""
    states = ckpt.get("rng") or []
    if len(states) != d.world_size:
        tqdm.write(f"note: the checkpoint was written by {len(states)} process(es), this run has {d.world_size}; "
                   f"the noise stream is reseeded, so the run continues, though not bit for bit")
        # = seed + rank + 1_000_003 * step: a stream per process and step
        seed_everything(derive_seed(int(ckpt["step"]), seed + d.rank))
        return
    restore_rng_state(states[d.rank], cuda=d.device.type == "cuda")


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


def final_bpd(ema: TARFlow, cfg: RunConfig, step: int, run_dir: Path, d: Dist, say, vae=None) -> float:
    """Test bits/dim of the EMA weights into bpd.json. "bpd" follows rrepa bpd's default, the null label
    (TARFlow's protocol); a conditional model also gets the true-label figure. Both carry their protocol and
    the training noise sigma. A latent run (vae given): bits and nats per latent dimension of the test split's
    latents under the training noise (rrepa.eval.bpd.evaluate_latent_bpd), labelled so."""
    t = cfg.train
    with distributed.main_first(d):
        test_set = eval_dataset(cfg.data, "test", vae, device=d.device, progress=d.is_main, log=say)
    result = evaluate_bpd(ema, test_set, t.eval_batch_size, d, seed=t.seed, conditional=False)
    result.update(split="test", weights="ema", step=step, train_dequantize=t.dequantize, dtype=t.precision)
    lines = [describe_bpd(result)]
    if cfg.model.num_classes > 0:
        cond = evaluate_bpd(ema, test_set, t.eval_batch_size, d, seed=t.seed, conditional=True)
        result.update(bpd_conditional=cond["bpd"], protocol_conditional=cond["protocol"],
                      **({"nats_per_dim_conditional": cond["nats_per_dim"]} if "nats_per_dim" in cond else {}))
        lines.append(describe_bpd(cond))
    if d.is_main:
        atomic_write(run_dir / "bpd.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
        say(f"test split, EMA weights, {result['images']} images: {'; '.join(lines)}")
    return result["bpd"]


def check_not_finished(run_dir: Path, cfg: RunConfig) -> None:
    """--resume of a run that reached train.steps and wrote its final files is refused (it would rewrite them):
    one line saying it is finished and how to train it further. A run stopped between its last checkpoint and
    those files (killed while exporting or measuring bits/dim) is not finished: resuming completes it."""
    ckpts = list_checkpoints(run_dir)
    step = checkpoint_step(ckpts[-1]) if ckpts else 0
    ema = run_dir / "ema.safetensors"
    exported = ema.is_file() and (weights_step(ema) or -1) >= step
    if step >= cfg.train.steps and exported and (not cfg.train.eval_bpd or (run_dir / "bpd.json").is_file()):
        raise ValueError(f"{run_dir} is finished: it reached train.steps={cfg.train.steps} (checkpoint of step "
                         f"{step}) and wrote its final weights, so there is nothing to resume; to train it further, "
                         f"--resume {run_dir} --set train.steps=N with N > {step}")


def check_pinned_files(cfg: RunConfig) -> None:
    """The weight files a config pins (train.eval_weights when evaluating, align.encoder_weights when aligning; a
    path, or a shipped network's name, rrepa.fmnist.shipped) exist: a missing one is an error naming it, before
    anything is built or written, never a network trained in its place."""
    pinned = {"train.eval_weights": cfg.train.eval_weights if cfg.train.eval_every else None,
              "align.encoder_weights": cfg.align.encoder_weights if cfg.align.enabled else None}
    for key, value in pinned.items():  # a shipped name resolves to its checked file (a damaged one fails here)
        if value is not None and not Path(resolve_weights(value)).expanduser().is_file():
            raise FileNotFoundError(f"{key}={value} does not exist (a relative path is relative to the current "
                                    f"folder, {Path.cwd()}); give the path of an existing file, or drop the key to "
                                    f"use the default network")


def check_data_matches_model(dataset, cfg: RunConfig) -> None:
    m = cfg.model
    if (dataset.channels, dataset.image_size, dataset.image_size) != (m.in_channels, m.image_height, m.image_width):
        raise ValueError(f"the data is {dataset.channels} x {dataset.image_size} x {dataset.image_size} but the model "
                         f"takes {m.in_channels} x {m.image_height} x {m.image_width}; set data.image_size or "
                         f"model.in_channels / image_height / image_width to match")
    if m.num_classes and dataset.num_classes != m.num_classes:
        raise ValueError(f"the data has {dataset.num_classes} classes but model.num_classes is {m.num_classes}; "
                         f"set model.num_classes={dataset.num_classes} (or 0 for an unconditional model)")
