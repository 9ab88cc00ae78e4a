"""The configuration of a training run: model, data, optimiser and loop, resolved in three layers.

    preset (--preset fmnist)  ->  YAML file (--config f.yaml)  ->  --set key=value (repeatable)

Each layer only names what it changes. Keys are dotted paths into the four sections (`model.width`,
`optim.lr`, `train.steps`, `data.path`); a misspelt key is an error that lists the closest valid ones.
The resolved config is written as `config.yaml` into the run folder and stored in every checkpoint,
so `RunConfig.from_dict(yaml.safe_load(...))` rebuilds the run exactly.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from rrepa.data import DataConfig
from rrepa.flow import PRESETS, FlowConfig


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay (TARFlow's recipe; DESIGN.md section 1)."""

    lr: float = 1e-4  # peak learning rate, reached after warmup_steps
    min_lr_ratio: float = 0.0  # the cosine decays the lr to min_lr_ratio * lr at the last step
    warmup_steps: int = 1000  # linear warm-up from 0
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
    ema_decay: float = 0.9999  # EMA of the weights, used for samples and evaluation
    bf16: bool = True  # bfloat16 autocast on CUDA; CPU always trains in float32
    compile: bool = False  # torch.compile the flow
    seed: int = 0  # seeds the model init, the data order and (plus the rank) the noise
    num_workers: int = 2  # DataLoader workers per process; 0 loads in the main process
    log_every: int = 100  # steps between lines in metrics.jsonl / TensorBoard
    sample_every: int = 5000  # steps between sample grids (EMA weights, fixed noise); 0 = only at the end
    sample_rows: int = 10  # rows of the grid; one column per class (8 columns if unconditional)
    sample_guidance: float = 0.0  # guidance w of the grid samples
    ckpt_every: int = 5000  # steps between checkpoints; one is always written at the end
    keep_last: int = 3  # checkpoints kept on disk (older ones are deleted); 0 = keep all
    eval_bpd: bool = True  # compute the test-split bits/dim with the EMA weights at the end
    eval_batch_size: int = 500  # batch of that evaluation


@dataclass
class RunConfig:
    model: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        d = asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])  # plain YAML, no python/tuple tag
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
        if o.lr <= 0 or o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1:
            raise ValueError(f"need optim.lr > 0, optim.warmup_steps >= 0 and 0 <= optim.min_lr_ratio <= 1, got "
                             f"{o.lr}, {o.warmup_steps}, {o.min_lr_ratio}")
        if not 0 <= t.label_drop < 1 or not 0 <= t.ema_decay < 1:
            raise ValueError(f"need 0 <= train.label_drop < 1 and 0 <= train.ema_decay < 1, got "
                             f"{t.label_drop}, {t.ema_decay}")
        if t.sample_every < 0 or t.keep_last < 0 or t.num_workers < 0 or t.sample_rows < 1:
            raise ValueError("train.sample_every, train.keep_last and train.num_workers must be >= 0, "
                             "train.sample_rows >= 1")

    def micro_batch(self, world_size: int) -> int:
        """Images per process per forward pass: batch_size / (world_size * grad_accum), which must divide."""
        b, a = self.optim.batch_size, self.optim.grad_accum
        if b % (world_size * a):
            raise ValueError(f"optim.batch_size {b} is not divisible by {world_size} processes x optim.grad_accum "
                             f"{a}; pick a batch size that is a multiple of {world_size * a}")
        return b // (world_size * a)


# --------------------------------------------------------------------------------------------
# Presets: a model preset from flow.PRESETS plus what the run changes from the defaults above
# --------------------------------------------------------------------------------------------

RUN_PRESETS: dict[str, dict[str, Any]] = {
    # The default job: Fashion-MNIST on 2 CPU cores in at most 15 minutes, end-of-run evaluation included.
    "fmnist": {
        "data.name": "fmnist",
        "optim.lr": 2e-3, "optim.warmup_steps": 100, "optim.batch_size": 128, "optim.min_lr_ratio": 0.05,
        "train.steps": 1800, "train.ema_decay": 0.995, "train.num_workers": 0,
        "train.log_every": 20, "train.sample_every": 300, "train.ckpt_every": 300, "train.sample_guidance": 1.0,
    },
    # The paper's ImageNet models (DESIGN.md section 1): batch 256, 1M steps, lr 1e-4 (the defaults).
    "imagenet64": {"data.name": "npz", "data.image_size": 64, "train.steps": 1_000_000},
    "imagenet256-latent": {"data.name": "npz", "data.image_size": 32, "train.steps": 1_000_000},
    "imagenet256-latent-p1": {"data.name": "npz", "data.image_size": 32, "train.steps": 1_000_000},
}


def resolve(preset: str = "fmnist", config_file: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """preset, then the YAML file, then `key=value` overrides; returns the validated RunConfig."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = RunConfig(model=PRESETS[preset])
    cfg = merge(cfg, RUN_PRESETS.get(preset, {}), source=f"preset {preset}")
    if config_file is not None:
        cfg = merge(cfg, load_yaml(config_file), source=config_file)
    cfg = merge(cfg, parse_overrides(overrides), source="--set")
    cfg.validate()
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a mapping of sections (model:, data:, optim:, train:), "
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
    for key, value in _flatten(changes).items():
        section, _, name = key.partition(".")
        if section not in sections or name not in {f.name for f in fields(sections[section])}:
            close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}?" if close else f"valid sections are {', '.join(sections)}"
            raise KeyError(f"unknown config key {key!r} in {source}; {hint} (`rrepa train --print-config` "
                           f"lists every key)")
        hints = typing.get_type_hints(type(sections[section]))
        updates[section][name] = _coerce(value, hints[name], f"{key} in {source}")
    return RunConfig(**{name: replace(obj, **updates[name]) for name, obj in sections.items()})


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
    """value (from YAML or a --set string) as type tp: int, float, bool, str, X | None or tuple[float, ...]."""
    if isinstance(value, str) and tp is not str:
        value = yaml.safe_load(value) if value.strip() else None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _coerce(value, tp, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} numbers like [0.9, 0.95], got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
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
