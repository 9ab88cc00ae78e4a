"""ADM's samples npz layout (rrepa.eval.npz)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rrepa.eval.npz import read_samples_npz, write_samples_npz

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
    with pytest.raises(ValueError, match=r"not an \.npz archive \(it does not start like a zip file\)"):
        read_samples_npz(tmp_path / "junk.npz")
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04" + b"\0" * 20)  # a zip's first bytes, then nothing readable
    with pytest.raises(ValueError, match="not a readable .npz file"):
        read_samples_npz(tmp_path / "cut.npz")


def test_write_samples_npz_takes_the_flows_float_output(tmp_path):
    """What `rrepa sample` writes: (N, C, H, W) floats in [-1, 1] (rounded as utils.to_uint8), labels or None."""
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    path = write_samples_npz(tmp_path / "f.npz", x, torch.arange(4) % 2)
    with np.load(path) as npz:
        assert sorted(npz.files) == ["arr_0", "labels"] and npz["labels"].dtype == np.int64
        want = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(npz["arr_0"], want)
    write_samples_npz(tmp_path / "u.npz", x[:, :1], None)  # grey, unconditional
    with np.load(tmp_path / "u.npz") as npz:
        assert npz.files == ["arr_0"] and npz["arr_0"].shape == (4, 8, 8, 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        write_samples_npz(tmp_path / "n.npz", torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="labels"):
        write_samples_npz(tmp_path / "l.npz", x, torch.zeros(3, dtype=torch.int64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npz", "u.npz"]  # nothing written on an error
