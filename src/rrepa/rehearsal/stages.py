"""The stages of a rehearsal (rehearsal.rehearse, which runs them and writes the report): what each one does, through
which of the library's entry points, and what it measures (rrepa.rehearsal.measure)."""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import rrepa.training.loop as training
from rrepa.align.encoders import build_encoder
from rrepa.align.features import FeatureCache
from rrepa.align.head import AlignHead
from rrepa.data.datasets import build_dataset
from rrepa.data.latent_run import ImageSpace, data_config, eval_dataset, is_latent, latent_dataset, load_run_vae
from rrepa.data.latents import LatentCache, image_dataset
from rrepa.distributed import Dist, resolve_device
from rrepa.eval.bpd import evaluate_bpd
from rrepa.eval.npz import read_samples_npz, write_samples_npz
from rrepa.eval.samples import build_feature_network, evaluate_samples
from rrepa.flow.checkpoint import list_checkpoints
from rrepa.flow.jacobi import Jacobi
from rrepa.flow.sample import generate, save_npz
from rrepa.flow.tarflow import TARFlow
from rrepa.precision import autocast, resolve_precision
from rrepa.rehearsal.assets import (
    SD_VAE,
    TINY_VAE,
    save_random_dinov2,
    save_random_inception,
    save_random_vae,
    write_imagenet_folder,
    write_imagenet_npz,
)
from rrepa.rehearsal.measure import (
    Measure,
    SavedTensors,
    children_peak_rss,
    count_flops,
    current_rss,
    human_bytes,
    measure,
    num_params,
    path_bytes,
    tensor_bytes,
)
from rrepa.training.config import RunConfig, resolve
from rrepa.training.objective import Batches, Objective
from rrepa.training.run import load_run, stored_config

PRESETS = ("imagenet64", "imagenet256-latent", "imagenet256-latent-p1")
SCALES = ("full", "tiny")
STAGES = ("data", "vae", "encoder", "inception", "latents", "features", "probe", "train", "resume", "ddp", "sample",
          "jacobi", "decode", "npz", "evaluate", "bpd")
IMAGENET_TRAIN_IMAGES = 1_281_167  # for the disk sizes of the caches at ImageNet's size
# The tiny scale: the same stages with a 2 x 2 flow of width 64, DINOv2-S at 28 px, a small VAE of SD's layout, on
# 16 px (pixels) or 64 px images (latents 4 x 8 x 8).
TINY = ["model.width=64", "model.num_blocks=2", "model.layers_per_block=2", "align.positions=[[1, 1], [2, 1]]",
        "align.projector_hidden=64", "align.encoder=dinov2_vits14", "align.encoder_image_size=28",
        "train.num_workers=0"]
TINY_PIXELS = ["data.image_size=16", "model.image_height=16", "model.image_width=16"]
TINY_LATENTS = ["data.image_size=64", "model.image_height=8", "model.image_width=8"]


class RehearsalError(ValueError):
    """A stage of a rehearsal failed; the message names the stage and where its traceback went."""


@dataclass
class Rehearsal:
    """What to rehearse: a preset at a scale, in a work folder (data, weights, runs and the report go there)."""

    preset: str
    work: Path
    scale: str = "full"
    batch: int = 2  # optim.batch_size of the training stages (global: split over the processes)
    probe_batches: tuple[int, int] = (1, 2)  # the two batch sizes of the probe's training steps
    samples: int = 4  # images drawn by each sampler (one batch), evaluated and written to the npz
    guidance: float = 1.0
    train_images: int = 4
    test_images: int = 2
    device: str = "auto"
    ddp: bool = False
    skip: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.work = Path(self.work)
        if self.preset not in PRESETS:
            raise ValueError(f"rehearse takes an ImageNet preset ({', '.join(PRESETS)}), got {self.preset!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        unknown = sorted(set(self.skip) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)} to skip; the stages are {', '.join(STAGES)}")
        small = min(self.batch, *self.probe_batches, self.samples, self.test_images)
        if small < 1 or self.train_images < max(self.batch, 4) or len(self.probe_batches) != 2 \
                or self.probe_batches[0] >= self.probe_batches[1]:
            raise ValueError(f"need batch, samples, test images >= 1, two increasing probe batches and at least "
                             f"max(batch, 4) training images; got batch {self.batch}, probe {self.probe_batches}, "
                             f"samples {self.samples}, images {self.train_images} / {self.test_images}")

    @property
    def folder(self) -> Path:
        """Where this rehearsal's files go: <work>/<preset>[-tiny]."""
        return self.work / (self.preset + ("-tiny" if self.scale == "tiny" else ""))


class StageRun:
    """The state the stages share: config, paths, device, the trained run, the samples; and the measurements."""

    def __init__(self, r: Rehearsal, log: Callable[[str], None]):
        self.r, self.log, self.dir = r, log, r.folder
        self.device = resolve_device(r.device)
        self.latent = r.preset != "imagenet64"
        tiny = r.scale == "tiny"
        assets = r.work / "weights"  # shared by the presets of a work folder
        self.paths = {"data": self.dir / "data", "run": self.dir / "run", "latents": self.dir / "latents",
                      "vae": assets / ("sd-vae-tiny" if tiny else "sd-vae"),
                      "encoder": assets / ("dinov2_vits14.safetensors" if tiny else "dinov2_vitb14.safetensors"),
                      "inception": assets / "inception-fid.pth", "samples": self.dir / "samples.npz",
                      "ref": self.dir / "reference.npz", "features": self.dir / "features"}
        sets = [f"data.path={self.paths['data']}", "align.enabled=true",
                f"align.encoder_weights={self.paths['encoder']}", f"optim.batch_size={r.batch}", "train.steps=2",
                "train.log_every=1", "train.sample_every=0", "train.sample_rows=0", "train.eval_bpd=false",
                "train.keep_last=1"]
        if self.latent:
            sets += [f"data.vae={self.paths['vae']}", f"data.latent_cache={self.paths['latents']}"]
        if tiny:
            sets += TINY + (TINY_LATENTS if self.latent else TINY_PIXELS)
        self.overrides = [*sets, *r.overrides]
        self.cfg: RunConfig = resolve(r.preset, None, self.overrides)
        # On the CPU the loader runs in the process: each forked worker of a ~15 GB process costs memory a 24 GB
        # machine does not have, for 4 synthetic images. Elsewhere at most one worker per core.
        workers = 0 if self.device.type == "cpu" else min(self.cfg.train.num_workers, os.cpu_count() or 1)
        if not tiny and self.cfg.train.num_workers != workers:
            self.overrides.append(f"train.num_workers={workers}")
            self.cfg = resolve(r.preset, None, self.overrides)
        self.precision = resolve_precision(self.cfg.train.precision, self.device)
        self.stages: list[Measure] = []
        self.notes: list[str] = []
        self.facts: dict = {}
        self.model = self.labels = self.x = None

    def stage(self, name: str) -> contextlib.AbstractContextManager[Measure]:
        self.log(f"--- {name}")
        return measure(name, self.device)

    def keep(self, m: Measure) -> None:
        self.stages.append(m)
        self.log(f"    {m.seconds:.1f} s, peak {human_bytes(m.peak_bytes)} ({m.memory})")

    def d(self) -> Dist:
        return Dist(device=self.device)


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------


def stage_data(run: StageRun) -> Measure:
    r, cfg = run.r, run.cfg
    with run.stage("data") as m:
        write = write_imagenet_npz if cfg.data.name == "npz" else write_imagenet_folder
        size = cfg.data.image_size
        write(run.paths["data"], size, r.train_images, r.test_images)
        train = image_dataset(cfg.data, "train")
        write_samples_npz(run.paths["ref"], torch.stack([train.uint8(i) for i in range(len(train))]))
    m.info.update(bytes=path_bytes(run.paths["data"]), note=f"{cfg.data.name} layout, {r.train_images} + "
                  f"{r.test_images} images at {size} px, {train.num_classes} classes")
    return m


def stage_vae(run: StageRun) -> Measure:
    with run.stage("vae") as m:
        path = save_random_vae(run.paths["vae"], TINY_VAE if run.r.scale == "tiny" else SD_VAE)
        vae = load_run_vae(run.cfg.data, run.device)
        m.info.update(params=num_params(vae.model), bytes=path_bytes(path),
                      note=f"AutoencoderKL, x{vae.factor}, {vae.latent_channels} latent channels, random weights")
    return m


def stage_encoder(run: StageRun) -> Measure:
    a = run.cfg.align
    with run.stage("encoder") as m:
        save_random_dinov2(run.paths["encoder"], a.encoder)
        enc = build_encoder(a.encoder, a.encoder_weights, a.encoder_image_size, run.device)
        x = torch.rand(1, 3, run.cfg.data.image_size, run.cfg.data.image_size) * 2 - 1
        with count_flops() as flops:
            tokens = enc(x)
    gh, gw = enc.grid(x.shape[-2:])
    m.info.update(params=num_params(enc), bytes=path_bytes(run.paths["encoder"]), flops=flops.get_total_flops(),
                  note=f"{a.encoder} at {enc.image_size} px: {gh} x {gw} tokens of {tokens.shape[-1]}; FLOPs per image")
    run.facts.update(encoder_params=num_params(enc), encoder_flops_per_image=flops.get_total_flops())
    return m


def stage_inception(run: StageRun) -> Measure:
    with run.stage("inception") as m:
        path = save_random_inception(run.paths["inception"])
        net = build_feature_network("inception", inception_weights=str(path), device=run.device)
    m.info.update(params=num_params(net.net), bytes=path_bytes(path), note="torch-fidelity FID-Inception, random")
    return m


def stage_latents(run: StageRun) -> Measure:
    cfg = run.cfg
    with run.stage("latents") as m:
        vae = load_run_vae(cfg.data, run.device)
        for split, flip in (("train", cfg.data.hflip), ("test", False)):  # = rrepa latents encode [--flip]
            LatentCache.build_or_open(run.paths["latents"] / split, vae, image_dataset(cfg.data, split), split=split,
                                      flip=flip, sample=cfg.data.latent_sample, dtype=cfg.data.latent_dtype,
                                      device=run.device, progress=True, log=run.log)
    cache = LatentCache.open(run.paths["latents"] / "train")
    per_image = path_bytes(cache.path) / len(cache)
    m.info.update(bytes=path_bytes(run.paths["latents"]), note=f"{len(cache)} + {run.r.test_images} images, flips "
                  f"{cache.flips}: ImageNet's train split would take {human_bytes(per_image * IMAGENET_TRAIN_IMAGES)}")
    return m


def stage_features(run: StageRun) -> Measure:
    a = run.cfg.align
    with run.stage("features") as m:
        enc = build_encoder(a.encoder, a.encoder_weights, a.encoder_image_size, run.device)
        cache = FeatureCache.build_or_load(enc, image_dataset(run.cfg.data, "train"), run.paths["features"],
                                           hflip=run.cfg.data.hflip, log=run.log)
    per_image = path_bytes(cache.path) / len(cache)
    m.info.update(bytes=path_bytes(cache.path), note=f"feature cache (the presets compute targets online): "
                  f"ImageNet's train split would take {human_bytes(per_image * IMAGENET_TRAIN_IMAGES)}")
    return m


def _training_set(run: StageRun, say: Callable[[str], None]):
    """(the dataset, the clean images) as rrepa.training.loop builds them."""
    cfg = run.cfg
    if is_latent(cfg.data):
        vae = load_run_vae(cfg.data, run.device, log=say)
        return latent_dataset(cfg.data, vae, "train", hflip=cfg.data.hflip, device=run.device, log=say), \
            image_dataset(cfg.data, "train")
    data = build_dataset(cfg.data, "train")
    return data, data


def stage_probe(run: StageRun) -> list[Measure]:
    """One training step as rrepa.training.loop takes it (Batches, Objective, AdamW, EMA), after a warm-up step that
    allocates the optimiser's state, at each probe batch size: FLOPs, activation bytes, peak memory."""
    cfg, d, say = run.cfg, run.d(), (lambda msg: None)
    rss_before = current_rss()
    dataset, images = _training_set(run, say)
    batches = Batches(cfg, images, d, say)
    items = batches.wrap(dataset, cfg.data.hflip)
    torch.manual_seed(cfg.train.seed)
    model = TARFlow(cfg.model).to(run.device)
    model.validate_inputs = False
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    head = AlignHead(cfg.align, cfg.model.width, batches.dim).to(run.device) if batches.aligned else None
    objective = Objective(model, head)
    trainable = list(objective.parameters())
    optimizer, _ = training.build_optimizer(trainable, cfg, d)
    out = []
    for i, b in enumerate((run.r.probe_batches[0], *run.r.probe_batches)):
        batch = torch.utils.data.default_collate([items[j % len(items)] for j in range(b)])
        with run.stage(f"probe b={b}") as m:
            with count_flops() as enc_flops:
                x, y, tokens = batches.split(batch)
            x = training.augment(x, cfg.model.sigma, cfg.train.dequantize)
            with count_flops() as flops, SavedTensors(trainable) as saved:
                with autocast(run.precision, run.device):
                    loss, _ = objective(x, y, cfg.train.label_drop, tokens, batches.hw)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
            optimizer.step()
            training.update_ema(ema, model, cfg.train.ema_decay, i)
            optimizer.zero_grad(set_to_none=True)
        if i == 0:
            continue  # the warm-up step: AdamW's state appears here
        m.info.update(batch=b, flops=flops.get_total_flops(), encoder_flops=enc_flops.get_total_flops(),
                      saved_bytes=saved.bytes, params=num_params(objective),
                      note=f"one R-REPA step ({run.precision}): activations saved {human_bytes(saved.bytes)}")
        out.append(m)
    adam = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)
    run.facts.update(flow_params=model.num_params(), projector_params=num_params(head), weights_bytes=tensor_bytes(
        objective), ema_bytes=tensor_bytes(ema), adam_bytes=adam, grad_bytes=4 * num_params(objective),
        encoder_bytes=tensor_bytes(batches.encoder), rss_before_probe=rss_before, precision=run.precision)
    del model, ema, head, objective, optimizer, batches, trainable
    gc.collect()
    return out


def stage_train(run: StageRun) -> list[Measure]:
    out = []
    with run.stage("train") as m:
        summary = training.train(run.cfg, run.paths["run"], overwrite=True, device=str(run.device))
    ckpt = list_checkpoints(run.paths["run"])[-1]
    m.info.update(bytes=path_bytes(ckpt), params=TARFlow(run.cfg.model).num_params(),
                  note=f"{summary['step']} steps of batch {run.cfg.optim.batch_size}; bytes: {ckpt.name} (ema."
                       f"safetensors {human_bytes(path_bytes(run.paths['run'] / 'ema.safetensors'))})")
    out.append(m)
    run.facts.update(checkpoint_bytes=path_bytes(ckpt), train_batch=run.cfg.optim.batch_size,
                     train_peak_bytes=m.peak_bytes, train_memory=m.memory)
    if "resume" not in run.r.skip:
        cfg = stored_config(run.paths["run"], ["train.steps=3"])
        with run.stage("resume") as m:
            summary = training.train(cfg, run.paths["run"], resume=True, device=str(run.device))
        m.info.update(bytes=path_bytes(list_checkpoints(run.paths["run"])[-1]),
                      note=f"--resume by one step, to step {summary['step']}")
        out.append(m)
    return out


def stage_ddp(run: StageRun) -> Measure:
    """`torchrun --nproc_per_node 2 -m rrepa.cli train`: NCCL where two GPUs are, gloo on the CPU elsewhere."""
    gpus = torch.cuda.device_count() if run.device.type == "cuda" else 0
    device = "cuda" if gpus >= 2 else "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rrepa.cli",
           "train", "--preset", run.r.preset, "--out", str(run.dir / "run-ddp"), "--overwrite", "--device", device,
           *[a for o in run.overrides for a in ("--set", o)], "--set", "train.steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with run.stage("ddp") as m:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the DDP stage (torchrun --nproc_per_node 2 ... train) failed with exit {done.returncode}: "
                           f"{last}")
    m.info.update(note=f"torchrun, 2 processes ({'NCCL' if device == 'cuda' else 'gloo'}), 1 step; peak of a worker")
    m.peak_bytes, m.memory = children_peak_rss(), "peak RSS of a worker"
    return m


def stage_sample(run: StageRun, jacobi: bool) -> Measure:
    """`rrepa sample --guidance W [--sampler jacobi]`: the EMA weights, labels cycling through the classes."""
    if run.model is None:
        run.model, _ = load_run(run.paths["run"], "ema", run.device)
    K = run.model.cfg.num_classes
    run.labels = torch.arange(run.r.samples) % K if K else None
    sampler = Jacobi() if jacobi else "sequential"
    with run.stage("jacobi" if jacobi else "sample") as m:
        with autocast(run.precision, run.device):
            parts, stats = generate(run.model, run.labels, run.r.samples, run.r.samples, 0, run.d(),
                                    guidance=run.r.guidance, sampler=sampler, return_stats=True)
    x = torch.cat([parts[j] for j in sorted(parts)])
    note = f"{run.r.samples} samples, guidance {run.r.guidance:g}, {run.precision}"
    if jacobi:
        passes = sum(stats.passes())
        diff = float((x - run.x).abs().max()) if run.x is not None else float("nan")
        note += f"; {passes:.0f} passes in all (sequential: {len(stats.passes()) * (run.model.cfg.num_tokens - 1)})" \
                f", max |x - sequential's| {diff:.1e}"
    else:
        run.x = x
    m.info.update(note=note)
    return m


def stage_decode(run: StageRun) -> Measure:
    with run.stage("decode") as m:
        space = ImageSpace.for_run(run.cfg, run.device)
        run.x = space(run.x.to(run.device)).cpu()
    m.info.update(note=f"{space.describe()}: {tuple(run.x.shape)}")
    return m


def stage_npz(run: StageRun) -> Measure:
    with run.stage("npz") as m:
        save_npz(run.paths["samples"], run.x, run.labels)
        images, _ = read_samples_npz(run.paths["samples"])
    m.info.update(bytes=path_bytes(run.paths["samples"]), note=f"ADM layout: arr_0 {images.shape} uint8, labels")
    return m


def stage_evaluate(run: StageRun) -> Measure:
    """`rrepa evaluate --samples S.npz --ref REF.npz --features inception --inception-weights W`."""
    with run.stage("evaluate") as m:
        net = build_feature_network("inception", inception_weights=str(run.paths["inception"]), device=run.device)
        images, labels = read_samples_npz(run.paths["samples"])
        res = evaluate_samples(images, net, str(run.paths["ref"]), labels=labels, cache=False, progress=True,
                               fid_method="eigh" if run.r.scale == "tiny" else "sqrtm")
    m.info.update(note=f"FID {res['fid']:.1f}, sFID {res['sfid']:.1f}, IS {res['is']:.2f} (random networks: "
                       f"numbers without meaning) vs {res['num_ref']} reference images")
    return m


def stage_bpd(run: StageRun) -> Measure:
    """`rrepa bpd --ckpt RUN --max-images N` (the null label)."""
    model = run.model if run.model is not None else load_run(run.paths["run"], "ema", run.device)[0]
    with run.stage("bpd") as m:
        data = data_config(run.cfg.data)
        vae = load_run_vae(data, run.device) if is_latent(data) else None
        dataset = eval_dataset(data, "test", vae, device=run.device)
        with autocast(run.precision, run.device):
            result = evaluate_bpd(model, dataset, run.r.test_images, run.d(), conditional=False,
                                  max_images=run.r.test_images)
    m.info.update(note=f"{result['bpd']:.4f} {result.get('unit', 'bits/dim')} ({result['protocol']}) on "
                       f"{result['images']} test images")
    return m
