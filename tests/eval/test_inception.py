"""The torch-fidelity FID-Inception feature network (rrepa.eval.inception) on random weights, and the evaluate
pipeline on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rrepa.eval import samples
from rrepa.eval.inception import INCEPTION_FILENAME, INCEPTION_URL, InceptionFeatures, make_random_inception_weights

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("isolated_cache")

# --------------------------------------------------------------------------------------------
# Inception (torch-fidelity) on random weights
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    path = make_random_inception_weights(tmp_path_factory.mktemp("inc") / "random-inception.pth", seed=0)
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

    monkeypatch.setattr(samples, "frechet_distance", recorder)
    images = np.random.default_rng(9).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    res = samples.evaluate_samples(images, inception, str(tmp_path / "ref.npz"), splits=2)
    assert calls == [((2048,), (2048, 2048)), ((2023,), (2023, 2023))]
    assert res["feature_network"] == "inception-v3-fid" and res["fid"] == 0.0 and res["sfid"] == 0.0
    assert res["precision"] == 1.0 and res["recall"] == 1.0 and res["is"] >= 1.0
    assert res["class_accuracy"] is None
