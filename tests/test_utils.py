"""The shared helpers: atomic writes, uint8 <-> [-1, 1], seeds, the offline flag."""

import numpy as np
import pytest
import torch

from rrepa import utils


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        utils.atomic_write(target, failing)
    assert target.read_text() == "old" and not list(tmp_path.glob("*.tmp"))


def test_save_npz_is_atomic_and_keeps_the_name(tmp_path):
    path = utils.save_npz(tmp_path / "a.npz", arr_0=np.arange(6, dtype=np.uint8).reshape(1, 2, 3, 1))
    with np.load(path) as f:
        assert f["arr_0"].shape == (1, 2, 3, 1)
    class Failing:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        utils.save_npz(tmp_path / "a.npz", arr_0=np.zeros(3), bad=Failing())  # fails while writing: the old file stays
    with np.load(path) as f:
        assert f["arr_0"].sum() == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def test_uint8_round_trip_and_rounding():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = utils.from_uint8(u)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(utils.to_uint8(x), u)
    assert torch.equal(utils.to_uint8(u), u)  # uint8 passes through
    # (x + 1) * 127.5 rounded, clipped: explicit values
    assert utils.to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_to_uint8_rejects_non_finite_unless_told(bad):
    x = torch.tensor([0.0, bad])
    with pytest.raises(ValueError, match="NaN or inf"):
        utils.to_uint8(x)
    assert utils.to_uint8(x, strict=False).shape == (2,)


def test_seeds():
    assert utils.derive_seed(3, 7) == 3 * 1_000_003 + 7
    a = torch.randn(4, generator=utils.generator(3, 7))
    assert torch.equal(a, torch.randn(4, generator=torch.Generator().manual_seed(3 * 1_000_003 + 7)))
    with utils.rng_preserved():
        torch.rand(5)
    b = torch.rand(3)
    torch.manual_seed(1)
    with utils.rng_preserved():
        torch.rand(5)
    c = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(c, torch.rand(3)) and b.shape == (3,)


@pytest.mark.parametrize("env, offline", [({}, False), ({"RREPA_OFFLINE": "1"}, True),
                                          ({"HF_HUB_OFFLINE": "yes"}, True),
                                          ({"RREPA_OFFLINE": "0", "HF_HUB_OFFLINE": "off"}, False)])
def test_offline_flag(monkeypatch, env, offline):
    monkeypatch.delenv("RREPA_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert utils.is_offline() is offline


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path / "c"))
    assert utils.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RREPA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert utils.cache_dir() == tmp_path / "rrepa"


@pytest.mark.parametrize("shape,expect", [((2, 5, 4, 3), (2, 5, 4, 3)), ((2, 5, 4, 1), (2, 5, 4, 1)),
                                          ((2, 5, 4), (2, 5, 4, 1))])
def test_image_layouts_nhwc_and_nchw_agree(shape, expect):
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    nhwc = utils.check_nhwc_uint8(arr)
    assert nhwc.shape == expect
    nchw = utils.as_nchw_uint8(arr)
    assert nchw.dtype == torch.uint8 and torch.equal(nchw.permute(0, 2, 3, 1), torch.from_numpy(nhwc))


@pytest.mark.parametrize("arr,match", [(np.zeros((2, 5, 4, 3), np.float32), "must be uint8"),
                                       (np.zeros((2, 5, 4, 2), np.uint8), r"C = 1 or 3"),
                                       (np.zeros((5, 4), np.uint8), r"\(N, H, W, C\)")])
def test_image_layout_errors_name_the_input(arr, match):
    with pytest.raises(ValueError, match=match) as err:
        utils.check_nhwc_uint8(arr, "samples.npz: arr_0")
    assert str(err.value).startswith("samples.npz: arr_0 must be")
    with pytest.raises(ValueError, match=match):
        utils.as_nchw_uint8(arr)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    import os

    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_published_files_and_folders_get_the_umask_mode(tmp_path, umask, mask):
    """mkstemp / mkdtemp make private files (0600) and folders (0700); what rrepa publishes (caches, weights, run
    folders) gets the mode a plain open() or mkdir would give, and an overwritten file keeps its own mode."""
    import os
    import stat

    umask(mask)
    new = tmp_path / "new.txt"
    utils.atomic_write(new, lambda tmp: open(tmp, "w").write("x"))
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~mask
    os.chmod(new, 0o640)
    utils.atomic_write(new, lambda tmp: open(tmp, "w").write("y"))
    assert stat.S_IMODE(new.stat().st_mode) == 0o640 and new.read_text() == "y"
    folder = utils.temp_dir_beside(tmp_path / "cache")
    assert folder.parent == tmp_path and folder.name.startswith(".cache.tmp-")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask


@pytest.mark.parametrize("gap, raises", [(0.0, False), (0.5, True)])
def test_a_second_sigint_interrupts_at_once_unless_it_is_the_same_press(gap, raises):
    """deferred_interrupts turns SIGINT into a flag; a second SIGINT within `same_press` seconds (Ctrl-C reaching a
    grid's cell from the terminal and again from the runner) is the same press, a later one raises at once."""
    import os
    import signal
    import time

    with utils.deferred_interrupts(same_press=0.2) as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag and flag.signum == signal.SIGINT
        time.sleep(gap)
        if raises:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)  # the handler runs between bytecodes of this thread
        else:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)  # any later SIGTERM is absorbed: the stop is under way
            time.sleep(0.01)
        assert flag.signum == signal.SIGINT
