"""Tests for rrepa.metrics: Fréchet distance, Inception Score, precision / recall, ADM's npz layout,
reference statistics and their cache, and the torch-fidelity Inception path on random weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg

from rrepa import metrics
from rrepa.metrics import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    InceptionFeatures,
    ReferenceStats,
    feature_stats,
    frechet_distance,
    inception_score,
    precision_recall,
    read_samples_npz,
    reference_stats,
    write_samples_npz,
)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RREPA_OFFLINE", "1")
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


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
    real_sqrtm, calls = metrics._sqrtm, []

    def flaky(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(metrics, "_sqrtm", flaky)
    fd = frechet_distance(np.zeros(d), np.diag(a), np.ones(d), np.diag(b))
    assert len(calls) == 2 and np.allclose(calls[1], (np.diag(a) + 1e-6 * np.eye(d)) @ (np.diag(b) + 1e-6 * np.eye(d)))
    assert fd == pytest.approx(d + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-5)


def test_frechet_imaginary_component_raises(monkeypatch):
    monkeypatch.setattr(metrics, "_sqrtm", lambda m: np.eye(m.shape[0]) * (1 + 0.1j))
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


# --------------------------------------------------------------------------------------------
# ADM npz layout
# --------------------------------------------------------------------------------------------


def test_samples_npz_round_trip(tmp_path):
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4])
    path = write_samples_npz(tmp_path / "s.npz", x, labels)
    assert path == tmp_path / "s.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]
    with np.load(path) as npz:
        assert sorted(npz.files) == ["arr_0", "labels"]
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (5, 8, 8, 3)
        assert np.array_equal(npz["arr_0"], x.permute(0, 2, 3, 1).numpy())
        assert npz["labels"].dtype == np.int64
    images, y = read_samples_npz(path)
    assert np.array_equal(images, x.permute(0, 2, 3, 1).numpy()) and y.tolist() == [0, 1, 2, 3, 4]
    # ADM writes grey images as (N, H, W) or (N, H, W, 1); no labels -> None
    np.savez(tmp_path / "g.npz", arr_0=np.zeros((4, 28, 28), np.uint8))
    images, y = read_samples_npz(tmp_path / "g.npz")
    assert images.shape == (4, 28, 28, 1) and y is None


def test_samples_npz_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_samples_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        read_samples_npz(tmp_path / "f.npz")
    np.savez(tmp_path / "n.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no arr_0"):
        read_samples_npz(tmp_path / "n.npz")
    np.savez(tmp_path / "l.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="labels"):
        read_samples_npz(tmp_path / "l.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        read_samples_npz(tmp_path / "junk.npz")


# --------------------------------------------------------------------------------------------
# Reference statistics and the cache (a cheap stand-in feature network)
# --------------------------------------------------------------------------------------------


class PixelNet:
    """Stand-in feature network: 4 x 4 average-pooled grey pixels (16-d), softmax of the first 4."""

    feature_dim = 16
    has_spatial = False

    def __init__(self, name="pixels-test"):
        self.name = name
        self.calls = 0

    def extract(self, images, batch_size=None, progress=None):
        self.calls += 1
        x = metrics.as_nchw_uint8(images).float().mean(1, keepdim=True) / 255
        pool = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        if progress:
            progress(x.shape[0])
        return {"pool": pool.numpy(), "probs": torch.softmax(pool[:, :4].double() * 10, 1).numpy()}


def _images(seed, n=64, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def test_reference_stats_cache_reused_and_invalidated(tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=_images(0))
    net = PixelNet()
    st1 = reference_stats(str(ref), net)
    assert net.calls == 1 and st1.network == "pixels-test" and st1.num_images == 64
    cached = list((tmp_path / "cache" / "stats").glob("*.npz"))
    assert len(cached) == 1 and "pixels-test" in cached[0].name
    st2 = reference_stats(str(ref), net)  # reused: no new feature pass
    assert net.calls == 1 and np.array_equal(st1.sigma, st2.sigma) and np.array_equal(st1.feats, st2.feats)
    np.savez(ref, arr_0=_images(1))  # the source changes -> recomputed, same cache file overwritten
    st3 = reference_stats(str(ref), net)
    assert net.calls == 2 and not np.allclose(st3.mu, st1.mu)
    assert list((tmp_path / "cache" / "stats").glob("*.npz")) == cached
    other = PixelNet("pixels-other")  # another feature network -> its own entry
    reference_stats(str(ref), other)
    assert other.calls == 1 and len(list((tmp_path / "cache" / "stats").glob("*.npz"))) == 2
    reference_stats(str(ref), net, cache=False)
    assert net.calls == 3
    reference_stats(str(ref), net, pr_max=10)  # a different precision / recall subset -> recomputed
    assert net.calls == 4


def test_reference_stats_from_saved_and_adm_files(tmp_path):
    net = PixelNet()
    st = ReferenceStats.from_features(net.extract(_images(2)), net.name, "x", pr_max=20)
    assert st.feats.shape == (20, 16) and st.num_images == 64
    st.save(tmp_path / "stats.npz")
    loaded = reference_stats(str(tmp_path / "stats.npz"), net)
    assert net.calls == 1 and np.allclose(loaded.sigma, st.sigma) and loaded.feats.shape == (20, 16)
    with pytest.raises(ValueError, match="pixels-test, not of pixels-other"):
        reference_stats(str(tmp_path / "stats.npz"), PixelNet("pixels-other"))
    # ADM's statistics have no network entry: 2048-d means Inception
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "adm.npz", mu=rng.normal(size=2048), sigma=np.eye(2048), mu_s=np.zeros(2023),
             sigma_s=np.eye(2023))
    adm = ReferenceStats.load(tmp_path / "adm.npz")
    assert adm.network == "inception-v3-fid" and adm.mu_s.shape == (2023,) and adm.feats is None
    with pytest.raises(ValueError, match="inception-v3-fid, not of pixels-test"):
        reference_stats(str(tmp_path / "adm.npz"), net)
    # an ADM reference batch with images and statistics: stored stats, features of arr_0 for P / R
    fake_inception = PixelNet("inception-v3-fid")
    fake_inception.feature_dim = 16
    np.savez(tmp_path / "batch.npz", arr_0=_images(4), mu=np.full(16, 7.0), sigma=np.eye(16),
             network=np.array("inception-v3-fid"))
    both = reference_stats(str(tmp_path / "batch.npz"), fake_inception)
    assert np.all(both.mu == 7.0) and both.feats.shape == (64, 16) and fake_inception.calls == 1
    # statistics of unknown origin beside images: the images are used
    np.savez(tmp_path / "odd.npz", arr_0=_images(4), mu=np.full(16, 7.0), sigma=np.eye(16))
    odd = reference_stats(str(tmp_path / "odd.npz"), net)
    assert not np.all(odd.mu == 7.0) and odd.network == "pixels-test"
    with pytest.raises(FileNotFoundError, match="no such file"):
        reference_stats(str(tmp_path / "nope.npz"), net)
    np.savez(tmp_path / "empty.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="neither images"):
        reference_stats(str(tmp_path / "empty.npz"), net)


def test_evaluate_features_self_and_in_training(tmp_path):
    net = PixelNet()
    images = _images(5, n=80)
    ref = reference_stats(ReferenceStats.from_features(net.extract(images), net.name), net)
    res = metrics.evaluate_samples(images, net, ref)
    assert abs(res["fid"]) < 1e-6 and res["precision"] == 1.0 and res["recall"] == 1.0
    assert res["sfid"] is None and res["class_accuracy"] is None and res["feature_network"] == "pixels-test"
    table = metrics.format_markdown(res)
    assert "| FID |" in table and "| sFID | n/a |" in table

    def sampler(m):  # floats in [-1, 1], the flow's output
        return torch.rand(m, 1, 8, 8) * 2 - 1

    out = metrics.evaluate_in_training(sampler, net, ref, 30, batch_size=7)
    assert out["num_samples"] == 30 and out["fid"] > 0 and "eval_seconds" in out
    ref.save(tmp_path / "r.npz")
    assert metrics.evaluate_in_training(sampler, net, str(tmp_path / "r.npz"), 10)["num_samples"] == 10


# --------------------------------------------------------------------------------------------
# Inception (torch-fidelity) on random weights
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    path = metrics.make_random_inception_weights(tmp_path_factory.mktemp("inc") / "random-inception.pth", seed=0)
    return InceptionFeatures(path, batch_size=2)


def test_inception_feature_shapes(inception):
    rng = np.random.default_rng(7)
    grey = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)  # ADM layout, grey, small
    feats = inception.extract(grey)
    assert feats["pool"].shape == (3, 2048) and feats["spatial"].shape == (3, 2023)
    assert feats["probs"].shape == (3, 1008) and np.allclose(feats["probs"].sum(1), 1)
    assert all(np.isfinite(v).all() for v in feats.values())
    assert feats["pool"].std() > 0 and feats["spatial"].std() > 0
    rgb = torch.from_numpy(rng.integers(0, 256, (1, 3, 40, 33), dtype=np.uint8))  # NCHW, odd size
    assert inception.extract(rgb)["spatial"].shape == (1, 2023)
    # grey == the same image repeated to 3 channels
    rep = torch.from_numpy(grey[:1]).permute(0, 3, 1, 2).repeat(1, 3, 1, 1)
    assert np.allclose(inception.extract(rep)["pool"], feats["pool"][:1], atol=1e-5)


def test_inception_spatial_is_mixed_6d_branch1x1(inception):
    """sFID's features are the first 7 channels of Mixed_6d.branch1x1 (ADM's mixed_6/conv), flattened in
    (h, w, c) order; recompute them by running torch-fidelity's layers by hand."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    net = inception.net
    x = torch.from_numpy(np.random.default_rng(8).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    with torch.no_grad():
        h = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        h = (h - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):
            h = getattr(net, name)(h)
        conv = net.Mixed_6d.branch1x1(h)
        assert conv.shape == (2, 192, 17, 17)
        assert torch.equal(net.Mixed_6d(h)[:, :7], conv[:, :7])  # the 1x1 branch leads the concat
    want = conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    assert np.allclose(inception.extract(x)["spatial"], want, atol=1e-4, rtol=1e-4)


def test_inception_missing_weights_says_where(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        InceptionFeatures(tmp_path / "nope.pth")
    msg = str(e.value)
    assert "nope.pth" in msg and INCEPTION_FILENAME in msg and INCEPTION_URL in msg and "--inception-weights" in msg
    assert "\n" not in msg
    with pytest.raises(FileNotFoundError) as e:  # no path, offline, empty torch hub cache
        InceptionFeatures()
    hub_file = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILENAME
    assert str(hub_file) in str(e.value) and "RREPA_OFFLINE" in str(e.value)


def test_inception_bad_weights_file(tmp_path):
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not torch-fidelity's Inception"):
        InceptionFeatures(tmp_path / "bad.pth")


def test_inception_end_to_end(inception, tmp_path, monkeypatch):
    """The evaluate pipeline on the Inception path: FID on 2048-d pool features, sFID on 2023-d spatial ones
    (both Fréchet distances replaced by a cheap recorder: 2048-d square roots take seconds)."""
    calls = []

    def recorder(mu1, sigma1, mu2, sigma2, eps=1e-6, method="sqrtm"):
        calls.append((np.shape(mu1), np.shape(sigma2)))
        return float(np.sum((np.asarray(mu1) - np.asarray(mu2)) ** 2))

    monkeypatch.setattr(metrics, "frechet_distance", recorder)
    images = np.random.default_rng(9).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    res = metrics.evaluate_samples(images, inception, str(tmp_path / "ref.npz"), splits=2)
    assert calls == [((2048,), (2048, 2048)), ((2023,), (2023, 2023))]
    assert res["feature_network"] == "inception-v3-fid" and res["fid"] == 0.0 and res["sfid"] == 0.0
    assert res["precision"] == 1.0 and res["recall"] == 1.0 and res["is"] >= 1.0
    assert res["class_accuracy"] is None
