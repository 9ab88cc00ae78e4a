"""Tests for rrepa.data and rrepa.data.image_io: image folders, npz batches, in-memory datasets, the config. CPU, no
network. (Fashion-MNIST: tests/fmnist/test_fmnist_dataset.py.)"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import check_item
from rrepa.data.datasets import DataConfig, TensorImageDataset, UnreadableImageError, build_dataset
from rrepa.data.image_io import center_crop_adm

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def save_image(path: Path, arr: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def rand_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


@pytest.fixture
def imagenet_root(tmp_path) -> Path:
    """root/train/{cat,dog,eel} and root/val/{cat,dog}: PNG, JPEG, odd shapes, greyscale, RGBA, one corrupt."""
    root = tmp_path / "imagenet"
    save_image(root / "train" / "dog" / "d0.png", rand_rgb(40, 60, 1))
    save_image(root / "train" / "dog" / "d1.JPEG", rand_rgb(70, 30, 2), fmt="JPEG")
    save_image(root / "train" / "cat" / "c0.jpg", rand_rgb(32, 32, 3))
    save_image(root / "train" / "cat" / "sub" / "c1.png", rand_rgb(20, 50, 4)[..., 0])  # greyscale, nested
    rgba = np.concatenate([rand_rgb(33, 45, 5), np.full((33, 45, 1), 128, np.uint8)], axis=-1)
    save_image(root / "train" / "eel" / "e0.png", rgba)
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    save_image(root / "val" / "dog" / "v0.png", rand_rgb(50, 40, 6))
    save_image(root / "val" / "cat" / "v1.jpg", rand_rgb(64, 64, 7), fmt="JPEG")
    return root


def test_folder_layout_and_items(imagenet_root):
    cfg = DataConfig(name="folder", path=str(imagenet_root), image_size=16)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert train.classes == ["cat", "dog", "eel"] and train.num_classes == test.num_classes == 3
    assert (len(train), len(test)) == (6, 2)  # the .txt file is ignored, the corrupt .png is listed
    assert test.targets.tolist() == [0, 1]  # val shares train's class indices
    assert train.channels == 3 and train.image_size == 16
    for i in range(len(test)):
        check_item(test, i)
    assert test.skipped == 0


def test_folder_skips_corrupt_image(imagenet_root, caplog):
    ds = build_dataset(DataConfig(name="folder", path=str(imagenet_root), image_size=16), "train")
    bad = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png"))
    with caplog.at_level(logging.WARNING, logger="rrepa.data"):
        for i in range(len(ds)):
            check_item(ds, i)
        x, y = ds[bad]  # met again: replaced by the next readable image, not counted twice
    assert ds.skipped == 1
    warnings = [r for r in caplog.records if "broken.png" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    nxt = (bad + 1) % len(ds)
    assert torch.equal(ds.uint8(bad), ds.uint8(nxt)) and int(y) == ds.samples[nxt][1]


def test_folder_strict_raises(imagenet_root):
    ds = build_dataset(DataConfig(name="folder", path=str(imagenet_root), image_size=16, strict=True), "train")
    bad = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png"))
    with pytest.raises(UnreadableImageError, match="broken.png"):
        ds[bad]
    check_item(ds, (bad + 1) % len(ds))


def test_folder_all_corrupt(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"garbage")
    ds = build_dataset(DataConfig(name="folder", path=str(tmp_path), image_size=8), "train")
    with pytest.raises(RuntimeError, match="no readable image"):
        ds[0]


def test_folder_class_root_serves_both_splits(tmp_path):
    for k, name in enumerate(["b", "a", "c"]):
        save_image(tmp_path / name / f"{k}.png", rand_rgb(10, 12, k))
    cfg = DataConfig(name="folder", path=str(tmp_path), image_size=8)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert train.classes == test.classes == ["a", "b", "c"]
    assert train.targets.tolist() == test.targets.tolist() == [0, 1, 2]


def test_folder_layout_errors(tmp_path, imagenet_root):
    save_image(imagenet_root / "val" / "yak" / "y.png", rand_rgb(10, 10))
    with pytest.raises(ValueError, match="yak"):
        build_dataset(DataConfig(name="folder", path=str(imagenet_root)), "test")
    only_train = tmp_path / "only"
    save_image(only_train / "train" / "a" / "x.png", rand_rgb(10, 10))
    with pytest.raises(FileNotFoundError, match="val"):
        build_dataset(DataConfig(name="folder", path=str(only_train)), "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataConfig(name="folder", path=str(tmp_path / "missing")), "train")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no image files"):
        build_dataset(DataConfig(name="folder", path=str(tmp_path / "empty")), "train")
    with pytest.raises(ValueError, match="path"):
        build_dataset(DataConfig(name="folder"), "train")


@pytest.mark.parametrize("w,h,size", [(60, 40, 16), (40, 60, 16), (200, 90, 16), (90, 200, 32), (17, 23, 28),
                                      (64, 64, 64), (129, 257, 32), (30, 31, 8)])
def test_center_crop_size(tmp_path, w, h, size):
    save_image(tmp_path / "c" / "img.png", rand_rgb(h, w))
    ds = build_dataset(DataConfig(name="folder", path=str(tmp_path), image_size=size), "train")
    assert ds.uint8(0).shape == (3, size, size)
    check_item(ds, 0)


@pytest.mark.parametrize("wide", [True, False])
def test_center_crop_keeps_the_centre(wide):
    # three bands along the long side: red | green | blue; the centre crop must be pure green
    band = 96
    arr = np.zeros((band, 3 * band, 3), np.uint8)
    for k in range(3):
        arr[:, k * band:(k + 1) * band, k] = 255
    if not wide:
        arr = np.ascontiguousarray(arr.transpose(1, 0, 2))
    out = center_crop_adm(Image.fromarray(arr), 24)  # 96 -> 48 (box) -> 24 (bicubic)
    assert out.shape == (24, 24, 3)
    assert (out[..., 1] == 255).all() and (out[..., [0, 2]] == 0).all()


def test_hflip_train_only(tmp_path):
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, 8:] = 255  # right half white
    save_image(tmp_path / "train" / "a" / "x.png", arr)
    save_image(tmp_path / "val" / "a" / "x.png", arr)
    cfg = DataConfig(name="folder", path=str(tmp_path), image_size=16, hflip=True)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    torch.manual_seed(0)
    right_white = [bool(train[0][0][:, :, -1].mean() > 0) for _ in range(64)]
    assert 10 < sum(right_white) < 54  # both orientations, about half each
    assert all(bool(test[0][0][:, :, -1].mean() > 0) for _ in range(16))
    for _ in range(8):
        assert (train.uint8(0)[:, :, -1] == 255).all()  # uint8() never flips
    flipped = next(x for x, _ in (train[0] for _ in range(64)) if x[:, :, 0].mean() > 0)
    torch.testing.assert_close(flipped, train.uint8(0).flip(-1).float() / 127.5 - 1)


# --------------------------------------------------------------------------------------------
# Downsampled-ImageNet npz batches
# --------------------------------------------------------------------------------------------


def planar_rows(n: int, side: int, base: int) -> np.ndarray:
    """Rows in CHW-planar order where channel c of image k is filled with (base + 10 k + c)."""
    vals = base + 10 * np.arange(n)[:, None] + np.arange(3)[None, :]
    return np.repeat(vals[:, :, None], side * side, axis=2).reshape(n, 3 * side * side).astype(np.uint8)


@pytest.fixture
def npz_dir(tmp_path) -> Path:
    folder = tmp_path / "imagenet8"
    folder.mkdir()
    # batch 10 must come after batch 2 (numeric, not lexicographic, order)
    for k, n in ((1, 3), (2, 2), (10, 4)):
        np.savez(folder / f"train_data_batch_{k}.npz", data=planar_rows(n, 8, k), labels=[k] * n,
                 mean=np.zeros(192))
    np.savez(folder / "val_data.npz", data=planar_rows(2, 8, 100), labels=np.array([1, 1000]))
    return folder


def test_npz_batches(npz_dir):
    cfg = DataConfig(name="npz", path=str(npz_dir), image_size=8, hflip=True)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (9, 2)
    assert (train.channels, train.image_size, train.num_classes) == (3, 8, 1000)
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 9, 9, 9, 9]  # 1-based -> 0-based, files in numeric order
    assert test.targets.tolist() == [0, 999]
    img = train.uint8(4)  # second image of batch 2: channel c filled with 2 + 10 + c
    assert img.shape == (3, 8, 8)
    for c in range(3):
        assert (img[c] == 12 + c).all()
    for i in range(len(train)):
        check_item(train, i)


def test_npz_single_file_and_resize(npz_dir):
    path = npz_dir / "train_data_batch_10.npz"
    ds = build_dataset(DataConfig(name="npz", path=str(path), image_size=4), "test")
    assert len(ds) == 4 and ds.uint8(0).shape == (3, 4, 4)
    assert (ds.uint8(1)[1] == 10 + 10 + 1).all()  # constant planes stay constant through the resize
    check_item(ds, 3)


@pytest.mark.parametrize("case,match", [
    ("label_zero", "1-based"),
    ("label_too_big", "1..1000"),
    ("bad_row", "3 \\* S \\* S"),
    ("count_mismatch", "labels must be"),
    ("missing_key", "missing array"),
    ("nan", "NaN"),
    ("float_frac", "8-bit"),
    ("not_zip", "cannot read npz"),
])
def test_npz_errors(tmp_path, case, match):
    path = tmp_path / "val_data.npz"
    rows, labels = planar_rows(3, 4, 0), np.array([1, 2, 3])
    if case == "label_zero":
        labels = np.array([0, 1, 2])
    elif case == "label_too_big":
        labels = np.array([1, 2, 1001])
    elif case == "bad_row":
        rows = rows[:, :-1]
    elif case == "count_mismatch":
        labels = labels[:2]
    elif case == "nan":
        rows = rows.astype(np.float32)
        rows[1, 5] = np.nan
    elif case == "float_frac":
        rows = rows.astype(np.float32) + 0.5
    if case == "missing_key":
        np.savez(path, data=rows)
    elif case == "not_zip":
        path.write_bytes(b"definitely not a zip")
    else:
        np.savez(path, data=rows, labels=labels)
    with pytest.raises(ValueError, match=match) as e:
        build_dataset(DataConfig(name="npz", path=str(tmp_path), image_size=4), "test")
    assert str(path) in str(e.value)


def test_npz_missing_files(tmp_path, npz_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataConfig(name="npz", path=str(tmp_path / "x"), image_size=8), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train_data_batch"):
        build_dataset(DataConfig(name="npz", path=str(tmp_path / "empty"), image_size=8), "train")
    with pytest.raises(FileNotFoundError, match="val_data.npz"):
        build_dataset(DataConfig(name="npz", path=str(tmp_path / "empty"), image_size=8), "test")
    np.savez(npz_dir / "train_data_batch_3.npz", data=planar_rows(1, 4, 0), labels=[1])
    with pytest.raises(ValueError, match="other files hold"):
        build_dataset(DataConfig(name="npz", path=str(npz_dir), image_size=8), "train")


# --------------------------------------------------------------------------------------------
# In-memory datasets, indexing, batching, config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("images,match", [
    (torch.full((2, 1, 4, 4), float("nan")), "NaN"),
    (torch.full((2, 1, 4, 4), float("inf")), "inf"),
    (torch.full((2, 1, 4, 4), 0.5), "8-bit"),
    (torch.full((2, 1, 4, 4), 300, dtype=torch.int32), "0..255"),
    (torch.zeros((2, 1, 4, 5), dtype=torch.uint8), "N, C, S, S"),
])
def test_tensor_dataset_rejects_bad_input(images, match):
    with pytest.raises(ValueError, match=match):
        TensorImageDataset(images, [0, 1], num_classes=2)


def test_tensor_dataset_float_input_and_labels():
    ds = TensorImageDataset(torch.full((2, 1, 4, 4), 255.0), [0, 1], num_classes=2)
    assert ds.uint8(0).dtype == torch.uint8 and (ds[1][0] == 1).all()
    with pytest.raises(ValueError, match="0..1"):
        TensorImageDataset(torch.zeros((2, 1, 4, 4), dtype=torch.uint8), [0, 2], num_classes=2)


def test_indexing_and_dataloader(npz_dir):
    ds = build_dataset(DataConfig(name="npz", path=str(npz_dir), image_size=8), "train")
    assert torch.equal(ds.uint8(-1), ds.uint8(len(ds) - 1))
    assert torch.equal(ds.uint8(torch.tensor(2)), ds.uint8(2))
    with pytest.raises(IndexError):
        ds[len(ds)]
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.int64


def test_config_validation():
    with pytest.raises(ValueError, match="name"):
        DataConfig(name="cifar")
    with pytest.raises(ValueError, match="image_size"):
        DataConfig(name="folder", image_size=0)
    cfg = DataConfig(name="folder")  # path may be set later; build_dataset checks it
    with pytest.raises(ValueError, match="path"):
        build_dataset(cfg, "train")
