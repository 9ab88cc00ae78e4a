"""The references a grid's probes are read against (rrepa.experiments.probes.probe_references): the raw pixels and
each alignment target, probed once each on the images the flows' probes see; and the report's claim 5, which sets
the aligned position's probe against the baseline's and the target's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rrepa.align.encoders import build_encoder
from rrepa.data.cache import dataset_images
from rrepa.data.datasets import DataConfig, build_dataset
from rrepa.eval.linear import linear_probe
from rrepa.experiments.grid import grid_from_dict
from rrepa.experiments.probes import images_of, probe_references, reference_features, target_of
from rrepa.experiments.records import REFERENCE_PROBES, read_evals
from rrepa.experiments.report import write_report
from rrepa.experiments.stats import paired
from rrepa.fmnist.encoder import dataset_labels
from rrepa.utils import from_uint8

ALIGNED = ["align.enabled=true", "align.encoder=fmnist-ssl"]


def grid_folder(out: Path, arms: dict, data: Path | None = None, seeds=(0, 1)) -> dict:
    """A results folder as `rrepa experiment run` leaves it before training: grid.yaml and the cells' configs."""
    spec = {"preset": "fmnist", "seeds": list(seeds), "set": ["train.eval_every=10"] + ([f"data.path={data}"]
                                                                                         if data else []),
            "arms": arms}
    grid = grid_from_dict(spec)
    (out / "configs").mkdir(parents=True)
    (out / "grid.yaml").write_text(yaml.safe_dump(grid.to_dict(), sort_keys=False))
    cells = grid.cells()
    for c in cells:
        (out / "configs" / f"{c.name}.yaml").write_text(c.cfg.to_yaml())
    return {c.name: c.cfg for c in cells}


def test_reference_probes_are_the_pixels_and_each_target_once(data, tmp_path):
    out = tmp_path / "out"
    grid_folder(out, {"baseline": [], "forward": [*ALIGNED, "align.strategy=forward"],
                      "reverse": [*ALIGNED, "align.strategy=reverse"]}, data)
    assert probe_references(out, limit_train=48, limit_test=24, progress=False, log=lambda m: None) == 2
    pixels, target = read_evals(out / REFERENCE_PROBES)  # two arms share one target: probed once
    assert pixels["reference"] == "pixels" and pixels["target"] is None and pixels["encoder"] == "pixels"
    assert target["reference"] == "target" and target["target"]["encoder"] == "fmnist-ssl"
    assert target["encoder"].startswith("fmnist-ssl@") and target["images"] == pixels["images"]
    assert (pixels["train_images"], pixels["test_images"]) == (48, 24)
    # Independently: the first images of each split, as stored, through the pixels and through the encoder.
    train_set, test_set = (build_dataset(DataConfig(path=str(data)), s) for s in ("train", "test"))
    x_tr, x_te = from_uint8(dataset_images(train_set)[:48]), from_uint8(dataset_images(test_set)[:24])
    y_tr, y_te = dataset_labels(train_set)[:48], dataset_labels(test_set)[:24]
    want = linear_probe(x_tr.flatten(1), y_tr, x_te.flatten(1), y_te, 10)
    assert pixels["probe_top1"] == want["test_acc"]
    encoder = build_encoder("fmnist-ssl")
    f_tr, labels = reference_features(train_set, 48, lambda x: encoder(x).mean(1), progress=False)
    assert torch.equal(labels, y_tr)
    torch.testing.assert_close(f_tr, encoder(x_tr).mean(1), rtol=1e-5, atol=1e-5)
    f_te, _ = reference_features(test_set, 24, lambda x: encoder(x).mean(1), progress=False)
    assert target["probe_top1"] == linear_probe(f_tr, y_tr, f_te, y_te, 10)["test_acc"]
    assert probe_references(out, limit_train=48, limit_test=24, progress=False, log=lambda m: None) == 0


def test_report_sets_the_aligned_probe_against_the_baselines_and_the_targets(tmp_path):
    configs = grid_folder(tmp_path, {"baseline": [], "reverse": [*ALIGNED, "align.positions=[[4,2]]"]},
                          seeds=(0, 1, 2))
    evals, probes = [], []
    base_acc, rev_acc = {0: 0.40, 1: 0.42, 2: 0.45}, {0: 0.47, 1: 0.48, 2: 0.53}
    for arm, acc in (("baseline", base_acc), ("reverse", rev_acc)):
        for s in range(3):
            evals.append({"arm": arm, "seed": s, "step": 10, "fid": 50.0 + s, "one_step_top1": 0.3, "bayes_top1": 0.3})
            positions = [{"block": 4, "layer": 2, "test_acc": acc[s]}, {"block": 1, "layer": 1, "test_acc": 0.2}]
            probes.append({"arm": arm, "seed": s, "step": 10, "probe_top1": acc[s], "probe_block": 4,
                           "probe_layer": 2, "positions": positions})
    cfg = configs["reverse-s0"]
    refs = [{"reference": "pixels", "images": images_of(cfg), "target": None, "encoder": "pixels",
             "probe_top1": 0.24},
            {"reference": "target", "images": images_of(cfg), "target": target_of(cfg), "encoder": "fmnist-ssl@abc",
             "probe_top1": 0.60}]
    for name, rows in (("evals.jsonl", evals), ("probes.jsonl", probes), (REFERENCE_PROBES, refs)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(tmp_path).read_text()
    claim = text.split("**Claim 5")[1].split("## ")[0]
    row = next(line for line in claim.splitlines() if line.startswith("| reverse | (4, 2) |"))
    d, lo, hi, n = paired(rev_acc, base_acc)
    gap = d / (0.60 - sum(base_acc.values()) / 3)
    assert f"{d:+.1%} [{lo:+.1%}, {hi:+.1%}] (3) | holds |" in row
    assert "60.0% (`fmnist-ssl@abc`)" in row and row.endswith(f"| {gap:.0%} |")
    assert "The raw pixels on the same images (a linear probe of the flattened pixels, the floor): 24.0% (fmnist)" \
        in claim
    # Every probed position of every arm, mean ± std over seeds, the aligned one starred.
    table = text.split("**Linear probes at every (block, layer)**")[1].split("## ")[0].splitlines()
    assert "| arm | (1, 1) | (4, 2) |" in table
    for arm, acc, star in (("baseline", base_acc, ""), ("reverse", rev_acc, " *")):
        v = list(acc.values())
        assert f"| {arm} | 20.0% ± 0.0% | {np.mean(v):.1%} ± {np.std(v, ddof=1):.1%}{star} |" in table
    refs[1]["probe_top1"] = 0.44  # 1.7 points above the baseline: no share of a gap that small
    (tmp_path / REFERENCE_PROBES).write_text("".join(json.dumps(r) + "\n" for r in refs))
    claim = write_report(tmp_path).read_text().split("**Claim 5")[1]
    assert "44.0% (`fmnist-ssl@abc`) | — |" in claim and "at least 5 points above" in claim
    (tmp_path / REFERENCE_PROBES).unlink()  # without the references: the arms' probes, the target "not probed"
    claim = write_report(tmp_path).read_text().split("**Claim 5")[1]
    assert "| not probed | — |" in claim and "raw pixels" not in claim


@pytest.mark.parametrize("aligned", [False, True])
def test_claim_5_needs_an_aligned_arm_and_its_probes(data, tmp_path, aligned):
    arms = {"baseline": [], **({"reverse": ALIGNED} if aligned else {})}
    grid_folder(tmp_path, arms, data, seeds=(0,))
    (tmp_path / "evals.jsonl").write_text(json.dumps({"arm": "baseline", "seed": 0, "step": 10, "fid": 5.0}) + "\n")
    (tmp_path / "probes.jsonl").write_text(json.dumps({"arm": "baseline", "seed": 0, "step": 10, "probe_top1": 0.4,
                                                       "probe_block": 4, "probe_layer": 2}) + "\n")
    claim = write_report(tmp_path).read_text().split("**Claim 5")[1]
    want = "Not measured yet: needs the probes of an aligned arm" if aligned else "Not tested: no arm of this grid"
    assert want in claim
    # The references serve the aligned arms: a grid without alignment probes none.
    assert (probe_references(tmp_path, limit_train=16, limit_test=8, progress=False, log=lambda m: None) > 0) == aligned
