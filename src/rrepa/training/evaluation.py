"""Evaluation during training (train.eval_every): sample quality of the EMA weights at fixed noise against the
training split's reference statistics, and with train.eval_test_images the one-step and Bayes top-1 and the
bits/dim of the first test images. Everything is seeded by train.seed, never the global RNG, so evaluating does
not change the training run; the experiment runner reads these numbers from metrics.jsonl."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from rrepa.data.latent_run import ImageSpace, eval_dataset
from rrepa.distributed import Dist
from rrepa.eval.bpd import evaluate_bpd
from rrepa.eval.classify import evaluate as classify_images
from rrepa.eval.reference import ReferenceStats, check_network, clutter_ref, reference_stats
from rrepa.eval.samples import build_feature_network, evaluate_features
from rrepa.flow.sample import draw
from rrepa.flow.tarflow import TARFlow
from rrepa.training.config import RunConfig
from rrepa.utils import as_nchw_uint8, drop_diverged, generator, to_uint8


class InTrainingEval:
    """train.eval_every (rank 0): FID, IS, precision / recall and (fmnist evaluator, conditional model) class
    accuracy of train.eval_samples samples of the EMA weights. The samples use fixed noise (seeded by
    train.seed, never the global RNG, so evaluating does not change the training run) and labels cycling
    through the classes; the reference statistics are computed once here (and cached by
    rrepa.eval.reference.reference_stats). With train.eval_test_images (conditional model), also the one-step and
    Bayes top-1 and the bits/dim of that many test images, with fixed noise too."""

    def __init__(self, cfg: RunConfig, d: Dist, say, vae=None):
        """vae: a latent run's VAE (rrepa.data.vae.VAE): samples are decoded before their features are taken, and the
        classifiers and bits/dim read the test split's latents (bits per latent dimension)."""
        t = cfg.train
        self.to_images = ImageSpace(vae)
        weights = {"inception_weights" if t.eval_features == "inception" else "evaluator_weights": t.eval_weights}
        self.net = build_feature_network(t.eval_features, device=d.device, log=say, **weights)
        self.reference = ref = t.eval_ref or default_eval_ref(cfg)  # what the samples are compared with
        fmnist_dir = cfg.data.path if cfg.data.name in ("fmnist", "fmnist-clutter") else None
        self.ref = reference_stats(ref, self.net, data_dir=fmnist_dir, progress=True)
        # Rank 0 evaluates alone while the other processes wait in their next collective, so everything here is a
        # single process's: the run's Dist would all-reduce with processes that never join (a deadlock).
        self.cfg, self.d = cfg, Dist(device=d.device)
        self.test_set = None
        if t.eval_test_images and cfg.model.num_classes:
            self.test_set = eval_dataset(cfg.data, "test", vae, device=d.device, log=say)
        say(f"evaluation every {t.eval_every} steps: {t.eval_samples} EMA samples vs {ref} "
            f"({self.ref.num_images} images) with {self.net.name}"
            + (f"; one-step and Bayes top-1 and bits/dim of {min(t.eval_test_images, len(self.test_set))} test "
               f"images" if self.test_set is not None else ""))

    def __call__(self, ema: TARFlow, step: int) -> dict:
        m, t = self.cfg.model, self.cfg.train
        device = next(ema.parameters()).device
        drawn = [0]

        def sampler(b: int):
            lo = drawn[0]
            drawn[0] += b
            g = generator(t.seed, lo, device)
            z = torch.randn((b, m.in_channels, m.image_height, m.image_width), generator=g, device=device)
            y = torch.arange(lo, lo + b, device=device) % m.num_classes if m.num_classes else None
            return self.to_images(draw(ema, z, y, t.eval_guidance)), None if y is None else y.cpu()

        res = evaluate_in_training(sampler, self.net, self.ref, t.eval_samples, batch_size=t.eval_batch_size)
        if self.test_set is not None:
            res.update(self.test_scores(ema))
        tqdm.write(f"step {step}: {summary(res, t.eval_samples, self.net.name, self.to_images.latent)}")
        return res

    def test_scores(self, ema: TARFlow) -> dict:
        """One-step and Bayes top-1 (inputs x + sigma * eps, as trained) and dequantized bits/dim (true labels)
        of the first train.eval_test_images test images; seeded by train.seed, so every evaluation of a run
        sees the same inputs. A latent run: the same on the test latents (x = z), bits per latent dimension."""
        t = self.cfg.train
        start = time.perf_counter()
        n = min(t.eval_test_images, len(self.test_set))
        cls = classify_images(ema, self.test_set, methods=("one-step", "bayes"), limit=n,
                              batch_size=t.eval_batch_size, seed=t.seed, progress=False)
        bpd = evaluate_bpd(ema, self.test_set, t.eval_batch_size, self.d, seed=t.seed, conditional=True,
                           max_images=n, progress=False)
        return {"one_step_top1": cls["methods"]["one-step"]["top1"], "bayes_top1": cls["methods"]["bayes"]["top1"],
                "bpd": bpd["bpd"], "bpd_protocol": bpd["protocol"], "test_images": n,
                "eval_seconds_test": round(time.perf_counter() - start, 2)}


def summary(res: dict, n: int, network: str, latent: bool = False) -> str:
    """One line of an in-training evaluation's metrics (res of InTrainingEval) of n drawn samples."""
    if res["fid"] is None:
        parts = [f"no FID: {res['diverged']} of {n} samples diverged (NaN or inf)"]
    else:
        left_out = f", {res['diverged']} diverged (NaN or inf) and left out" if res["diverged"] else ""
        parts = [f"FID {res['fid']:.3f} ({res['num_samples']} samples{left_out}, {network})", f"IS {res['is']:.3f}"]
    if res.get("class_accuracy") is not None:
        parts.append(f"class accuracy {res['class_accuracy']:.3f}")
    if "bpd" in res:
        parts += [f"one-step top-1 {res['one_step_top1']:.3f}", f"Bayes top-1 {res['bayes_top1']:.3f}",
                  f"{'bits per latent dim' if latent else 'bits/dim'} {res['bpd']:.4f}"]
    return ", ".join(parts) + f" [{res['eval_seconds']:.0f} s]"


def default_eval_ref(cfg: RunConfig) -> str:
    """The training split as the reference of train.eval_every: fmnist:train, fmnist-clutter's (e.g.
    fmnist-clutter-32px-seed0:train), or the npz file of data.path."""
    if cfg.data.name == "fmnist":
        return "fmnist:train"
    if cfg.data.name == "fmnist-clutter":
        return clutter_ref(cfg.data.image_size, cfg.data.clutter_seed)
    if cfg.data.name == "npz" and cfg.data.path and Path(cfg.data.path).is_file():
        return cfg.data.path
    raise ValueError(f"train.eval_every needs reference images or statistics for {cfg.data.name} data: set "
                     f"train.eval_ref to an npz of images (arr_0) or of statistics (mu, sigma)")


def evaluate_in_training(model_sampler: Callable, evaluator, ref_stats, n: int, *, batch_size: int = 100,
                         splits: int = 10, k: int = 3, fid_method: str = "sqrtm") -> dict:
    """FID (and IS, precision / recall, class accuracy) of ``n`` fresh samples, for the trainer's log.

    ``model_sampler(m)`` returns m images, (m, C, H, W) floats in [-1, 1] or uint8, or a pair (images,
    labels); it is called with m <= batch_size until n images are drawn. ``evaluator`` is a feature network
    (``rrepa.fmnist.evaluator.load_evaluator()`` or ``InceptionFeatures``); ``ref_stats`` a ReferenceStats (from
    ``reference_stats("fmnist:train", evaluator)``, computed once before training) or a path to a stats
    npz. FID on n samples is biased upwards for small n: compare values at the same n only.
    Samples holding NaN or inf (a model early in training can overflow on a few noise vectors) are left out rather
    than ending the run: the metrics are of the finite ones (num_samples says how many) and "diverged" counts the
    others; it is 0 for a healthy model, and when every sample diverged the metrics are None.
    Returns the metrics dict of evaluate_features plus "diverged" and "eval_seconds".
    """
    if n < 2 or batch_size < 1:
        raise ValueError(f"n must be >= 2 and batch_size >= 1, got {n}, {batch_size}")
    start = time.perf_counter()
    ref = ref_stats if isinstance(ref_stats, ReferenceStats) else ReferenceStats.load(ref_stats)
    check_network(ref, evaluator, "ref_stats")
    images, labels = [], []
    done = diverged = 0
    with torch.no_grad():
        while done < n:
            m = min(batch_size, n - done)
            out = model_sampler(m)
            x, y = out if isinstance(out, tuple) else (out, None)
            x = torch.as_tensor(x).detach().cpu()
            if x.shape[0] != m:
                raise ValueError(f"model_sampler({m}) returned {x.shape[0]} images")
            finite, y, _ = drop_diverged(x, None if y is None else torch.as_tensor(y).cpu().reshape(-1))
            diverged += m - len(finite)
            images.append(as_nchw_uint8(to_uint8(finite)))
            labels.append(y)
            done += m
    x = torch.cat(images)
    y = torch.cat(labels).numpy() if all(t is not None for t in labels) else None
    if len(x) < 2:  # nothing to compare: every sample (or all but one) diverged
        res = {"feature_network": evaluator.name, "num_samples": len(x), "fid": None, "is": None}
    else:
        res = evaluate_features(evaluator.extract(x), ref, evaluator.name, labels=y, splits=splits, k=k,
                                fid_method=fid_method)
    res["diverged"] = diverged
    res["eval_seconds"] = round(time.perf_counter() - start, 2)
    return res
