"""Sample-quality metrics as OpenAI's ADM evaluator reports them: FID, sFID, Inception Score, precision
and recall; and the ``rrepa evaluate`` command.

Metrics (numpy / torch, no network needed)
    ``frechet_distance(mu1, sigma1, mu2, sigma2)``: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with
    scipy's ``sqrtm`` in float64. When the product is near-singular (sqrtm not finite, or its relative
    residual ||X X - S1 S2||_F / ||S1 S2||_F above 1e-5) eps * I (eps = 1e-6) is added to both covariances
    and the root is taken again, as is standard practice; an imaginary part of the root's diagonal above
    1e-3 raises ValueError, smaller ones are dropped. ``method="eigh"`` gives the same trace as
    sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), exact for singular covariances and ~3x faster at 2048-d (2048-d
    sqrtm takes ~18 s on one busy core here; keep BLAS at one thread per process on a shared machine,
    OPENBLAS_NUM_THREADS=1, oversubscribed BLAS threads made it 10x slower).
    ``inception_score(probs, splits=10)``: exp(E_x KL(p(y|x) || p(y))), averaged over ``splits`` equal parts.
    ``precision_recall(real, fake, k=3)``: Kynkäänniemi et al.'s improved precision and recall: each set's
    manifold is the union of balls around its points with radius the distance to the k-th nearest other
    point of the same set; precision is the fraction of fake points inside the real manifold, recall the
    fraction of real points inside the fake one (a point on a ball's boundary is inside). Distances are
    computed in blocks of ``batch_size`` x ``batch_size`` (float32, after centring on the real mean), so
    memory stays bounded whatever the set sizes.

Feature networks (both expose ``name``, ``feature_dim``, ``has_spatial`` and ``extract(images)``)
    ``InceptionFeatures`` (name ``inception-v3-fid``): torch-fidelity's FID-Inception
    (``torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3``, the TF 2015-12-05
    graph's weights, which ADM's evaluator also uses). One pass gives

    - ``pool``: the 2048-d pool_3 features (torch-fidelity's "2048") for FID, precision and recall;
    - ``spatial``: the first 7 channels of ADM's ``mixed_6/conv`` map, (B, 7 * 17 * 17 = 2023), for sFID;
    - ``probs``: softmax over the 1008 logits for the Inception Score. ADM multiplies pool_3 by the
      ``softmax`` weight matrix without its bias, which is torch-fidelity's "logits_unbiased"; we do the same.

    Which torch-fidelity layer is ``mixed_6/conv``: the TF graph names its inception blocks ``mixed``,
    ``mixed_1``, ..., ``mixed_10``; torch-fidelity's are Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c in
    the same order, so ``mixed_6`` is the 7th, **Mixed_6d**, and inside a block ``conv`` is the 1 x 1
    branch (``tower``, ``tower_1``, ``tower_2`` are the others), **Mixed_6d.branch1x1**. Checked three ways:
    (1) torch-fidelity's weight converter (utils/util_convert_inception_weights.py in its repository,
    not shipped in the wheel) maps the TF tensors ``mixed_6/conv/conv2d_params`` and
    ``mixed_6/conv/batchnorm`` to ``Mixed_6d.branch1x1.conv`` / ``.bn``; (2) shape: that branch gives
    (B, 192, 17, 17) for a 299 x 299 input, the 17 x 17 grid ADM's 2023 = 7 * 17 * 17 implies (every
    Mixed_6* block works at 17 x 17, so the shape alone does not single it out, hence (1) and (3));
    (3) position: it is the 1 x 1 branch of the third InceptionC block with channels_7x7 = 160
    (Mixed_6c and Mixed_6d have 160, Mixed_6b 128, Mixed_6e 192). The TF tensor ``mixed_6/conv:0`` is the
    unit's output after batch norm and ReLU, which is what torch-fidelity's BasicConv2d returns; we take it
    with a forward hook on ``Mixed_6d.branch1x1`` (checked at run time to be (B, 192, 17, 17)). ADM's map is
    NHWC and flattened as (h, w, c), so we flatten ``x[:, :7].permute(0, 2, 3, 1)`` the same way: the
    2023 coordinates are then in ADM's order and our (mu_s, sigma_s) can be compared with those stored
    in ADM's reference batches.

    Inputs are uint8 images of any size; torch-fidelity resizes them to 299 x 299 with TF1-compatible
    bilinear interpolation inside the network; grey images are repeated to 3 channels. Weights come from
    ``--inception-weights PATH``, else torch-fidelity's file in the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``), else they are
    downloaded there (not with RREPA_OFFLINE=1); a missing file raises FileNotFoundError naming the
    file, its URL and where to put it.

    ``FMNISTEvaluator`` (name ``fmnist-cnn@<hash>``, rrepa.evaluator): the embedded Fashion-MNIST CNN, 128-d
    penultimate features and 10-class softmax; no sFID. With labelled samples it also gives the class
    accuracy of conditional samples.

Reference statistics (``ReferenceStats``, ``reference_stats(spec, net)``)
    ``spec`` is ``fmnist:train`` / ``fmnist:test``, an npz of images (ADM's ``arr_0``, uint8 NHWC), or an
    npz of statistics (ADM's ``mu``, ``sigma``, ``mu_s``, ``sigma_s``, or one written by
    ``ReferenceStats.save``, which adds ``network``, ``feats``, ``num_images``, ``source``, ``key``). An
    ADM reference batch holding both uses its stored statistics for FID / sFID and the features of
    ``arr_0`` for precision and recall. Statistics computed from images are cached in
    ``$RREPA_CACHE_DIR/stats/<source>--<network>.npz`` (atomic write), keyed by the source (its name and
    the SHA-256 of its file content), the feature network's name and the precision/recall subset size;
    a cache file whose key differs is recomputed and overwritten. For precision / recall at most
    ``pr_max`` (10000) reference features are kept, a seeded random subset.

Samples npz (ADM's layout): ``arr_0`` (N, H, W, C) uint8 with C = 1 or 3 (or (N, H, W) grey) and optional
``labels`` (N,) ints (``read_samples_npz`` / ``write_samples_npz``).

Evaluation
    ``evaluate_samples(images, net, ref)`` / ``evaluate_features(feats, ref_stats, net.name)`` return a
    JSON-ready dict naming the feature network (``feature_network``); ``format_markdown`` renders it.
    ``evaluate_in_training(model_sampler, evaluator, ref_stats, n)`` is the trainer's hook (FID etc. of n
    fresh samples). ``add_cli(sub)`` registers ``rrepa evaluate`` and ``rrepa evaluator {train,info}``;
    ``samples_from_checkpoint`` draws the samples of ``rrepa evaluate --ckpt RUN --num-samples N``.

Dependencies: scipy (sqrtm) and, for the Inception path only, torch-fidelity (which imports torchvision).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

INCEPTION_NAME = "inception-v3-fid"
INCEPTION_FEATURE_DIM = 2048
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILENAME
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
STATS_VERSION = 1
DEFAULT_PR_MAX = 10000


# --------------------------------------------------------------------------------------------
# Images and ADM's npz layout
# --------------------------------------------------------------------------------------------


def as_nchw_uint8(images) -> Tensor:
    """uint8 (N, C, H, W) tensor, C in {1, 3}, from a torch tensor (N, C, H, W) or (N, H, W), or a numpy
    array in ADM's layout (N, H, W, C) or (N, H, W)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"image arrays must be (N, H, W, C) with C = 1 or 3 (ADM's layout), got {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image tensors must be (N, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
    return images


def float_to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 (x + 1) * 127.5, rounded and clipped (uint8 input passes through)."""
    if x.dtype == torch.uint8:
        return x
    if not torch.isfinite(x).all():
        raise ValueError("sampled images contain NaN or inf")
    from rrepa.sample import to_uint8

    return to_uint8(x)


def _open_npz(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz file: {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a .npy array, not an .npz archive")
    return npz


def _check_images_array(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ValueError(f"{where}: arr_0 must be uint8 images, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: arr_0 must be (N, H, W, C) with C = 1 or 3 (ADM's NHWC layout), got {arr.shape}")
    return arr


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be (N,) = ({n},) integers, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def read_samples_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(images (N, H, W, C) uint8, labels (N,) int64 or None) of an ADM-layout samples npz."""
    with _open_npz(path) as npz:
        if "arr_0" not in npz.files:
            raise ValueError(f"{path}: no arr_0 (ADM's sample layout is arr_0 (N, H, W, C) uint8 [+ labels])")
        images = _check_images_array(npz["arr_0"], str(path))
        labels = _check_labels(npz["labels"], images.shape[0], str(path)) if "labels" in npz.files else None
    return images, labels


def write_samples_npz(path: str | os.PathLike, images, labels=None) -> Path:
    """Write ADM's layout atomically: arr_0 (N, H, W, C) uint8 (from an NHWC uint8 array or an NCHW uint8
    tensor), plus labels (N,) int64 when given."""
    from rrepa.checkpoint import atomic_write

    x = as_nchw_uint8(images).permute(0, 2, 3, 1).contiguous().numpy()
    arrays = {"arr_0": x}
    if labels is not None:
        arrays["labels"] = _check_labels(np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels),
                                         x.shape[0], "labels")
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    atomic_write(path, write)
    return path


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (N, D) features in float64; sigma is the unbiased covariance (N - 1), as np.cov."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature statistics need (N, D) features with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular-matrix warnings: handled by the caller's checks
        return linalg.sqrtm(a)


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr (S1 S2)^(1/2) for symmetric PSD S1, S2 as sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2))): S1 S2 and the
    symmetric PSD S1^(1/2) S2 S1^(1/2) share their non-zero eigenvalues (AB and BA do), so this is exact for
    singular covariances too and needs only symmetric eigensolvers."""
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ s2 @ r
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); see the module docstring.

    ``method="sqrtm"`` (default) is the standard computation (ADM's, pytorch-fid's): scipy's sqrtm of
    S1 S2, retried with eps * I added to both covariances when the product is near-singular, tiny
    imaginary parts dropped. ``method="eigh"`` computes the same trace from symmetric eigenvalues
    (``_trace_sqrt_product``): about 3 times faster at 2048-d, stable without an offset."""
    if method not in ("sqrtm", "eigh"):
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {s1.shape} and {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("means / covariances contain NaN or inf")
    diff = mu1 - mu2
    if method == "eigh":
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product(s1, s2))
    prod = s1 @ s2
    covmean = _sqrtm(prod)
    norm = np.linalg.norm(prod)
    resid = np.linalg.norm(covmean @ covmean - prod) / norm if norm > 0 else 0.0
    if not np.isfinite(covmean).all() or not np.isfinite(resid) or resid > 1e-5:
        logger.info("Fréchet distance: near-singular covariance product (residual %.2g); adding %g * I", resid, eps)
        offset = np.eye(d) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("Fréchet distance: the covariance product has no finite square root")
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"Fréchet distance: the square root has an imaginary component {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def inception_score(probs, splits: int = 10, return_std: bool = False):
    """Inception Score of class probabilities (N, K): exp(mean_x KL(p(y|x) || p(y))) on each of ``splits``
    parts (np.array_split), averaged. ``return_std``: also the standard deviation over the parts."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"probs must be (N, K), got shape {p.shape}")
    if not isinstance(splits, int) or not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be an int in [1, N = {p.shape[0]}], got {splits!r}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError("probs must be finite, non-negative rows that sum to 1")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0).sum(1)
        scores.append(math.exp(kl.mean()))
    mean = float(np.mean(scores))
    return (mean, float(np.std(scores))) if return_std else mean


def _as_feats(x, what: str) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu()
    if t.ndim != 2 or t.shape[0] < 1:
        raise ValueError(f"{what} features must be (N, D), got shape {tuple(t.shape)}")
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} features contain NaN or inf")
    return t


def _sq_dists(a: Tensor, a2: Tensor, b: Tensor, b2: Tensor) -> Tensor:
    return (a2[:, None] - 2.0 * (a @ b.T) + b2[None, :]).clamp_min_(0.0)


def kth_neighbour_sq_dist(x: Tensor, k: int, batch_size: int = 2048) -> Tensor:
    """Squared distance of each row of x (N, D) to its k-th nearest other row, in blocks."""
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"k-nearest-neighbour radii need more than k = {k} points, got {n}")
    x2 = (x * x).sum(1)
    out = torch.empty(n)
    for lo in range(0, n, batch_size):
        a, a2 = x[lo:lo + batch_size], x2[lo:lo + batch_size]
        best = torch.full((a.shape[0], k + 1), math.inf)
        for clo in range(0, n, batch_size):
            d = _sq_dists(a, a2, x[clo:clo + batch_size], x2[clo:clo + batch_size])
            best = torch.cat([best, d], 1).topk(k + 1, dim=1, largest=False).values
        out[lo:lo + a.shape[0]] = best[:, k]  # index 0 is the point itself (distance 0)
    return out


def _fraction_covered(q: Tensor, ref: Tensor, ref_r2: Tensor, batch_size: int) -> float:
    """Fraction of rows of q within the radius of at least one row of ref."""
    q2, r2 = (q * q).sum(1), (ref * ref).sum(1)
    hits = 0
    for lo in range(0, q.shape[0], batch_size):
        a, a2 = q[lo:lo + batch_size], q2[lo:lo + batch_size]
        covered = torch.zeros(a.shape[0], dtype=torch.bool)
        for clo in range(0, ref.shape[0], batch_size):
            d = _sq_dists(a, a2, ref[clo:clo + batch_size], r2[clo:clo + batch_size])
            covered |= (d <= ref_r2[clo:clo + batch_size][None, :]).any(1)
            if bool(covered.all()):
                break
        hits += int(covered.sum())
    return hits / q.shape[0]


def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 2048) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii; memory O(batch_size^2)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    real, fake = _as_feats(real_feats, "real"), _as_feats(fake_feats, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    centre = real.mean(0, keepdim=True)  # distances do not change; float32 cancellation does
    real, fake = real - centre, fake - centre
    real_r2 = kth_neighbour_sq_dist(real, k, batch_size)
    fake_r2 = kth_neighbour_sq_dist(fake, k, batch_size)
    precision = _fraction_covered(fake, real, real_r2, batch_size)
    recall = _fraction_covered(real, fake, fake_r2, batch_size)
    return precision, recall


# --------------------------------------------------------------------------------------------
# Inception features (torch-fidelity's FID-Inception)
# --------------------------------------------------------------------------------------------


def _offline() -> bool:
    return os.environ.get("RREPA_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def default_inception_weights_path() -> Path:
    """Where torch-fidelity looks for (and downloads) its Inception weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _inception_missing(where: str, reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Inception weights {where} not found ({reason}): download {INCEPTION_FILENAME} from {INCEPTION_URL} "
        f"and put it at {default_inception_weights_path()} (torch-fidelity's cache), or pass its path "
        f"with --inception-weights PATH")


def resolve_inception_weights(weights: str | os.PathLike | None = None) -> Path:
    """The local weights file: ``weights`` if given (must exist), else the torch hub cache file,
    downloaded there when missing and online (RREPA_OFFLINE unset)."""
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise _inception_missing(f"file {p}", "no such file")
        return p
    p = default_inception_weights_path()
    if p.is_file():
        return p
    if _offline():
        raise _inception_missing(f"file {p}", "RREPA_OFFLINE=1, no download tried")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s to %s", INCEPTION_URL, p)
        torch.hub.download_url_to_file(INCEPTION_URL, str(p), progress=False)
    except Exception as e:  # noqa: BLE001 - any download failure
        raise _inception_missing(f"file {p}", f"download failed: {e}".replace("\n", " ")) from e
    return p


def _fidelity_inception_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ValueError("--features inception needs torch-fidelity: pip install 'torch-fidelity>=0.3'") from e
    return FeatureExtractorInceptionV3


def make_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save random weights for torch-fidelity's Inception (He-normal convolutions, identity batch norm)
    to ``path``: for tests and benchmarks, where the real weights cannot be downloaded."""
    base = _fidelity_inception_class()

    class _Unloaded(base):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # skip torch-fidelity's load
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                m.bias.zero_()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


class InceptionFeatures:
    """torch-fidelity's FID-Inception with ADM's three outputs; see the module docstring."""

    name = INCEPTION_NAME
    feature_dim = INCEPTION_FEATURE_DIM
    has_spatial = True

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 50) -> None:
        path = resolve_inception_weights(weights)
        cls = _fidelity_inception_class()
        try:
            self.net = cls("inception-v3-compat", ["2048", "logits_unbiased"],
                           feature_extractor_weights_path=str(path))
        except (RuntimeError, OSError, EOFError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path} is not torch-fidelity's Inception state dict: {first}") from e
        self.device = torch.device(device)
        self.net.to(self.device)
        self.batch_size = batch_size
        self.weights_path = path
        self._spatial: Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._grab_spatial)

    def _grab_spatial(self, module, inputs, output: Tensor) -> None:
        self._spatial = output

    @torch.no_grad()
    def extract(self, images, batch_size: int | None = None,
                progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """{"pool": (N, 2048) float32, "spatial": (N, 2023) float32, "probs": (N, 1008) float64}."""
        x = as_nchw_uint8(images)
        bs = batch_size or self.batch_size
        out: dict[str, list[Tensor]] = {"pool": [], "spatial": [], "probs": []}
        for lo in range(0, x.shape[0], bs):
            xb = x[lo:lo + bs]
            if xb.shape[1] == 1:
                xb = xb.expand(-1, 3, -1, -1)
            self._spatial = None
            pool, logits = self.net(xb.contiguous().to(self.device))
            sp = self._spatial
            if sp is None or tuple(sp.shape[1:]) != (192, 17, 17):
                raise RuntimeError(f"Mixed_6d.branch1x1 gave {None if sp is None else tuple(sp.shape)}, "
                                   f"expected (B, 192, 17, 17): torch-fidelity's network changed")
            sp = sp[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(sp.shape[0], -1)  # ADM's (h, w, c) order
            out["pool"].append(pool.float().cpu())
            out["spatial"].append(sp.float().cpu())
            out["probs"].append(torch.softmax(logits.double(), dim=1).cpu())
            if progress is not None:
                progress(xb.shape[0])
        if not out["pool"]:
            return {"pool": np.zeros((0, 2048), np.float32), "spatial": np.zeros((0, SPATIAL_DIM), np.float32),
                    "probs": np.zeros((0, 1008))}
        return {k: torch.cat(v).numpy() for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Reference statistics and their cache
# --------------------------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    """Statistics of the reference images under one feature network."""

    network: str
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    feats: np.ndarray | None = None  # pool features kept for precision / recall
    num_images: int = 0
    source: str = ""
    key: str = ""

    @classmethod
    def from_features(cls, feats: dict[str, np.ndarray], network: str, source: str = "",
                      pr_max: int | None = DEFAULT_PR_MAX, key: str = "") -> ReferenceStats:
        mu, sigma = feature_stats(feats["pool"])
        mu_s = sigma_s = None
        if feats.get("spatial") is not None:
            mu_s, sigma_s = feature_stats(feats["spatial"])
        pool = np.asarray(feats["pool"], dtype=np.float32)
        if pr_max and pool.shape[0] > pr_max:
            idx = np.sort(np.random.default_rng(0).choice(pool.shape[0], pr_max, replace=False))
            pool = pool[idx]
        return cls(network, mu, sigma, mu_s, sigma_s, pool, int(feats["pool"].shape[0]), source, key)

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic npz with mu, sigma[, mu_s, sigma_s][, feats], network, num_images, source, key."""
        from rrepa.checkpoint import atomic_write

        arrays = {"mu": self.mu, "sigma": self.sigma, "network": np.array(self.network),
                  "num_images": np.array(self.num_images), "source": np.array(self.source),
                  "key": np.array(self.key)}
        for name in ("mu_s", "sigma_s", "feats"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        """Statistics from an npz (ours, or ADM's mu / sigma / mu_s / sigma_s; an ADM file has no
        ``network`` and is taken as inception-v3-fid when mu is 2048-d)."""
        with _open_npz(path) as npz:
            if "mu" not in npz.files or "sigma" not in npz.files:
                raise ValueError(f"{path}: no mu / sigma statistics in it")
            st = cls._from_npz(npz, str(path))
        return st

    @classmethod
    def _from_npz(cls, npz, where: str) -> ReferenceStats:
        files = set(npz.files)
        mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
        d = mu.shape[0] if mu.ndim == 1 else -1
        if mu.ndim != 1 or sigma.shape != (d, d):
            raise ValueError(f"{where}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        if "network" in files:
            network = str(npz["network"])
        elif d == INCEPTION_FEATURE_DIM:
            network = INCEPTION_NAME
        else:
            raise ValueError(f"{where}: {d}-d statistics without a 'network' entry (ADM's files are 2048-d)")
        mu_s = sigma_s = None
        if "mu_s" in files and "sigma_s" in files:
            mu_s, sigma_s = np.asarray(npz["mu_s"], np.float64), np.asarray(npz["sigma_s"], np.float64)
            ds = mu_s.shape[0] if mu_s.ndim == 1 else -1
            if mu_s.ndim != 1 or sigma_s.shape != (ds, ds):
                raise ValueError(f"{where}: mu_s must be (D,) and sigma_s (D, D), got {mu_s.shape}, {sigma_s.shape}")
        feats = np.asarray(npz["feats"], np.float32) if "feats" in files else None
        if feats is not None and (feats.ndim != 2 or feats.shape[1] != d):
            raise ValueError(f"{where}: feats must be (N, {d}), got {feats.shape}")
        num = int(npz["num_images"]) if "num_images" in files else 0
        source = str(npz["source"]) if "source" in files else where
        key = str(npz["key"]) if "key" in files else ""
        return cls(network, mu, sigma, mu_s, sigma_s, feats, num, source, key)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "ref"


def stats_cache_dir() -> Path:
    from rrepa.evaluator import cache_dir

    return cache_dir() / "stats"


def _check_network(st: ReferenceStats, net, where: str) -> None:
    if st.network != net.name:
        raise ValueError(f"{where} holds statistics of {st.network}, not of {net.name} "
                         f"(use --features to match, or give the reference images instead)")
    if st.mu.shape[0] != net.feature_dim:
        raise ValueError(f"{where}: {st.mu.shape[0]}-d statistics, but {net.name} gives {net.feature_dim}-d features")


def _progress_bar(total: int, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not show, file=sys.stderr)


def _stats_from_images(source: str, fingerprint: str, net, load_images: Callable[[], object], *,
                       cache: bool, cache_dir: Path | None, pr_max: int | None, batch_size: int | None,
                       progress: bool) -> ReferenceStats:
    key = json.dumps({"v": STATS_VERSION, "source": source, "fingerprint": fingerprint, "network": net.name,
                      "pr_max": pr_max}, sort_keys=True)
    folder = Path(cache_dir) if cache_dir is not None else stats_cache_dir()
    src_slug = _slug(source) if source.startswith("fmnist:") else \
        f"{_slug(Path(source).stem)}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"
    path = folder / f"{src_slug}--{_slug(net.name)}.npz"
    if cache and path.is_file():
        try:
            st = ReferenceStats.load(path)
            if st.key == key:
                logger.info("reusing cached reference statistics %s", path)
                return st
            logger.info("cached statistics %s are stale (source or settings changed); recomputing", path)
        except ValueError as e:
            logger.warning("ignoring unreadable cache file %s: %s", path, e)
    images = as_nchw_uint8(load_images())
    with _progress_bar(images.shape[0], f"features of {source}", progress) as bar:
        feats = net.extract(images, batch_size, progress=bar.update)
    st = ReferenceStats.from_features(feats, net.name, source, pr_max, key)
    if cache:
        st.save(path)
        logger.info("cached reference statistics in %s", path)
    return st


def reference_stats(ref, net, *, cache: bool = True, cache_dir: str | os.PathLike | None = None,
                    pr_max: int | None = DEFAULT_PR_MAX, batch_size: int | None = None,
                    data_dir: str | None = None, progress: bool = False) -> ReferenceStats:
    """Reference statistics for ``net`` from ``ref``: a ReferenceStats, ``fmnist[:train|:test]``, or an npz
    path (images, statistics or both); see the module docstring. ``pr_max``: at most this many reference
    features kept for precision / recall (None or 0: all)."""
    if isinstance(ref, ReferenceStats):
        _check_network(ref, net, "the reference")
        return ref
    spec = str(ref)
    kw = dict(cache=cache, cache_dir=cache_dir, pr_max=pr_max, batch_size=batch_size, progress=progress)
    if spec == "fmnist" or spec.startswith("fmnist:"):
        from rrepa.data import FASHION_MNIST_FILES, _idx_path, find_fashion_mnist, load_fashion_mnist

        split = spec.partition(":")[2] or "train"
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"--ref {spec}: the Fashion-MNIST split must be train or test")
        folder = find_fashion_mnist(data_dir)
        files = [_idx_path(folder, stem) for stem in FASHION_MNIST_FILES[split]]
        fingerprint = "+".join(file_sha256(f) for f in files)
        return _stats_from_images(f"fmnist:{split}", fingerprint, net,
                                  lambda: load_fashion_mnist(folder, split)[0], **kw)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--ref {spec}: no such file (give fmnist:train, fmnist:test, an npz of images "
                                f"(arr_0) or an npz of statistics (mu, sigma))")
    with _open_npz(path) as npz:
        files = set(npz.files)
        has_images = "arr_0" in files
        stored = None
        if {"mu", "sigma"} <= files:
            try:
                stored = ReferenceStats._from_npz(npz, str(path))
            except ValueError as e:
                if not has_images:
                    raise
                logger.warning("ignoring the statistics in %s (%s); using its images", path, e)
    if stored is None and not has_images:
        raise ValueError(f"{path}: neither images (arr_0) nor statistics (mu, sigma) in it")
    usable = stored is not None and stored.network == net.name and stored.mu.shape[0] == net.feature_dim
    if usable and (stored.feats is not None or not has_images):
        return stored
    if not has_images:
        _check_network(stored, net, str(path))  # raises: the statistics belong to another network
    if stored is not None and not usable:
        logger.info("%s: stored statistics are for %s; computing %s features of its images", path,
                    stored.network, net.name)

    def load_images():
        images, _ = read_samples_npz(path)
        return images

    computed = _stats_from_images(str(path.resolve()), file_sha256(path), net, load_images, **kw)
    if usable:  # ADM reference batch: its stored statistics for FID / sFID, features of arr_0 for P / R
        stored.feats = computed.feats
        if stored.mu_s is None and computed.mu_s is not None:
            stored.mu_s, stored.sigma_s = computed.mu_s, computed.sigma_s
        return stored
    return computed


# --------------------------------------------------------------------------------------------
# Evaluation
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
        y = _check_labels(np.asarray(labels), n, "labels")
        if y.min() < 0 or y.max() >= probs.shape[1]:
            raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1} for {network}, got {y.min()}..{y.max()}")
        res["class_accuracy"] = float((probs.argmax(1) == y).mean())
    return res


def evaluate_samples(images, net, ref, *, labels=None, splits: int = 10, k: int = 3,
                     batch_size: int | None = None, progress: bool = False, fid_method: str = "sqrtm",
                     **ref_kwargs) -> dict:
    """Extract ``net``'s features of uint8 ``images`` and compare them with ``ref`` (see reference_stats)."""
    ref_stats = reference_stats(ref, net, batch_size=batch_size, progress=progress, **ref_kwargs)
    x = as_nchw_uint8(images)
    with _progress_bar(x.shape[0], "features of the samples", progress) as bar:
        feats = net.extract(x, batch_size, progress=bar.update)
    return evaluate_features(feats, ref_stats, net.name, labels=labels, splits=splits, k=k, fid_method=fid_method)


def evaluate_in_training(model_sampler: Callable, evaluator, ref_stats, n: int, *, batch_size: int = 100,
                         splits: int = 10, k: int = 3, fid_method: str = "sqrtm") -> dict:
    """FID (and IS, precision / recall, class accuracy) of ``n`` fresh samples, for the trainer's log.

    ``model_sampler(m)`` returns m images, (m, C, H, W) floats in [-1, 1] or uint8, or a pair (images,
    labels); it is called with m <= batch_size until n images are drawn. ``evaluator`` is a feature network
    (``rrepa.evaluator.load_evaluator()`` or ``InceptionFeatures``); ``ref_stats`` a ReferenceStats (from
    ``reference_stats("fmnist:train", evaluator)``, computed once before training) or a path to a stats
    npz. FID on n samples is biased upwards for small n: compare values at the same n only.
    Returns the metrics dict of evaluate_features plus "eval_seconds".
    """
    if n < 2 or batch_size < 1:
        raise ValueError(f"n must be >= 2 and batch_size >= 1, got {n}, {batch_size}")
    start = time.perf_counter()
    ref = ref_stats if isinstance(ref_stats, ReferenceStats) else ReferenceStats.load(ref_stats)
    _check_network(ref, evaluator, "ref_stats")
    images, labels = [], []
    done = 0
    with torch.no_grad():
        while done < n:
            m = min(batch_size, n - done)
            out = model_sampler(m)
            x, y = out if isinstance(out, tuple) else (out, None)
            x = as_nchw_uint8(float_to_uint8(torch.as_tensor(x).detach().cpu()))
            if x.shape[0] != m:
                raise ValueError(f"model_sampler({m}) returned {x.shape[0]} images")
            images.append(x)
            labels.append(None if y is None else torch.as_tensor(y).cpu().reshape(-1))
            done += m
    x = torch.cat(images)
    y = torch.cat(labels).numpy() if all(t is not None for t in labels) else None
    feats = evaluator.extract(x)
    res = evaluate_features(feats, ref, evaluator.name, labels=y, splits=splits, k=k, fid_method=fid_method)
    res["eval_seconds"] = round(time.perf_counter() - start, 2)
    return res


def samples_from_checkpoint(ckpt: str, num_samples: int, *, batch_size: int = 100, seed: int = 0,
                            device: str | torch.device = "cpu", weights: str = "ema",
                            progress: bool = False, **sampler_kwargs) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw ``num_samples`` images from a run folder, a training checkpoint or a .safetensors file and return
    (arr_0 (N, H, W, C) uint8, labels (N,) int64 or None), exactly what ``rrepa sample --format npz`` writes
    with the same arguments (rrepa.sample.generate: batch j seeded (seed, j); labels cycle through the
    classes of a conditional model). ``sampler_kwargs`` go to generate: guidance, anneal, attn_temp,
    temperature, denoise."""
    from rrepa.checkpoint import load_flow
    from rrepa.distributed import Dist
    from rrepa.sample import generate, to_uint8

    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    device = torch.device(device)
    model, _ = load_flow(ckpt, weights, device, warn=lambda m: logger.warning("%s", m))
    K = model.cfg.num_classes
    labels = torch.arange(num_samples) % K if K else None
    parts = generate(model, labels, num_samples, batch_size, seed, Dist(device=device), progress=progress,
                     **sampler_kwargs)
    x = torch.cat([parts[j] for j in sorted(parts)])
    return (to_uint8(x).permute(0, 2, 3, 1).numpy(),
            None if labels is None else labels.numpy().astype(np.int64))


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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_feature_network(kind: str, *, inception_weights: str | None = None, evaluator_weights: str | None = None,
                          device: str | torch.device = "cpu", batch_size: int | None = None,
                          log: Callable[[str], None] | None = None):
    """``inception`` -> InceptionFeatures; ``fmnist`` -> the embedded evaluator (trained if missing)."""
    if kind == "inception":
        return InceptionFeatures(inception_weights, device=device, batch_size=batch_size or 50)
    if kind == "fmnist":
        from rrepa.evaluator import load_evaluator

        return load_evaluator(evaluator_weights, device=device, batch_size=batch_size or 500, log=log)
    raise ValueError(f"--features must be inception or fmnist, got {kind!r}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    if (args.samples is None) == (args.ckpt is None):
        raise ValueError("give exactly one of --samples S.npz and --ckpt")
    if args.splits < 1 or args.k < 1:
        raise ValueError("--splits and --k must be >= 1")
    from rrepa.distributed import resolve_device

    device = resolve_device(args.device)
    # FID needs 2 samples for a covariance, precision / recall k + 1 for k neighbours: refused before any feature
    # network is loaded (or trained).
    least = max(2, args.k + 1)
    if args.ckpt is not None:
        if args.num_samples is None or args.num_samples < least:
            raise ValueError(f"--ckpt needs --num-samples N with N >= {least} (FID needs 2, precision / recall with "
                             f"--k {args.k} need {args.k + 1}; FID is biased upwards for small N: compare runs at "
                             f"the same N)")
        log(f"drawing {args.num_samples} samples from {args.ckpt} ({args.weights} weights, seed {args.seed}, "
            f"guidance {args.guidance}, temperature {args.temperature})")
        images, labels = samples_from_checkpoint(
            args.ckpt, args.num_samples, batch_size=args.sample_batch_size, seed=args.seed, device=device,
            weights=args.weights, progress=True, guidance=args.guidance, temperature=args.temperature)
    else:
        images, labels = read_samples_npz(args.samples)
        if images.shape[0] < least:
            raise ValueError(f"{args.samples} holds {images.shape[0]} samples; the metrics need at least {least} "
                             f"(FID needs 2, precision / recall with --k {args.k} need {args.k + 1}; thousands give "
                             f"stable figures)")
    net = build_feature_network(args.features, inception_weights=args.inception_weights,
                                evaluator_weights=args.evaluator_weights, device=device,
                                batch_size=args.batch_size, log=log)
    ref = reference_stats(args.ref, net, cache=not args.no_cache, pr_max=args.pr_max, batch_size=args.batch_size,
                          data_dir=args.data_dir, progress=True)
    if args.save_ref_stats:
        ref.save(args.save_ref_stats)
        log(f"wrote reference statistics to {args.save_ref_stats}")
    res = evaluate_samples(images, net, ref, labels=labels, splits=args.splits, k=args.k,
                           batch_size=args.batch_size, progress=True, fid_method=args.fid_method)
    if args.ckpt is not None:
        res.update(ckpt=str(args.ckpt), weights=args.weights, seed=args.seed, guidance=args.guidance,
                   temperature=args.temperature)
    else:
        res.update(samples=str(args.samples))
    res.update(ref=str(args.ref))
    if getattr(net, "test_accuracy", None) is not None:
        res["evaluator_test_accuracy"] = net.test_accuracy
    print(format_markdown(res))
    if args.out:
        from rrepa.checkpoint import atomic_write

        text = json.dumps(res, indent=2) + "\n"

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(args.out, write)
        log(f"wrote {args.out}")


def cmd_evaluator_train(args: argparse.Namespace) -> None:
    from rrepa.evaluator import default_evaluator_path, load_evaluator_file, train_and_save_evaluator

    out = Path(args.out) if args.out else default_evaluator_path()
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists (pass --force to retrain and replace it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Ctrl-C keeps the progress beside `out`: the same command continues from there.
    train_and_save_evaluator(out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             data_dir=args.data_dir, log=lambda m: print(m, file=sys.stderr))
    ev = load_evaluator_file(out)
    print(json.dumps({"feature_network": ev.name, "path": str(out), "test_accuracy": ev.info["test_accuracy"],
                      "train_seconds": ev.info["train_seconds"], "epochs": ev.info["epochs"]}))


def cmd_evaluator_info(args: argparse.Namespace) -> None:
    from rrepa.evaluator import default_evaluator_path, load_evaluator_file

    ev = load_evaluator_file(args.path or default_evaluator_path())
    print(json.dumps({"feature_network": ev.name, **ev.info}, indent=2))


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``evaluate`` and ``evaluator {train,info}`` on rrepa's sub-command parser."""
    p = sub.add_parser("evaluate", help="FID, sFID, IS, precision/recall (ADM's metrics) of samples or a run",
                       description="Compare samples (ADM npz: arr_0 (N, H, W, C) uint8 [+ labels], or N samples "
                                   "drawn from a run with --ckpt RUN --num-samples N) with a reference. "
                                   "Prints a Markdown table; --out also writes JSON.")
    p.add_argument("--samples", help="samples npz in ADM's layout (from `rrepa sample --format npz`)")
    p.add_argument("--ckpt", help="instead of --samples: draw the samples from this run folder, ckpt-*.pt or "
                                  ".safetensors (as `rrepa sample`, labels cycling through the classes)")
    p.add_argument("--num-samples", type=int, default=None, help="with --ckpt: how many samples to draw")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="with --ckpt: which weights")
    p.add_argument("--seed", type=int, default=0, help="with --ckpt: sampling seed (as `rrepa sample --seed`)")
    p.add_argument("--guidance", type=float, default=0.0, help="with --ckpt: guidance weight w")
    p.add_argument("--temperature", type=float, default=1.0, help="with --ckpt: std of the prior noise")
    p.add_argument("--sample-batch-size", type=int, default=100, help="with --ckpt: samples per batch")
    p.add_argument("--ref", required=True,
                   help="fmnist:train, fmnist:test, an npz of images (arr_0) or of statistics (mu, sigma[, mu_s, "
                        "sigma_s]; ADM's reference batches hold both)")
    p.add_argument("--features", choices=("fmnist", "inception"), default="fmnist",
                   help="feature network: the embedded Fashion-MNIST CNN (default, offline) or FID-Inception")
    p.add_argument("--inception-weights", metavar="PATH",
                   help=f"torch-fidelity's {INCEPTION_FILENAME} (default: the torch hub cache; downloaded when online)")
    p.add_argument("--evaluator-weights", metavar="PATH",
                   help="embedded evaluator weights (default $RREPA_CACHE_DIR/evaluator/fmnist-cnn.safetensors; "
                        "trained there first when missing)")
    p.add_argument("--batch-size", type=int, default=None, help="images per feature batch")
    p.add_argument("--splits", type=int, default=10, help="Inception Score splits")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours for precision / recall")
    p.add_argument("--pr-max", type=int, default=DEFAULT_PR_MAX,
                   help="at most this many reference features (seeded subset) for precision / recall; 0 = all")
    p.add_argument("--fid-method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="sqrtm: scipy's matrix square root, the standard (ADM's) computation; eigh: the same "
                        "trace from symmetric eigenvalues, ~3x faster at 2048-d")
    p.add_argument("--data-dir", help="Fashion-MNIST folder for --ref fmnist:*")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached reference statistics")
    p.add_argument("--save-ref-stats", metavar="PATH", help="also write the reference statistics to this npz")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("evaluator", help="the embedded Fashion-MNIST evaluator (train, info)")
    esub = p.add_subparsers(dest="evaluator_command", required=True, metavar="ACTION")
    t = esub.add_parser("train", help="train the Fashion-MNIST CNN and cache it (about 12 minutes on 2 idle CPU "
                                          "cores; Ctrl-C keeps its progress, the same command continues)")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data-dir", help="Fashion-MNIST folder (default: the usual search)")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t.add_argument("--out", help="weights file (default $RREPA_CACHE_DIR/evaluator/fmnist-cnn.safetensors)")
    t.add_argument("--force", action="store_true", help="replace an existing file")
    t.set_defaults(func=cmd_evaluator_train)
    i = esub.add_parser("info", help="print the cached evaluator's name, test accuracy and training settings")
    i.add_argument("path", nargs="?", help="weights file (default: the cache file)")
    i.set_defaults(func=cmd_evaluator_info)
