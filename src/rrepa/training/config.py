"""The configuration of a training run: model, data, optimiser, loop and alignment, resolved in three layers.

    preset (--preset fmnist)  ->  YAML file (--config f.yaml)  ->  --set key=value (repeatable)

Each layer only names what it changes. Keys are dotted paths into the five sections (`model.width`,
`optim.lr`, `train.steps`, `data.path`, `align.strategy`); list values are YAML (`--set
'align.positions=[[4, 2]]'`); a misspelt key is an error that lists the closest valid ones.
The resolved config is written as `config.yaml` into the run folder and stored in every checkpoint,
so `RunConfig.from_dict(yaml.safe_load(...))` rebuilds the run exactly.
"""

from __future__ import annotations

import difflib
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from rrepa.align.head import AlignConfig
from rrepa.data.datasets import DataConfig
from rrepa.flow.config import FlowConfig
from rrepa.precision import check_precision

EVAL_FEATURES = ("fmnist", "inception")
DEFAULT_PRESET = "default"  # what `rrepa train` (and resolve) take without a preset: the default job
SCHEDULES = ("cosine", "wsd")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then cosine decay (TARFlow's recipe; docs/DESIGN.md section 1) or constant with a
    linear cool-down at the end (wsd)."""

    lr: float = 1e-4  # peak learning rate, reached after warmup_steps
    min_lr_ratio: float = 0.0  # the schedule ends at min_lr_ratio * lr at the last step
    warmup_steps: int = 1000  # linear warm-up from 0
    # cosine: decays from the end of the warm-up to the last step | wsd: warm-up, stable (constant), decay (linear,
    # over the last cooldown_fraction of the steps). A cosine over a short run lowers the lr before the model has
    # learnt (results/fmnist-long); wsd keeps it up until the cool-down.
    schedule: str = "cosine"
    cooldown_fraction: float = 0.2  # wsd: the share of train.steps the linear cool-down takes
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (beta1, beta2)
    weight_decay: float = 1e-4  # applied to matrices and embeddings only, not to biases and norms
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    batch_size: int = 256  # global batch per optimiser step, split over processes and accumulation steps
    grad_accum: int = 1  # micro-batches per process per step (to fit memory; the global batch is unchanged)


@dataclass
class TrainConfig:
    """The training loop. The noise level of the augmentation y = x + sigma * eps is model.sigma."""

    steps: int = 100_000  # optimiser steps
    label_drop: float = 0.1  # probability of training a label as the null label (for guidance)
    ema_decay: float = 0.9999  # EMA of the weights (samples, evaluation); the decay at step s is min(this,
    # (1+s)/(10+s)), so this has no effect before step 1,790 for 0.995 (results/default-job)
    # auto | fp32 | bf16 (rrepa.precision): bf16 autocast for training, evaluation and sampling; auto = bf16 where
    # the device computes it natively (CUDA >= Ampere, AVX512_BF16 / AMX / arm64 BF16 CPUs), else fp32. A run
    # stores the resolved choice in its config.yaml and checkpoints, so a resume keeps it.
    precision: str = "auto"
    compile: bool = False  # torch.compile the flow
    # Recompute each transformer layer in the backward instead of keeping its activations: the same gradients,
    # one more forward of compute, activations per sample down to each layer's input (rrepa rehearse --plan says
    # where the paper's batch needs it).
    activation_checkpointing: bool = False
    seed: int = 0  # seeds the model init, the data order and (plus the rank) the noise
    # Uniform dequantization of the 8-bit training images, x = (pixel + u) / 128 - 1 with u ~ U[0, 1): TARFlow's
    # likelihood protocol (docs/DESIGN.md section 7); with model.sigma=0, bits/dim comparable with its figures.
    dequantize: bool = False
    num_workers: int = 2  # DataLoader workers per process; 0 loads in the main process
    log_every: int = 100  # steps between lines in metrics.jsonl / TensorBoard
    sample_every: int = 5000  # steps between sample grids (EMA weights, fixed noise); 0 = only at the end
    sample_rows: int = 10  # rows of the grid; one column per class (8 columns if unconditional); 0: no grids
    sample_guidance: float = 0.0  # guidance w of the grid samples
    sample_temperature: float = 1.0  # std of the grid's prior noise; < 1 trades diversity for cleaner images
    ckpt_every: int = 5000  # steps between checkpoints; one is always written at the end
    keep_last: int = 3  # checkpoints kept on disk (older ones are deleted); 0 = keep all
    # Stop with an error (no further checkpoint, no final weights) when more than this fraction of the last 100
    # steps (of all steps in a shorter run) were skipped as non-finite: the run has diverged; 1 = never stop.
    max_skipped_fraction: float = 0.5
    eval_bpd: bool = True  # compute the test-split bits/dim with the EMA weights at the end
    eval_batch_size: int = 500  # batch of that evaluation (and of the samples of eval_every)
    # Sample quality during training: every eval_every steps (0 = off) FID, IS, precision / recall (and the
    # class accuracy with the fmnist evaluator) of eval_samples EMA samples (fixed noise, labels cycling
    # through the classes) against the training split's reference statistics (computed once, cached).
    eval_every: int = 0
    eval_samples: int = 1000
    eval_features: str = "fmnist"  # fmnist (the embedded Fashion-MNIST CNN) | inception (FID-Inception)
    eval_ref: str | None = None  # reference: None = the training split (fmnist:train, or data.path for npz)
    # Weights of that feature network (fmnist: an evaluator .safetensors; inception: the FID-Inception .pth); None =
    # the default (fmnist: the evaluator rrepa ships; inception: the cached file). A retrained evaluator gives other
    # FIDs: pin it to compare runs with it.
    eval_weights: str | None = None
    eval_guidance: float = 0.0  # guidance w of those samples
    # With eval_every, also the one-step and Bayes classifiers' top-1 (inputs at the training noise) and the
    # bits/dim (uniform dequantization, true labels) of the first eval_test_images test images; 0 = skip them.
    eval_test_images: int = 0


@dataclass
class RunAlignConfig(AlignConfig):
    """Representation alignment during training (docs/DESIGN.md section 2): loss = NLL + weight * align loss.
    The fields above `enabled` are rrepa.align.head.AlignConfig's (positions, strategy, reverse, jacobi_steps,
    encoder, weight, projector_hidden, grid_mode, projector, target_norm)."""

    enabled: bool = False  # off: no encoder is built and a step costs what it costs without alignment
    encoder_weights: str | None = None  # local weights file of the encoder (DINOv2 .pth / timm file; fmnist-ssl)
    encoder_image_size: int | None = None  # side the encoder resizes its input to (DINOv2: multiple of 14)
    # Precompute the targets of every training image (and its mirror with data.hflip) once into a disk cache
    # (rrepa.align.features); off: the frozen encoder runs on every batch. Only for datasets whose cache fits on disk.
    feature_cache: bool = False
    feature_cache_dir: str | None = None  # default <cache>/features (<cache>: $RREPA_CACHE_DIR or ~/.cache/rrepa)


@dataclass
class RunConfig:
    model: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    align: RunAlignConfig = field(default_factory=RunAlignConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        d = asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])  # plain YAML, no python/tuple tag
        d["align"]["positions"] = [list(p) for p in d["align"]["positions"]]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        return merge(cls(), d, source="config")

    def validate(self) -> None:
        """Cross-section checks that need the whole config (field types are checked on merge)."""
        o, t = self.optim, self.train
        for name, value in (("optim.batch_size", o.batch_size), ("optim.grad_accum", o.grad_accum),
                            ("train.steps", t.steps), ("train.log_every", t.log_every),
                            ("train.ckpt_every", t.ckpt_every), ("train.eval_batch_size", t.eval_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if o.schedule not in SCHEDULES or not 0 < o.cooldown_fraction <= 1:
            raise ValueError(f"need optim.schedule in {', '.join(SCHEDULES)} and 0 < optim.cooldown_fraction <= 1, got "
                             f"{o.schedule!r}, {o.cooldown_fraction}")
        if o.lr <= 0 or o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1:
            raise ValueError(f"need optim.lr > 0, optim.warmup_steps >= 0 and 0 <= optim.min_lr_ratio <= 1, got "
                             f"{o.lr}, {o.warmup_steps}, {o.min_lr_ratio}")
        if not 0 <= t.label_drop < 1 or not 0 <= t.ema_decay < 1:
            raise ValueError(f"need 0 <= train.label_drop < 1 and 0 <= train.ema_decay < 1, got "
                             f"{t.label_drop}, {t.ema_decay}")
        if t.sample_every < 0 or t.keep_last < 0 or t.num_workers < 0 or t.sample_rows < 0:
            raise ValueError("train.sample_every, train.keep_last, train.num_workers and train.sample_rows must be "
                             ">= 0")
        if t.sample_guidance < 0 or t.sample_temperature <= 0:
            raise ValueError(f"need train.sample_guidance >= 0 and train.sample_temperature > 0, got "
                             f"{t.sample_guidance}, {t.sample_temperature}")
        if t.eval_test_images < 0:
            raise ValueError(f"train.eval_test_images must be >= 0 (0 = no classification or bits/dim during "
                             f"training), got {t.eval_test_images}")
        if t.eval_every < 0 or t.eval_samples < 2 or t.eval_guidance < 0:
            raise ValueError(f"need train.eval_every >= 0, train.eval_samples >= 2 and train.eval_guidance >= 0, "
                             f"got {t.eval_every}, {t.eval_samples}, {t.eval_guidance}")
        if not 0 < t.max_skipped_fraction <= 1:
            raise ValueError(f"train.max_skipped_fraction must lie in (0, 1] (1 = never stop), got "
                             f"{t.max_skipped_fraction}")
        check_precision(t.precision, "train.precision")
        if t.eval_features not in EVAL_FEATURES:
            raise ValueError(f"train.eval_features must be one of {', '.join(EVAL_FEATURES)}, got {t.eval_features!r}")
        a, m, d = self.align, self.model, self.data
        if d.vae:  # latents: the model's grid is the VAE's latent grid (checked against the VAE when it is loaded)
            if t.dequantize:
                raise ValueError("train.dequantize is for 8-bit images; a latent run (data.vae set) trains on "
                                 "continuous latents: set train.dequantize=false")
            ratio = d.image_size // max(m.image_height, 1)
            if d.image_size != ratio * m.image_height or m.image_height != m.image_width or ratio & (ratio - 1):
                raise ValueError(f"data.image_size {d.image_size} is not a power-of-two multiple of the model's "
                                 f"{m.image_height} x {m.image_width} latent grid (a VAE halves the side per stage); "
                                 f"set data.image_size or model.image_height / image_width")
        elif (d.image_size, d.image_size) != (m.image_height, m.image_width):
            raise ValueError(f"data.image_size {d.image_size} does not match the model's {m.image_height} x "
                             f"{m.image_width} images; set data.image_size or model.image_height / image_width")
        if a.enabled:
            m.check_positions(a.positions, "align.positions entry")
            if a.encoder_image_size is not None and a.encoder_image_size < 1:
                raise ValueError(f"align.encoder_image_size must be >= 1, got {a.encoder_image_size}")

    def micro_batch(self, world_size: int) -> int:
        """Images per process per forward pass: batch_size / (world_size * grad_accum), which must divide."""
        b, a = self.optim.batch_size, self.optim.grad_accum
        if b % (world_size * a):
            raise ValueError(f"optim.batch_size {b} is not divisible by {world_size} processes x optim.grad_accum "
                             f"{a}; pick a batch size that is a multiple of {world_size * a}")
        return b // (world_size * a)


def resolve(preset: str = DEFAULT_PRESET, config_file: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """preset, then the YAML file, then `key=value` overrides; returns the validated RunConfig."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = merge(RunConfig(), PRESETS[preset], source=f"preset {preset}")
    if config_file is not None:
        cfg = merge(cfg, load_yaml(config_file), source=config_file)
    cfg = merge(cfg, parse_overrides(overrides), source="--set")
    cfg.validate()
    return cfg


def preset_model(name: str, **overrides) -> FlowConfig:
    """The FlowConfig of a preset, with optional field overrides (for benchmarks and tests)."""
    return replace(resolve(name).model, **overrides)


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The parsed YAML file; a missing file or invalid YAML is a one-line error naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err


def load_yaml(path: str | Path) -> dict[str, Any]:
    d = read_yaml(path)
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a mapping of sections (model:, data:, optim:, train:, align:), "
                         f"got a {type(d).__name__}")
    return d


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['optim.lr=3e-4', 'model.width=256'] -> {'optim.lr': '3e-4', ...}; values are typed on merge."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes key=value (e.g. --set optim.lr=3e-4), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def valid_keys() -> list[str]:
    """Every dotted key, e.g. 'optim.lr'."""
    cfg = RunConfig()
    return [f"{s.name}.{f.name}" for s in fields(cfg) for f in fields(getattr(cfg, s.name))]


def merge(cfg: RunConfig, changes: Mapping[str, Any], source: str) -> RunConfig:
    """A copy of cfg with changes applied; changes is nested ({'optim': {'lr': 1e-3}}) or dotted
    ({'optim.lr': '1e-3'}) or both. Strings are parsed into the field's type."""
    sections = {f.name: getattr(cfg, f.name) for f in fields(RunConfig)}
    updates: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in _legacy(_flatten(changes), source).items():
        section, _, name = key.partition(".")
        if section not in sections or name not in {f.name for f in fields(sections[section])}:
            close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}?" if close else f"valid sections are {', '.join(sections)}"
            raise KeyError(f"unknown config key {key!r} in {source}; {hint} (`rrepa train --print-config` "
                           f"lists every key)")
        hints = typing.get_type_hints(type(sections[section]))
        updates[section][name] = _coerce(value, hints[name], f"{key} in {source}")
    return RunConfig(**{name: replace(obj, **updates[name]) for name, obj in sections.items()})


def _legacy(changes: dict[str, Any], source: str) -> dict[str, Any]:
    """Keys of older rrepa versions, translated with a one-line note: train.bf16 (bf16 autocast on CUDA, float32 on
    the CPU) becomes train.precision (true: auto, false: fp32) unless train.precision is also given. Configs
    stored by runs of those versions (config.yaml, checkpoints) keep loading."""
    if "train.bf16" not in changes:
        return changes
    changes = dict(changes)
    value = _coerce(changes.pop("train.bf16"), bool, f"train.bf16 in {source}")
    if "train.precision" in changes:
        note = f"ignored, since train.precision={changes['train.precision']} is given too"
    else:
        changes["train.precision"] = "auto" if value else "fp32"
        note = f"read as train.precision={changes['train.precision']} (auto | fp32 | bf16, for every device)"
    warnings.warn(f"train.bf16 in {source} is deprecated: {note}", FutureWarning, stacklevel=3)
    return changes


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        key = f"{prefix}{key}"
        # A mapping at the top level is a section; below it, only dotted keys make sense.
        if isinstance(value, Mapping) and not prefix:
            out.update(_flatten(value, f"{key}."))
        else:
            out[key] = value
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """value (from YAML or a --set string) as type tp: int, float, bool, str, X | None, X | Y (the first that fits),
    tuple[...], tuple[X, ...] or list[X]."""
    if isinstance(value, str) and tp is not str:
        value = yaml.safe_load(value) if value.strip() else None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None, or X | Y (model.layers_per_block: int | tuple[int, ...])
        options = [a for a in args if a is not type(None)]
        null = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if null and len(options) < len(args):
            return None
        if len(options) == 1:
            return _coerce(value, options[0], where)
        for option in options:
            try:
                return _coerce(value, option, where)
            except ValueError:
                continue
        names = [f"a list of {typing.get_args(a)[0].__name__}" if typing.get_origin(a) in (tuple, list)
                 else getattr(a, "__name__", str(a)) for a in options]
        raise ValueError(f"{where}: expected {' or '.join(names)}, got {value!r}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: a list of any length
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list like [4, 1, 1, 1], got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} numbers like [0.9, 0.95], got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list like [[4, 2]], got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    try:
        if tp is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if tp is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise ValueError(f"{where}: unsupported field type {tp}")
    raise ValueError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Presets: the one registry. Each names its whole setting (model, data, optimiser, loop, alignment and
# evaluation), so that no section falls back on a default meant for another dataset.
# --------------------------------------------------------------------------------------------

# The Fashion-MNIST presets share fmnist's optimiser, loop and alignment: 2 CPU cores, at most 15 minutes.
FMNIST_OPTIM = {"lr": 1e-3, "warmup_steps": 100, "batch_size": 128, "min_lr_ratio": 0.05}
# precision fp32, not auto: bf16 trains ~2x faster on CPUs with AMX / AVX512_BF16 (benchmarks/bench_precision.py), but
# in results/fmnist-precision (2 seeds, paired) bf16 R-REPA lost 2.1 points of Bayes top-1 on both seeds, its whole
# gain over the baseline; the baseline lost nothing (`--set train.precision=auto` is safe without alignment).
FMNIST_TRAIN = {"steps": 1200, "ema_decay": 0.995, "num_workers": 0, "log_every": 20, "sample_every": 300,
                "ckpt_every": 300, "sample_guidance": 2.0, "sample_temperature": 0.8, "eval_features": "fmnist",
                "precision": "fp32"}
# Alignment (off unless align.enabled=true): the embedded self-supervised encoder (7 x 7 x 128 tokens,
# the same grid as the 7 x 7 patch-4 flow tokens) with a cached target per training image (0.75 GB).
# Position: the paper aligns layer 6 (of 8) of blocks 7 and 8 (of 8), i.e. the deep end of the last
# blocks, the first ones on the generative path, where the reverse gradient reaches the fewest blocks
# (blocks t..T) and the features are most semantic. For a 4 x 2 model the analogue is the deepest layer
# of the last block: (4, 2) (one position, since the model has half the blocks and a quarter of the
# layers). The projector is narrowed to 512 (REPA's 2048 would outweigh the 1.6 M parameter flow).
FMNIST_ALIGN = {"encoder": "fmnist-ssl", "positions": [[4, 2]], "strategy": "reverse", "reverse": "pseudo",
                "projector_hidden": 512, "feature_cache": True}
# The ImageNet presets share the paper's optimiser and alignment (DINOv2-B/14, layer 6 of blocks 7 and 8, R-REPA
# pseudo; targets online: a cache of ImageNet would need ~0.5 TB).
IMAGENET_OPTIM = {"lr": 1e-4, "warmup_steps": 1000, "batch_size": 256, "min_lr_ratio": 0.0}
IMAGENET_ALIGN = {"encoder": "dinov2_vitb14", "positions": [[7, 6], [8, 6]], "strategy": "reverse",
                  "reverse": "pseudo", "projector_hidden": 2048, "feature_cache": False}

# The paper's 256 x 256 Latent-TARFlow (docs/DESIGN.md section 4): SD-VAE (stabilityai/sd-vae-ft-ema, scaling
# 0.18215) latents 4 x 32 x 32 of ADM-cropped ImageNet 256 images from an ImageNet-layout folder (pass data.path;
# train/ and val/), patch 2 (256 tokens), sigma 0.2, the imagenet64 model (8 x 8, width 768) and recipe (batch
# 256, lr 1e-4, warm-up 1000, 1M steps, EMA 0.9999), random flips (the cache stores both mirrors' latents, 2 x
# 10.5 GB), FID-Inception on the decoded images. Alignment as imagenet64: DINOv2-B/14 tokens of the clean 256 px
# images (resized to 224: 16 x 16, pooled onto the 16 x 16 token grid 1:1) at layer 6 of blocks 7 and 8,
# R-REPA pseudo, targets online. Offline, give a local VAE copy with data.vae=PATH.
IMAGENET256_LATENT = {
    "model": {"in_channels": 4, "image_height": 32, "image_width": 32, "patch_size": 2, "width": 768,
              "num_blocks": 8, "layers_per_block": 8, "num_classes": 1000, "sigma": 0.2},
    "data": {"name": "folder", "image_size": 256, "hflip": True, "vae": "stabilityai/sd-vae-ft-ema"},
    "optim": IMAGENET_OPTIM,
    "train": {"steps": 1_000_000, "ema_decay": 0.9999, "num_workers": 8, "eval_features": "inception"},
    "align": IMAGENET_ALIGN,
}

# The latent Fashion-MNIST model and data (fmnist-latent below, and the default job).
FMNIST_LATENT_MODEL = {"in_channels": 4, "image_height": 7, "image_width": 7, "patch_size": 1, "width": 128,
                       "num_blocks": 4, "layers_per_block": 2, "num_classes": 10, "sigma": 0.2}
FMNIST_LATENT_DATA = {"name": "fmnist", "image_size": 28, "vae": "fmnist-vae"}
DEFAULT_STEPS = 2000

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The default job (`rrepa train`, `make demo`), chosen by measurement (experiments/fmnist-recipe.yaml and
    # default-job.yaml): latents of the shipped fmnist-vae (~100 FID ahead of pixels); wsd (a cosine spanning a short
    # run lowers the lr before the model has learnt) at 3x fmnist's lr; 2,000 steps of 128 (10 minutes as `make demo`
    # runs it, 2 DDP processes on an idle 2-core Xeon); bf16 where native (the baseline lost nothing to it); one
    # evaluation at the end with issue #30's protocol (5,000 samples at guidance 0; classifiers, bits/dim).
    "default": {
        "model": FMNIST_LATENT_MODEL,
        "data": FMNIST_LATENT_DATA,
        "optim": {**FMNIST_OPTIM, "lr": 3e-3, "schedule": "wsd"},
        "train": {**FMNIST_TRAIN, "steps": DEFAULT_STEPS, "precision": "auto", "eval_every": DEFAULT_STEPS,
                  "eval_samples": 5000, "eval_guidance": 0.0, "eval_test_images": 2000},
        "align": FMNIST_ALIGN,
    },
    # Fashion-MNIST pixels (the default job until the recipe search of issue #30): 2 CPU cores, about 10 minutes.
    "fmnist": {
        # Patch 4 (49 tokens of 16 values) keeps a step at ~0.4 s for a batch of 128 on 2 cores.
        "model": {"in_channels": 1, "image_height": 28, "image_width": 28, "patch_size": 4, "width": 128,
                  "num_blocks": 4, "layers_per_block": 2, "num_classes": 10, "sigma": 0.05},
        "data": {"name": "fmnist", "image_size": 28},
        "optim": FMNIST_OPTIM,
        "train": FMNIST_TRAIN,
        "align": FMNIST_ALIGN,
    },
    # The paper's ImageNet 64 model (docs/DESIGN.md section 1): 8 blocks of 8 layers, width 768, patch 2, batch
    # 256, lr 1e-4, 1M steps, on the downsampled-ImageNet npz files (pass data.path), FID-Inception evaluation.
    # Alignment as the paper: DINOv2-B/14 patch tokens (16 x 16 at 224 px, pooled onto the 32 x 32 flow grid), layer
    # 6 of blocks 7 and 8, R-REPA with the pseudo-reverse; targets computed online (a cache of ImageNet would need
    # ~0.5 TB). Give the DINOv2 weights file with align.encoder_weights when offline.
    "imagenet64": {
        "model": {"in_channels": 3, "image_height": 64, "image_width": 64, "patch_size": 2, "width": 768,
                  "num_blocks": 8, "layers_per_block": 8, "num_classes": 1000, "sigma": 0.05},
        "data": {"name": "npz", "image_size": 64},
        "optim": IMAGENET_OPTIM,
        "train": {"steps": 1_000_000, "ema_decay": 0.9999, "eval_features": "inception"},
        "align": IMAGENET_ALIGN,
    },
    # fmnist with STARFlow's deep-shallow layout (arXiv 2506.06276; apple/ml-starflow transformer_flow.py): there
    # the LAST block of the x -> z direction is the deep one (Model builds num_blocks - 1 "bottom" blocks, then a
    # "top" block of layers_per_block[-1] layers, which the reverse runs first), e.g. [2, 2, 2, 2, 2, 18]
    # (TarFlow_XLv2_1, 1.4 B) or [2, 2, 2, 2, 2, 24] (TarFlow_XXLv2_1 and configs/starflow_3B_t2i_256x256.yaml):
    # 64-71 % of the layers in the block nearest the noise. Here block T = 4, the first in generation, gets 5 of the
    # same 8 layers (63 %) and blocks 1-3 one each: the same blocks, layers and width as fmnist, so the same
    # 1,641,600 parameters, redistributed. Data, optimiser, loop and alignment are fmnist's (keep them in step;
    # tests/training/test_config.py checks it) except the position: layer 4 of the 5-layer deep block, three
    # quarters of the way up as the paper's layer 6 of 8 (fmnist's (4, 2) is the deepest layer of a 2-layer block).
    "fmnist-deep-shallow": {
        "model": {"in_channels": 1, "image_height": 28, "image_width": 28, "patch_size": 4, "width": 128,
                  "num_blocks": 4, "layers_per_block": [1, 1, 1, 5], "num_classes": 10, "sigma": 0.05},
        "data": {"name": "fmnist", "image_size": 28},
        "optim": FMNIST_OPTIM,
        "train": FMNIST_TRAIN,
        "align": {**FMNIST_ALIGN, "positions": [[4, 4]]},
    },
    # Latent Fashion-MNIST: the flow on the 4 x 7 x 7 latents of the embedded autoencoder fmnist-vae
    # (rrepa.fmnist.vae; shipped with rrepa, rrepa.fmnist.shipped), patch 1 on the 7 x 7 latent grid (49
    # tokens of 4 values: the same token count as fmnist's patch 4, so about the same cost per step), sigma 0.2 on
    # the unit-variance latents (fmnist-vae's scaling sets std 1; the paper's sigma on SD-VAE latents). Optimiser,
    # loop and evaluation are fmnist's; grids, FID and class accuracy are of the decoded images. Alignment: fmnist-ssl
    # on the CLEAN 28 x 28 images (7 x 7 tokens, the latent token grid 1:1) at fmnist's position (4, 2).
    "fmnist-latent": {
        "model": FMNIST_LATENT_MODEL,
        "data": FMNIST_LATENT_DATA,
        "optim": FMNIST_OPTIM,
        "train": FMNIST_TRAIN,
        "align": FMNIST_ALIGN,
    },
    # The testbed where REPA's premise holds (issue #32, results/fmnist-clutter): Fashion-MNIST items at a random
    # place and scale over clutter on a 32 x 32 canvas (rrepa.data.clutter), where a linear probe of the pixels reads
    # 24 % and the target, fmnist-ssl's design trained on the variant without labels (fmnist-clutter-ssl, shipped),
    # 60 %. Patch 4: 8 x 8 tokens of 16 values, the target's 8 x 8 grid 1:1; otherwise fmnist's model. A wsd schedule
    # over 2,400 steps (a cosine spanning a short run stops learning early: results/fmnist-long, fmnist-recipe).
    # Evaluation with the fmnist-cnn design trained on the variant (fmnist-clutter-cnn, shipped: the shipped fmnist-cnn
    # saw only centred items) against the variant's training split.
    "fmnist-clutter": {
        "model": {"in_channels": 1, "image_height": 32, "image_width": 32, "patch_size": 4, "width": 128,
                  "num_blocks": 4, "layers_per_block": 2, "num_classes": 10, "sigma": 0.05},
        "data": {"name": "fmnist-clutter", "image_size": 32, "clutter_seed": 0},
        "optim": {**FMNIST_OPTIM, "schedule": "wsd"},
        "train": {**FMNIST_TRAIN, "steps": 2400, "eval_weights": "fmnist-clutter-cnn"},
        "align": {**FMNIST_ALIGN, "encoder_weights": "fmnist-clutter-ssl"},
    },
    "imagenet256-latent": IMAGENET256_LATENT,
    # imagenet256-latent with patch 1 ("+Patch1", the paper's best 256 x 256 model): 1024 tokens of 4 values on the
    # 32 x 32 latent grid; DINOv2's 16 x 16 tokens are upsampled onto it (each token gets the patch containing it).
    # Everything else is imagenet256-latent's.
    "imagenet256-latent-p1": {**IMAGENET256_LATENT, "model": {**IMAGENET256_LATENT["model"], "patch_size": 1}},
}
