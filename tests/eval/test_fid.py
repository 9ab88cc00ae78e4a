"""The sample-quality math (rrepa.eval.fid): Fréchet distance, Inception Score, precision / recall."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import linalg

from rrepa.eval import fid
from rrepa.eval.fid import feature_stats, frechet_distance, inception_score, precision_recall


def _spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def test_frechet_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _spd(rng, d), _spd(rng, d, 2.0)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-10)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)


def test_frechet_closed_form_diagonal_and_commuting():
    rng = np.random.default_rng(1)
    d = 6
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # same eigenvectors: the covariances commute
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(closed, rel=1e-8)
    # one dimension: (mu1 - mu2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_singular_covariances_stable():
    rng = np.random.default_rng(2)
    d = 8
    a = np.r_[rng.uniform(0.5, 2, 5), 0, 0, 0]  # rank 5
    b = np.r_[0, 0, rng.uniform(0.5, 2, 6)]  # rank 6
    closed = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    fd = frechet_distance(np.zeros(d), np.diag(a), np.zeros(d), np.diag(b))
    assert math.isfinite(fd) and fd == pytest.approx(closed, abs=1e-4)
    # sample covariances with N < D (rank N - 1): compare with the eigenvalue form of tr sqrt
    x, y = rng.normal(size=(20, 64)), rng.normal(size=(30, 64)) + 0.3
    (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    exact = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(exact, rel=1e-5)
    # identical singular statistics: ~0
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-4


def test_frechet_methods_agree():
    rng = np.random.default_rng(10)
    for x, y in [(rng.normal(size=(200, 24)), rng.normal(size=(300, 24)) * 1.5),  # full rank
                 (rng.normal(size=(10, 24)), rng.normal(size=(15, 24)) + 1.0)]:  # rank 9 and 14
        (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
        assert frechet_distance(m1, s1, m2, s2, method="eigh") == pytest.approx(
            frechet_distance(m1, s1, m2, s2, method="sqrtm"), rel=1e-6)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(m1, s1, m2, s2, method="svd")


def test_frechet_offset_fallback(monkeypatch):
    """When the first square root fails (not finite), eps * I is added and the result stays ~exact."""
    rng = np.random.default_rng(3)
    d = 5
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    real_sqrtm, calls = fid._sqrtm, []

    def flaky(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid, "_sqrtm", flaky)
    fd = frechet_distance(np.zeros(d), np.diag(a), np.ones(d), np.diag(b))
    assert len(calls) == 2 and np.allclose(calls[1], (np.diag(a) + 1e-6 * np.eye(d)) @ (np.diag(b) + 1e-6 * np.eye(d)))
    assert fd == pytest.approx(d + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-5)


def test_frechet_imaginary_component_raises(monkeypatch):
    monkeypatch.setattr(fid, "_sqrtm", lambda m: np.eye(m.shape[0]) * (1 + 0.1j))
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_frechet_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_fid_of_same_features_is_zero():
    x = np.random.default_rng(4).normal(size=(500, 32))
    mu, sigma = feature_stats(x)
    assert np.allclose(sigma, np.cov(x, rowvar=False))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(x[:1])


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def test_inception_score_uniform_and_confident():
    assert inception_score(np.full((100, 1008), 1 / 1008)) == pytest.approx(1.0)
    k = 7
    probs = np.eye(k)[np.arange(10 * k * 3) % k]  # every split holds each class equally often
    mean, std = inception_score(probs, splits=10, return_std=True)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-12)
    # confident but all the same class: 1
    assert inception_score(np.eye(k)[np.zeros(50, dtype=int)], splits=5) == pytest.approx(1.0)


def test_inception_score_bad_input():
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(np.full((20, 4), 0.5))
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.full((5, 4), 0.25), splits=10)


# --------------------------------------------------------------------------------------------
# Precision / recall
# --------------------------------------------------------------------------------------------


def _line(points):
    return np.stack([np.asarray(points, float), np.zeros(len(points))], 1)


def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(5).normal(size=(200, 16))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_subset_by_hand():
    """Real = 0..9 on a line, fake = {0, 1, 2, 3}, k = 3.
    Fake radii (3rd nearest other fake point): 0 -> 3, 1 -> 2, 2 -> 2, 3 -> 3, so the fake manifold is
    [-3, 3] u [-1, 3] u [0, 4] u [0, 6] = [-3, 6]: real points 0..6 inside, 7, 8, 9 outside -> recall 0.7.
    Every fake point is a real point (distance 0) -> precision 1."""
    real, fake = _line(range(10)), _line(range(4))
    assert precision_recall(real, fake, k=3) == (1.0, 0.7)
    assert precision_recall(fake, real, k=3) == (0.7, 1.0)  # roles swapped
    assert precision_recall(real, fake, k=3, batch_size=3) == (1.0, 0.7)  # blocks smaller than the sets


def test_precision_recall_blocked_matches_brute_force():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(300, 8)), rng.normal(size=(250, 8)) * 1.3 + 0.2
    k = 3

    def brute(a, b):  # fraction of b inside a's manifold
        daa = np.linalg.norm(a[:, None] - a[None], axis=-1)
        radius = np.sort(daa, 1)[:, k]
        dba = np.linalg.norm(b[:, None] - a[None], axis=-1)
        return float((dba <= radius[None]).any(1).mean())

    p, r = precision_recall(real, fake, k=k, batch_size=64)
    assert p == pytest.approx(brute(real, fake), abs=1 / 250 + 1e-9)
    assert r == pytest.approx(brute(fake, real), abs=1 / 300 + 1e-9)
    assert (p, r) == precision_recall(real, fake, k=k, batch_size=4096)


def test_precision_recall_bad_input():
    with pytest.raises(ValueError, match="dimension"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(np.ones((3, 2)), np.ones((10, 2)), k=3)
