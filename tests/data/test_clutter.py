"""fmnist-clutter (rrepa.data.clutter): deterministic, the object on top of the clutter at its recorded place and
size, labels of the placed item, cached builds equal to fresh ones, clear errors."""

import numpy as np
import pytest

from rrepa.data import clutter
from rrepa.data.datasets import DataConfig, build_dataset
from rrepa.fmnist.dataset import load_fashion_mnist


def solid_items(n: int) -> np.ndarray:
    """n 28 x 28 items, item i a solid square of value 40 + i: resized, it stays that value everywhere."""
    return np.repeat((40 + np.arange(n, dtype=np.uint8))[:, None, None], 28, 1).repeat(28, 2)


@pytest.mark.parametrize("size", [32, 40])
def test_the_object_lies_on_top_at_its_place(size):
    items = solid_items(50)
    canvas, place = clutter.draw(items, seed=3, split="train", size=size)
    assert canvas.shape == (50, 1, size, size) and canvas.dtype == np.uint8
    lo, hi = (round(28 * s) for s in clutter.SCALE)
    for i, (x0, y0, side) in enumerate(place):
        assert lo <= side <= hi and 0 <= x0 <= size - side and 0 <= y0 <= size - side
        assert (canvas[i, 0, y0:y0 + side, x0:x0 + side] == 40 + i).all()  # the item itself covers its square
        outside = canvas[i, 0].copy()
        outside[y0:y0 + side, x0:x0 + side] = 0
        assert (outside > 0).any()  # clutter around it (for this seed every image has some outside the object)


def test_deterministic_per_seed_and_split():
    items = solid_items(30)
    a, pa = clutter.draw(items, seed=0, split="train", size=32)
    b, pb = clutter.draw(items, seed=0, split="train", size=32)
    assert np.array_equal(a, b) and np.array_equal(pa, pb)
    assert not np.array_equal(a, clutter.draw(items, seed=1, split="train", size=32)[0])
    assert not np.array_equal(a, clutter.draw(items, seed=0, split="test", size=32)[0])


def test_a_cached_build_is_the_fresh_one(tmp_path):
    items = solid_items(20)
    first = clutter.cluttered(items, 0, "test", 32, root=tmp_path)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and np.array_equal(np.load(files[0]), first)
    assert np.array_equal(clutter.cluttered(items, 0, "test", 32, root=tmp_path), first)
    assert not list(tmp_path.glob("*.tmp*"))  # the write was atomic: no temporary file left


def test_the_dataset_keeps_the_source_labels(data, monkeypatch, tmp_path):
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path / "cache"))
    _, labels = load_fashion_mnist(data, "train")
    ds = build_dataset(DataConfig(name="fmnist-clutter", path=str(data), image_size=32), "train")
    assert len(ds) == len(labels) and ds.image_size == 32 and ds.channels == 1
    assert [ds.label(i) for i in range(len(ds))] == labels.tolist()
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and x.min() >= -1 and x.max() <= 1 and int(y) == int(labels[0])


def test_a_canvas_smaller_than_32_is_a_one_line_error(data):
    with pytest.raises(ValueError, match=r"set data.image_size >= 32 \(e.g. 32\), got 28"):
        build_dataset(DataConfig(name="fmnist-clutter", path=str(data)), "train")
    with pytest.raises(ValueError, match="at least 32 px"):
        clutter.draw(solid_items(2), 0, "train", 30)
