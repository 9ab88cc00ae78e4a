"""Reference statistics and their cache (rrepa.eval.reference), and the metrics of samples against them
(rrepa.eval.samples), with a cheap stand-in feature network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rrepa.eval.reference import ReferenceStats, reference_stats
from rrepa.eval.samples import evaluate_samples, format_markdown
from rrepa.training.evaluation import evaluate_in_training, summary
from rrepa.utils import as_nchw_uint8, to_uint8

pytestmark = pytest.mark.usefixtures("isolated_cache")

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
        x = as_nchw_uint8(images).float().mean(1, keepdim=True) / 255
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
    res = evaluate_samples(images, net, ref)
    assert abs(res["fid"]) < 1e-6 and res["precision"] == 1.0 and res["recall"] == 1.0
    assert res["sfid"] is None and res["class_accuracy"] is None and res["feature_network"] == "pixels-test"
    table = format_markdown(res)
    assert "| FID |" in table and "| sFID | n/a |" in table

    def sampler(m):  # floats in [-1, 1], the flow's output
        return torch.rand(m, 1, 8, 8) * 2 - 1

    out = evaluate_in_training(sampler, net, ref, 30, batch_size=7)
    assert out["num_samples"] == 30 and out["fid"] > 0 and "eval_seconds" in out
    ref.save(tmp_path / "r.npz")
    assert evaluate_in_training(sampler, net, str(tmp_path / "r.npz"), 10)["num_samples"] == 10


@pytest.mark.parametrize("bad_rows", [[], [0], [3, 8, 9], list(range(12))])
def test_in_training_evaluation_leaves_diverged_samples_out_and_counts_them(bad_rows):
    """A model early in training can overflow on a few noise vectors: those samples are left out of the metrics
    (which equal the finite samples' own) and counted, instead of ending the run."""
    net = PixelNet()
    ref = ReferenceStats.from_features(net.extract(_images(5, n=40)), net.name)
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.arange(12) % 4
    x[bad_rows, 0, 2, 3] = float("nan")
    if bad_rows:
        x[bad_rows[0], 0, 0, 0] = float("inf")
    pos = [0]

    def sampler(m):
        lo, pos[0] = pos[0], pos[0] + m
        return x[lo:lo + m], y[lo:lo + m]

    out = evaluate_in_training(sampler, net, ref, 12, batch_size=5)
    assert out["diverged"] == len(bad_rows) and out["num_samples"] == 12 - len(bad_rows)
    keep = [i for i in range(12) if i not in bad_rows]
    if len(keep) < 2:
        assert out["fid"] is None and "no FID: 12 of 12 samples diverged" in summary(out, 12, net.name)
        return
    direct = evaluate_samples(as_nchw_uint8(to_uint8(x[keep])), net, ref, labels=y[keep].numpy())
    assert out["fid"] == pytest.approx(direct["fid"], rel=1e-9, abs=1e-9)
    line = summary(out, 12, net.name)
    assert line.startswith(f"FID {direct['fid']:.3f} ({12 - len(bad_rows)} samples")
    assert (f", {len(bad_rows)} diverged (NaN or inf) and left out" in line) == bool(bad_rows)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_of_fmnist_clutter_is_a_reference(tmp_path, split):
    """fmnist-clutter-<S>px-seed<N>:<split> is the variant's canvases at that size and seed, as the data pipeline
    builds them (features taken of exactly those images), cached apart from plain Fashion-MNIST."""
    from helpers import write_fake_fmnist
    from rrepa.data.datasets import DataConfig, build_dataset
    from rrepa.eval.reference import clutter_ref

    data = write_fake_fmnist(tmp_path / "fmnist", n_train=40, n_test=24)
    net = PixelNet()
    spec = clutter_ref(36, 3, split)
    assert spec == f"fmnist-clutter-36px-seed3:{split}"
    st = reference_stats(spec, net, data_dir=str(data), pr_max=0)
    images = build_dataset(DataConfig(name="fmnist-clutter", path=str(data), image_size=36, clutter_seed=3),
                           split).images
    assert st.num_images == images.shape[0] == (40 if split == "train" else 24) and st.source == spec
    np.testing.assert_array_equal(st.feats, net.extract(images)["pool"])
    plain = reference_stats(f"fmnist:{split}", net, data_dir=str(data))
    assert not np.allclose(plain.mu, st.mu) and len(list((tmp_path / "cache" / "stats").glob("*.npz"))) == 2
    with pytest.raises(ValueError, match="a split of fmnist-clutter is named like fmnist-clutter-32px-seed0:train"):
        reference_stats("fmnist-clutter:train", net, data_dir=str(data))
