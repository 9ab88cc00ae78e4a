"""Sample-quality metrics as OpenAI's ADM evaluator reports them (FID, sFID, Inception Score, precision and
recall; docs/DESIGN.md section 9), of samples in a file or drawn from a run (during training:
rrepa.training.evaluation).

A feature network has ``name``, ``feature_dim``, ``has_spatial`` and ``extract(images)`` -> {"pool" (N, D),
"probs" (N, K)[, "spatial" (N, Ds)]}; ``build_feature_network`` gives one of the two:

- ``inception`` (rrepa.eval.inception.InceptionFeatures, name ``inception-v3-fid``): torch-fidelity's
  FID-Inception, ADM's network: 2048-d pool features, 2023-d spatial ones for sFID, 1008-class softmax.
- ``fmnist`` (rrepa.fmnist.evaluator.FMNISTEvaluator, name ``fmnist-cnn@<hash>``): the embedded Fashion-MNIST
  CNN, 128-d penultimate features and 10-class softmax; no sFID. With labelled samples it also gives the
  class accuracy of conditional samples.

``evaluate_samples(images, net, ref)`` / ``evaluate_features(feats, ref_stats, net.name)`` return a JSON-ready
dict naming the feature network (``feature_network``); ``format_markdown`` renders it.
The samples of ``rrepa evaluate --ckpt RUN --num-samples N`` are drawn by rrepa.training.run.samples_from_checkpoint
(it opens a run, which is training's wing).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from rrepa.eval.fid import feature_stats, frechet_distance, inception_score, precision_recall
from rrepa.eval.inception import InceptionFeatures
from rrepa.eval.npz import check_labels
from rrepa.eval.reference import ReferenceStats, progress_bar, reference_stats
from rrepa.fmnist.evaluator import load_evaluator
from rrepa.utils import as_nchw_uint8


def build_feature_network(kind: str, *, inception_weights: str | None = None, evaluator_weights: str | None = None,
                          device: str | torch.device = "cpu", batch_size: int | None = None,
                          log: Callable[[str], None] | None = None):
    """``inception`` -> InceptionFeatures; ``fmnist`` -> the embedded evaluator (trained if missing)."""
    if kind == "inception":
        return InceptionFeatures(inception_weights, device=device, batch_size=batch_size or 50)
    if kind == "fmnist":
        return load_evaluator(evaluator_weights, device=device, batch_size=batch_size or 500, log=log)
    raise ValueError(f"--features must be inception or fmnist, got {kind!r}")


# --------------------------------------------------------------------------------------------
# Metrics of features and of images
# --------------------------------------------------------------------------------------------


def evaluate_features(feats: dict[str, np.ndarray], ref: ReferenceStats, network: str, *,
                      labels=None, splits: int = 10, k: int = 3, pr_batch_size: int = 2048,
                      fid_method: str = "sqrtm") -> dict:
    """Metrics of sample features against reference statistics, as a JSON-ready dict: feature_network
    (the network's name), num_samples, num_ref, fid, sfid, is, is_std, is_splits, precision, recall,
    num_ref_pr (reference features used for precision / recall), k, class_accuracy. None where a metric
    does not apply: sFID without spatial features, precision / recall without reference features (or
    with k or fewer points), class accuracy without labels or without the embedded Fashion-MNIST
    evaluator (Inception's 1008 classes are not ImageNet's 1000 labels)."""
    if ref.network != network:
        raise ValueError(f"reference statistics are for {ref.network}, the samples' features for {network}")
    pool = feats["pool"]
    n = int(pool.shape[0])
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    mu, sigma = feature_stats(pool)
    res: dict = {"feature_network": network, "num_samples": n, "num_ref": int(ref.num_images),
                 "fid": frechet_distance(mu, sigma, ref.mu, ref.sigma, method=fid_method), "sfid": None}
    if feats.get("spatial") is not None and ref.mu_s is not None:
        mu_s, sigma_s = feature_stats(feats["spatial"])
        if mu_s.shape != ref.mu_s.shape:
            raise ValueError(f"sFID: sample features are {mu_s.shape[0]}-d, reference {ref.mu_s.shape[0]}-d")
        res["sfid"] = frechet_distance(mu_s, sigma_s, ref.mu_s, ref.sigma_s, method=fid_method)
    probs = feats["probs"]
    res["is"], res["is_std"] = inception_score(probs, min(splits, n), return_std=True)
    res["is_splits"] = min(splits, n)
    res["precision"] = res["recall"] = None
    res["num_ref_pr"] = 0
    if ref.feats is not None and ref.feats.shape[0] > k and n > k:
        res["precision"], res["recall"] = precision_recall(ref.feats, pool, k, pr_batch_size)
        res["num_ref_pr"] = int(ref.feats.shape[0])
    res["k"] = k
    res["class_accuracy"] = None
    if labels is not None and network.startswith("fmnist-cnn"):
        y = check_labels(labels, n, "labels")
        if y.min() < 0 or y.max() >= probs.shape[1]:
            raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1} for {network}, got {y.min()}..{y.max()}")
        res["class_accuracy"] = float((probs.argmax(1) == y).mean())
    return res


def evaluate_samples(images, net, ref, *, labels=None, splits: int = 10, k: int = 3,
                     batch_size: int | None = None, progress: bool = False, fid_method: str = "sqrtm",
                     **ref_kwargs) -> dict:
    """Extract ``net``'s features of uint8 ``images`` ((N, C, H, W) tensor or (N, H, W, C) array) and compare
    them with ``ref`` (see reference_stats; ``ref_kwargs`` go to it)."""
    ref_stats = reference_stats(ref, net, batch_size=batch_size, progress=progress, **ref_kwargs)
    x = as_nchw_uint8(images)
    with progress_bar(x.shape[0], "features of the samples", progress) as bar:
        feats = net.extract(x, batch_size, progress=bar.update)
    return evaluate_features(feats, ref_stats, net.name, labels=labels, splits=splits, k=k, fid_method=fid_method)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

_ROWS = (("FID", "fid"), ("sFID", "sfid"), ("IS", "is"), ("precision", "precision"), ("recall", "recall"),
         ("class accuracy", "class_accuracy"))


def format_markdown(res: dict) -> str:
    """The metrics as a Markdown table (n/a where a metric does not apply)."""
    lines = [f"feature network: {res.get('feature_network')}; {res.get('num_samples')} samples vs "
             f"{res.get('num_ref') or '?'} reference images", "", "| metric | value |", "|---|---|"]
    for label, key in _ROWS:
        v = res.get(key)
        if v is None:
            text = "n/a"
        elif key == "is" and res.get("is_std") is not None:
            text = f"{v:.3f} ± {res['is_std']:.3f}"
        else:
            text = f"{v:.4f}"
        lines.append(f"| {label} | {text} |")
    return "\n".join(lines)
