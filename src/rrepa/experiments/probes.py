"""Linear probes of a grid: the flow's every (block, layer) in each finished cell (probes.jsonl, probe_grid), and
what those probes are read against, on the same images (reference_probes.jsonl, probe_references): the raw pixels,
flattened, of each image data the grid trains on, and each alignment target's mean-pooled tokens of clean images.
The report reads them to answer whether alignment moves the aligned layer's probe from the baseline's towards the
target's (rrepa.experiments.report)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from rrepa.align.encoders import build_encoder
from rrepa.data.datasets import build_dataset
from rrepa.data.latent_run import data_config, eval_dataset, is_latent, load_run_vae
from rrepa.eval.classify import batches
from rrepa.eval.linear import linear_probe
from rrepa.eval.probe import probe_model
from rrepa.experiments.grid import Cell, grid_from_dict
from rrepa.experiments.records import (
    GRID_COPY,
    PROBE_LOCK,
    PROBES,
    REFERENCE_PROBES,
    append_line,
    cell_state,
    read_evals,
)
from rrepa.training.config import RunConfig, read_yaml
from rrepa.training.run import load_run
from rrepa.utils import run_lock


def grid_cells(out: Path) -> list[Cell]:
    """The cells of the grid whose results folder is out, from its copy of the grid file."""
    if not (out / GRID_COPY).is_file():
        raise FileNotFoundError(f"{out / GRID_COPY} does not exist: run `rrepa experiment run GRID --out {out}` "
                                f"first")
    return grid_from_dict(yaml.safe_load((out / GRID_COPY).read_text()), str(out / GRID_COPY)).cells()


# --------------------------------------------------------------------------------------------
# The flows' probes, cell by cell
# --------------------------------------------------------------------------------------------


def probe_grid(out: str | os.PathLike, runs: str | os.PathLike | None = None, limit_train: int = 10_000,
               limit_test: int = 2000, progress: bool = True, log=tqdm.write) -> int:
    """Linear probes (rrepa.eval.probe) of the final EMA weights of every finished cell not probed yet, one line each
    in OUT/probes.jsonl: {arm, seed, step, probe_top1, probe_block, probe_layer, positions, ...}. The test
    images are the first limit_test of the test split, those of the in-training one-step and Bayes top-1.
    Returns the number of cells probed."""
    out = Path(out)
    cells = grid_cells(out)
    runs = Path(runs) if runs is not None else out / "runs"
    path = out / PROBES
    probed = 0
    with run_lock(out, warn=log, name=PROBE_LOCK):  # not the runner's lock: probing may run beside training
        done = {(r["arm"], r["seed"]) for r in read_evals(path, missing_ok=True)}
        todo = [c for c in cells if (c.arm, c.seed) not in done and cell_state(c, runs / c.name) == "done"]
        log(f"probing {len(todo)} finished cell(s) ({len(done)} probed before)")
        for c in todo:
            model, info = load_run(runs / c.name, "ema")
            # The run's own data section: its paths are the ones it trained with (the grid copy's are relative to a
            # grid file this folder does not know).
            data = data_config(info["config"]["data"])
            vae = load_run_vae(data, log=log) if is_latent(data) else None  # a latent cell's latents
            train_set, test_set = (eval_dataset(data, split, vae, log=log) for split in ("train", "test"))
            res = probe_model(model, train_set, test_set,
                              limit_train=limit_train, limit_test=limit_test, seed=c.cfg.train.seed,
                              progress=progress)
            best = res["best"]
            row = {"arm": c.arm, "seed": c.seed, "step": info["step"], "probe_top1": best["test_acc"],
                   "probe_block": best["block"], "probe_layer": best["layer"], "train_images": res["train_images"],
                   "test_images": res["test_images"], "pool": res["pool"], "noise": res["noise"],
                   "positions": [{k: r[k] for k in ("block", "layer", "test_acc")} for r in res["positions"]]}
            append_line(path, row)
            probed += 1
            log(f"{c.name}: best probe block {best['block']}, layer {best['layer']}: {best['test_acc']:.1%}")
    return probed


# --------------------------------------------------------------------------------------------
# The references: the raw pixels and the alignment targets, on the same images
# --------------------------------------------------------------------------------------------


def images_of(cfg: RunConfig) -> dict:
    """The fields of a run's data section that say which images it trains on (a latent run: the images its latents
    encode), which is what identifies a reference probe."""
    d = cfg.data
    return {"name": d.name, "path": d.path, "image_size": d.image_size, "clutter_seed": d.clutter_seed}


def target_of(cfg: RunConfig) -> dict | None:
    """The fields of a run's alignment section that say which target it aligns with; None without alignment."""
    a = cfg.align
    if not a.enabled:
        return None
    return {"encoder": a.encoder, "encoder_weights": a.encoder_weights, "encoder_image_size": a.encoder_image_size}


def probe_references(out: str | os.PathLike, limit_train: int = 10_000, limit_test: int = 2000,
                     progress: bool = True, log=tqdm.write) -> int:
    """Linear probes of the raw pixels of each image data the grid trains on and of each alignment target, one line
    each in OUT/reference_probes.jsonl: {reference: "pixels" | "target", images, target (None for pixels),
    encoder (name@fingerprint of a target), probe_top1, train_images, test_images}. The images are those of
    probe_grid's probes, the first limit_train training and limit_test test images, clean (the target is computed
    on clean images in training), with the same probe (rrepa.eval.linear.linear_probe, l2 chosen on held-out
    training features). A target's tokens are mean-pooled, as the flow's. Skips what was probed before, and a grid
    without alignment; returns how many were probed."""
    out = Path(out)
    cells = grid_cells(out)
    # The cells' configs as the runner stored them, whose paths are relative to the folder it ran in (the grid copy's
    # are relative to a grid file this folder does not know).
    configs = [RunConfig.from_dict(read_yaml(out / "configs" / f"{c.name}.yaml")) for c in cells]
    if not any(cfg.align.enabled for cfg in configs):
        return 0  # the references serve the aligned arms' probes
    wanted: list[tuple[dict, RunConfig]] = []
    for cfg in configs:
        for kind, target in (("pixels", None), ("target", target_of(cfg))):
            key = {"reference": kind, "images": images_of(cfg), "target": target}
            if (kind == "pixels" or target is not None) and key not in [k for k, _ in wanted]:
                wanted.append((key, cfg))
    path = out / REFERENCE_PROBES
    probed = 0
    with run_lock(out, warn=log, name=PROBE_LOCK):
        done = [{k: r[k] for k in ("reference", "images", "target")} for r in read_evals(path, missing_ok=True)]
        for key, cfg in wanted:
            if key in done:
                continue
            encode, name = _pixels, "pixels"
            if key["target"] is not None:
                t = key["target"]
                encoder = build_encoder(t["encoder"], t["encoder_weights"], t["encoder_image_size"])
                encode, name = (lambda x, e=encoder: e(x).mean(1)), f"{encoder.name}@{encoder.fingerprint[:10]}"
            train_set, test_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
            Xtr, ytr = reference_features(train_set, limit_train, encode, progress, f"{name} (train)")
            Xte, yte = reference_features(test_set, limit_test, encode, progress, f"{name} (test)")
            res = linear_probe(Xtr, ytr, Xte, yte, train_set.num_classes)
            append_line(path, {**key, "encoder": name, "probe_top1": res["test_acc"], "train_images": len(ytr),
                               "test_images": len(yte)})
            probed += 1
            log(f"reference probe, {name} on {key['images']['name']}: {res['test_acc']:.1%}")
    return probed


def _pixels(x: Tensor) -> Tensor:
    return x.flatten(1)


@torch.no_grad()
def reference_features(dataset, limit: int, encode: Callable[[Tensor], Tensor], progress: bool = True,
                       desc: str = "features", batch_size: int = 128) -> tuple[Tensor, Tensor]:
    """Features (n, F) float32 and labels (n,) of the first `limit` items of dataset, clean images (B, C, H, W) in
    [-1, 1] through `encode`."""
    n = min(len(dataset), limit)
    feats, labels = [], []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for _, x, y in batches(dataset, n, batch_size):
            feats.append(encode(x).float().cpu())
            labels.append(y)
            bar.update(len(y))
    return torch.cat(feats), torch.cat(labels)
