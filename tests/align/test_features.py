"""The feature cache: values, flips, reuse, rebuilds on encoder / data changes, atomic builds."""

import json

import numpy as np
import pytest
import torch

from rrepa.align.encoder_base import FrozenEncoder
from rrepa.align.features import FEATURES_FILE, META_FILE, FeatureCache, IndexedFlipDataset
from rrepa.data.datasets import TensorImageDataset
from rrepa.fmnist.encoder import EmbeddedEncoder, SSLBackbone, SSLConfig

torch.set_num_threads(1)
ARCH = SSLConfig(widths=(8, 16), dim=16)
QUIET = {"progress": False, "log": lambda s: None}


class Counting(FrozenEncoder):
    """Wraps an encoder, counts its forward calls, and can fail on the k-th call."""

    def __init__(self, inner: FrozenEncoder, fail_at: int | None = None):
        super().__init__()
        self.inner = inner
        self.name, self.dim, self.image_size = inner.name, inner.dim, inner.image_size
        self.calls = 0
        self.fail_at = fail_at
        self._freeze()

    def grid(self, image_hw):
        return self.inner.grid(image_hw)

    def preprocessing_spec(self):
        return self.inner.preprocessing_spec()

    def preprocess(self, x):
        return self.inner.preprocess(x)

    def encode(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner.encode(x)


def encoder(seed=0, fail_at=None):
    torch.manual_seed(seed)
    return Counting(EmbeddedEncoder(SSLBackbone(ARCH)), fail_at)


def dataset(n=10, seed=0, hflip=False):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return TensorImageDataset(imgs, torch.arange(n) % 10, num_classes=10, hflip=hflip, name="toy")


def clean(ds, i):
    return ds.uint8(i).float().unsqueeze(0) / 127.5 - 1


def test_values_equal_direct_encoder_calls_with_flips(tmp_path):
    enc, ds = encoder(), dataset(hflip=True)  # the dataset's own random flips must not leak into the cache
    cache = FeatureCache.build_or_load(enc, ds, tmp_path, hflip=True, batch_size=4, **QUIET)
    assert len(cache) == 10 and cache.grid == (7, 7) and cache.dim == 16 and cache.hflip
    idx = torch.tensor([3, 0, 9, 3])
    flipped = torch.tensor([False, True, True, True])
    got = cache.lookup(idx, flipped)
    assert got.dtype == torch.float32 and got.shape == (4, 49, 16)
    for row, (i, f) in enumerate(zip(idx.tolist(), flipped.tolist())):
        x = clean(ds, i)
        want = enc(x.flip(-1) if f else x)[0]
        assert torch.allclose(got[row], want, atol=2e-3, rtol=2e-3)
    assert not torch.allclose(got[0], got[3])  # the flipped image's features differ from the image's
    assert torch.equal(cache.lookup(idx[:1]), got[:1])  # flipped defaults to False
    # the sidecar and the memory-mapped float16 array
    meta = json.loads((cache.path / META_FILE).read_text())
    assert meta["shape"] == [10, 2, 49, 16] and meta["dtype"] == "float16" and meta["grid"] == [7, 7]
    arr = np.load(cache.path / FEATURES_FILE, mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.dtype == np.float16


def test_cache_reused_without_calling_the_encoder(tmp_path):
    ds = dataset()
    first = FeatureCache.build_or_load(encoder(), ds, tmp_path, hflip=True, batch_size=4, **QUIET)
    again = encoder()  # same weights, a new object
    cache = FeatureCache.build_or_load(again, dataset(), tmp_path, hflip=True, batch_size=4, **QUIET)
    assert again.calls == 0 and cache.path == first.path
    no_flip = FeatureCache.build_or_load(again, ds, tmp_path, hflip=False, **QUIET)  # served by the hflip cache
    assert again.calls == 0 and torch.equal(no_flip.lookup([1, 2]), first.lookup([1, 2]))


def test_rebuilt_when_encoder_or_data_change(tmp_path):
    ds = dataset()
    old = FeatureCache.build_or_load(encoder(0), ds, tmp_path, batch_size=5, **QUIET)
    old_values = old.lookup([4]).clone()
    old_fp = old.fingerprint

    other = encoder(1)  # different weights
    cache = FeatureCache.build_or_load(other, ds, tmp_path, batch_size=5, **QUIET)
    assert other.calls == 2 and cache.fingerprint != old_fp
    assert torch.allclose(cache.lookup([4])[0], other(clean(ds, 4))[0], atol=2e-3)
    assert not torch.allclose(cache.lookup([4]), old_values)

    changed = dataset()
    changed.images[7, 0, 3, 3] ^= 1  # one pixel of one image
    same = encoder(1)
    FeatureCache.build_or_load(same, changed, tmp_path, batch_size=5, **QUIET)
    assert same.calls == 2
    longer = encoder(1)
    assert len(FeatureCache.build_or_load(longer, dataset(n=12), tmp_path, batch_size=5, **QUIET)) == 12
    assert longer.calls == 3
    flips = encoder(1)  # a cache without flips is rebuilt when flips are asked for
    assert FeatureCache.build_or_load(flips, dataset(n=12), tmp_path, hflip=True, batch_size=6, **QUIET).hflip
    assert flips.calls == 4


def test_interrupted_build_leaves_no_half_written_cache(tmp_path):
    ds = dataset()
    with pytest.raises(KeyboardInterrupt):
        FeatureCache.build_or_load(encoder(fail_at=2), ds, tmp_path, batch_size=4, **QUIET)
    assert list(tmp_path.iterdir()) == [p for p in tmp_path.iterdir() if p.name.endswith(".lock")]

    good = FeatureCache.build_or_load(encoder(), ds, tmp_path, batch_size=4, **QUIET)
    with pytest.raises(KeyboardInterrupt):  # an interrupted rebuild keeps the old, complete cache
        FeatureCache.build_or_load(encoder(5, fail_at=2), ds, tmp_path, batch_size=4, **QUIET)
    assert FeatureCache.open(good.path).fingerprint == good.fingerprint
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    stale = tmp_path / f".{good.path.name}.tmp-killed"  # what a SIGKILL'ed build leaves behind
    stale.mkdir()
    (stale / FEATURES_FILE).write_bytes(b"partial")
    fresh = encoder(7)
    FeatureCache.build_or_load(fresh, ds, tmp_path, batch_size=4, **QUIET)
    assert fresh.calls == 3 and not stale.exists()


def test_corrupt_sidecar_is_rebuilt_and_lookup_errors(tmp_path):
    ds = dataset()
    cache = FeatureCache.build_or_load(encoder(), ds, tmp_path, batch_size=10, **QUIET)
    (cache.path / META_FILE).write_text("{not json")
    enc = encoder()
    cache = FeatureCache.build_or_load(enc, ds, tmp_path, batch_size=10, **QUIET)
    assert enc.calls == 1
    with pytest.raises(ValueError, match="indices must lie in"):
        cache.lookup([10])
    with pytest.raises(ValueError, match="without hflip"):
        cache.lookup([1], [True])
    with pytest.raises(ValueError, match="flip flags"):
        cache.lookup([1, 2], [False])


def test_indexed_flip_dataset_reports_its_flips():
    ds = dataset(n=4)
    wrapped = IndexedFlipDataset(ds, hflip=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(6):
        for i in range(4):
            x, y, index, flipped = wrapped[i]
            want = clean(ds, i)[0]
            assert int(index) == i and int(y) == i % 10
            assert torch.equal(x, want.flip(-1) if flipped else want)
            seen.add(bool(flipped))
    assert seen == {True, False}
    assert not any(bool(IndexedFlipDataset(ds, hflip=False)[i][3]) for i in range(4))
