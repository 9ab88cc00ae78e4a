"""Tests for rrepa.fmnist.dataset: the IDX reader, where Fashion-MNIST is found, its download, and
build_dataset("fmnist"). CPU, no network."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import NEEDS_FMNIST, check_item
from rrepa.data.datasets import DataConfig, build_dataset
from rrepa.fmnist import dataset as fmnist_dataset
from rrepa.fmnist.dataset import find_fashion_mnist, read_idx

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
REAL_DOWNLOAD = fmnist_dataset.download_fashion_mnist  # kept before the autouse fixture replaces it
IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """Offline, a private cache directory, and a download that fails loudly if anything calls it."""
    monkeypatch.setenv("RREPA_OFFLINE", "1")
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path / "cache"))

    def no_download(dest, timeout=10.0):
        raise AssertionError("tests must not download")

    monkeypatch.setattr(fmnist_dataset, "download_fashion_mnist", no_download)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr)
    code = IDX_CODES[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    raw = idx_bytes(arr)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_fake_fmnist(folder: Path, n_train: int, n_test: int, gz: bool = True, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8), gz)
    return folder



# --------------------------------------------------------------------------------------------
# IDX reader
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype,shape", [(np.uint8, (5, 4, 3)), (np.int32, (7,)), (np.float32, (2, 3)),
                                         (np.int16, (3, 2)), (np.float64, (4,))])
def test_read_idx_roundtrip(tmp_path, gz, dtype, shape):
    arr = (np.arange(int(np.prod(shape))) * 3 - 5).reshape(shape).astype(dtype) if dtype != np.uint8 else \
        (np.arange(int(np.prod(shape))) % 256).reshape(shape).astype(np.uint8)
    out = read_idx(write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), arr, gz))
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("case,match", [
    ("truncated_data", "truncated"),
    ("truncated_header", "truncated IDX header"),
    ("trailing", "trailing bytes"),
    ("bad_magic", "bad IDX magic"),
    ("bad_type", "bad IDX magic"),
    ("tiny", "not an IDX file"),
])
def test_read_idx_errors_name_the_file(tmp_path, gz, case, match):
    raw = idx_bytes(np.zeros((10, 28, 28), np.uint8))
    raw = {
        "truncated_data": raw[:-100],
        "truncated_header": raw[:9],
        "trailing": raw + b"\0\0",
        "bad_magic": b"\x08\x03" + raw[2:],
        "bad_type": raw[:2] + b"\x07" + raw[3:],
        "tiny": raw[:2],
    }[case]
    path = tmp_path / f"bad-{case}{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match=match) as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_truncated_gzip(tmp_path):
    full = gzip.compress(idx_bytes(np.arange(5000, dtype=np.int32)))
    path = tmp_path / "cut.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_rejects_nan(tmp_path):
    path = write_idx(tmp_path / "f.idx", np.array([1.0, np.nan], np.float32), gz=False)
    with pytest.raises(ValueError, match="NaN"):
        read_idx(path)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason=NEEDS_FMNIST)
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(split, n):
    ds = build_dataset(DataConfig(name="fmnist"), split)
    assert len(ds) == n and (ds.channels, ds.image_size, ds.num_classes) == (1, 28, 10)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (n, 1, 28, 28)
    assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255
    assert int(ds.targets.min()) == 0 and int(ds.targets.max()) == 9
    assert torch.bincount(ds.targets).tolist() == [n // 10] * 10  # Fashion-MNIST is balanced
    for i in (0, n // 2, n - 1):
        check_item(ds, i)
        x, _ = ds[i]
        torch.testing.assert_close(x, ds.uint8(i).float() / 127.5 - 1)


def test_explicit_dir_beats_system_dir(tmp_path, monkeypatch):
    explicit = write_fake_fmnist(tmp_path / "mine", 6, 4)
    system = write_fake_fmnist(tmp_path / "system", 12, 8, gz=False)
    monkeypatch.setattr(fmnist_dataset, "FASHION_MNIST_SYSTEM_DIR", system)
    assert find_fashion_mnist(explicit) == explicit
    with pytest.raises(FileNotFoundError, match="nowhere .*does not exist"):
        find_fashion_mnist(tmp_path / "nowhere")  # a wrong explicit dir is an error, never a fallback
    assert find_fashion_mnist(None) == system
    # a parent holding a fashion-mnist/ folder is accepted too
    nested = write_fake_fmnist(tmp_path / "parent" / "fashion-mnist", 3, 2)
    assert find_fashion_mnist(tmp_path / "parent") == nested
    assert len(build_dataset(DataConfig(name="fmnist", path=str(explicit)), "train")) == 6
    assert len(build_dataset(DataConfig(name="fmnist", path=str(explicit)), "test")) == 4
    raw = build_dataset(DataConfig(name="fmnist"), "train")  # raw (not gz) files from the "system" dir
    assert len(raw) == 12
    check_item(raw, 11)


def test_cache_dir_is_searched_after_system_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_dataset, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    cache = write_fake_fmnist(tmp_path / "cache" / "fashion-mnist", 5, 5)
    assert find_fashion_mnist(None) == cache


def test_missing_everywhere_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_dataset, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError) as e:
        find_fashion_mnist(None)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("apt-get install dataset-fashion-mnist", "--data-dir", "RREPA_OFFLINE=1",
                 str(tmp_path / "absent"), str(tmp_path / "cache" / "fashion-mnist")):
        assert part in msg
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        build_dataset(DataConfig(name="fmnist"), "train")


def test_download_used_when_online_and_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_dataset, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.delenv("RREPA_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # utils.is_offline honours it too
    calls = []

    def fake_download(dest, timeout=10.0):
        calls.append(dest)
        return write_fake_fmnist(dest, 4, 2)

    monkeypatch.setattr(fmnist_dataset, "download_fashion_mnist", fake_download)
    assert find_fashion_mnist(None) == tmp_path / "cache" / "fashion-mnist"
    assert calls == [tmp_path / "cache" / "fashion-mnist"]
    assert find_fashion_mnist(None) == tmp_path / "cache" / "fashion-mnist"  # now cached
    assert len(calls) == 1


def test_download_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_dataset, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setenv("RREPA_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # utils.is_offline honours it too

    def failing(dest, timeout=10.0):
        raise OSError("network unreachable")

    monkeypatch.setattr(fmnist_dataset, "download_fashion_mnist", failing)
    with pytest.raises(FileNotFoundError, match="download failed: network unreachable"):
        find_fashion_mnist(None)


def test_download_function_with_file_urls(tmp_path, monkeypatch):
    """The real download code, fed from file:// URLs (no network): files land checked, .part files go."""
    src = write_fake_fmnist(tmp_path / "server", 4, 2)
    monkeypatch.setattr(fmnist_dataset, "FASHION_MNIST_URL", src.as_uri() + "/")
    dest = REAL_DOWNLOAD(tmp_path / "dl", timeout=1.0)
    assert fmnist_dataset._has_fashion_mnist(dest) and not list(dest.glob("*.part"))
    np.testing.assert_array_equal(read_idx(dest / "train-labels-idx1-ubyte.gz"), np.arange(4) % 10)
    bad = src / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(OSError, match="corrupt"):
        REAL_DOWNLOAD(tmp_path / "dl2", timeout=1.0)
    assert not list((tmp_path / "dl2").glob("*.part"))


def test_fashion_mnist_validation(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="28"):
        build_dataset(DataConfig(name="fmnist", image_size=32), "train")
    folder = write_fake_fmnist(tmp_path / "f", 6, 4)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 10], np.uint8), gz=True)
    with pytest.raises(ValueError, match="0..9"):
        build_dataset(DataConfig(name="fmnist", path=str(folder)), "train")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8), gz=True)
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        build_dataset(DataConfig(name="fmnist", path=str(folder)), "train")
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((5, 32, 32), np.uint8), gz=True)
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        build_dataset(DataConfig(name="fmnist", path=str(folder)), "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset(DataConfig(name="fmnist", path=str(folder)), "validation")

