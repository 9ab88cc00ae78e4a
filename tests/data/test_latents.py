"""The latent cache (rrepa.data.latents): round trip, labels, flips, staleness, resume after an interrupt and after a
SIGKILL, half-written shards, the training Dataset, and `rrepa latents encode`.

The VAE is a stand-in with rrepa.data.vae.VAE's interface (so these tests do not depend on that file): a fixed random
2 x 2 stride-2 convolution, computed in float64. It is not flip-equivariant, so the latents of a flipped image
differ from the flipped latents of the image."""

import argparse
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rrepa.data.datasets import DataConfig, TensorImageDataset
from rrepa.data.latents import (
    MANIFEST,
    LatentCache,
    LatentDataset,
    StaleCacheError,
    labels_file,
    roundtrip_error,
    shard_file,
)
from rrepa.utils import Interrupted, from_uint8

needs_vae_module = pytest.mark.skipif(importlib.util.find_spec("rrepa.data.vae") is None,
                                      reason="src/rrepa/data/vae.py is not written yet")
QUIET = {"progress": False, "log": lambda s: None}
HALF_ULP = 2.0**-11  # float16 rounding: |z16 - z| <= 2^-11 |z| in the normal range


class StandIn:
    """rrepa.data.vae.VAE's interface over a fixed random 2 x 2 stride-2 convolution (float64 inside)."""

    name = "stand-in"
    factor = 2

    def __init__(self, seed=0, channels=4, in_channels=3, fail_at=None, delay=0.0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, in_channels, 2, 2, generator=g, dtype=torch.float64)
        self.scaling_factor, self.shift_factor = 0.7, 0.1
        self.latent_channels, self.in_channels = channels, in_channels
        self.fingerprint = hashlib.sha256(self.weight.numpy().tobytes()).hexdigest()
        self.fail_at, self.delay = fail_at, delay
        self.calls, self.images = 0, 0

    def latent_shape(self, hw):
        return (self.latent_channels, hw[0] // 2, hw[1] // 2)

    def raw(self, x):
        return F.conv2d(x.to(torch.float64), self.weight, stride=2)

    def encode(self, x, sample=False, generator=None, batch_size=64):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        time.sleep(self.delay)
        self.images += len(x)
        z = self.raw(x)
        if sample:
            z = z + 0.5 * torch.randn(z.shape, generator=generator, dtype=torch.float64)
        return ((z - self.shift_factor) * self.scaling_factor).float()


def images(n=10, seed=0, channels=3, size=8, name="toy"):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return TensorImageDataset(imgs, (torch.arange(n) * 7) % 5, num_classes=5, name=name)


def clean(ds, i):
    return from_uint8(ds.uint8(i)).unsqueeze(0)


def build(path, vae=None, ds=None, **kw):
    kw = {"batch_size": 3, "shard_size": 4, **QUIET, **kw}
    return LatentCache.build_or_open(path, vae or StandIn(), ds if ds is not None else images(), **kw)


def test_round_trip_labels_and_flips(tmp_path):
    vae, ds = StandIn(), images()
    exact = build(tmp_path / "f32", vae, ds, flip=True, dtype="float32")
    half = build(tmp_path / "f16", vae, ds, flip=True)
    assert len(exact) == 10 and exact.latent_shape == (4, 4, 4) and exact.flips and half.dtype == "float16"
    assert vae.images == 2 * 2 * 10  # two caches, each image and its mirror once
    idx = torch.tensor([9, 0, 4, 9])
    flipped = torch.tensor([False, True, True, True])
    got32, got16 = exact.latents(idx, flipped), half.latents(idx, flipped)
    assert got32.dtype == torch.float32 and got32.shape == (4, 4, 4, 4)
    for row, (i, f) in enumerate(zip(idx.tolist(), flipped.tolist())):
        x = clean(ds, i).flip(-1) if f else clean(ds, i)
        want = (vae.raw(x)[0] - vae.shift_factor) * vae.scaling_factor  # float64, independent of encode()
        assert torch.equal(got32[row], want.float())  # float32 storage: exactly what the VAE gave
        assert ((got16[row].double() - want).abs() <= HALF_ULP * want.abs() + 1e-7).all()  # float16 rounding
        if f:  # the latents of the flipped image, not the flipped latents of the image
            assert not torch.allclose(got32[row], exact.latents([i])[0].flip(-1), atol=1e-2)
    assert exact.labels.tolist() == ds.targets.tolist() and exact.labels.dtype == np.int64
    assert torch.equal(exact.latents(idx[:1]), got32[:1])  # flipped defaults to False
    # the files: memory-mapped shards of (n_k, F, c, h, w), labels beside, the manifest listing them
    assert isinstance(exact.shards[0], np.memmap) and exact.shards[2].shape == (2, 2, 4, 4, 4)
    m = json.loads((tmp_path / "f16" / MANIFEST).read_text())
    assert m["shards"] == [0, 1, 2] and m["count"] == 10 and m["dtype"] == "float16" and m["flips"]
    assert m["vae"]["fingerprint"] == vae.fingerprint and m["vae"]["scaling_factor"] == 0.7
    assert m["data"]["split"] == "train" and m["data"]["image_size"] == 8 and m["mode"] == "mean"
    assert m["latent_shape"] == [4, 4, 4] and np.load(tmp_path / "f16" / labels_file(1)).tolist() == [3, 0, 2, 4]
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        exact.latents([10])


def test_storage_error_is_measured_and_recorded(tmp_path):
    vae, ds = StandIn(), images(n=12, size=16)
    cache = build(tmp_path, vae, ds, flip=True, dtype="float16")
    z = torch.cat([vae.encode(from_uint8(ds.images)), vae.encode(from_uint8(ds.images).flip(-1))]).double()
    want = roundtrip_error(z.numpy())
    assert cache.roundtrip["max"] == pytest.approx(want["max"], rel=1e-6)
    assert cache.roundtrip["rms"] == pytest.approx(want["rms"], rel=1e-6)
    assert 0 < want["rms"] < want["max"] <= HALF_ULP * z.abs().max().item() / z.std().item()
    stats = cache.manifest["latent_stats"]
    assert np.allclose(stats["mean"], z.mean(dim=(0, 2, 3)).numpy())
    assert np.allclose(stats["std"], z.std(dim=(0, 2, 3), unbiased=False).numpy())
    assert roundtrip_error(z.numpy(), "float32")["max"] < 1e-7 < want["max"]


def test_reopened_without_encoding_and_flips_serve_no_flips(tmp_path):
    first = build(tmp_path, flip=True)
    again = StandIn()
    for flip in (True, False):
        cache = build(tmp_path, again, images(), flip=flip)
        assert torch.equal(cache.latents([3, 8]), first.latents([3, 8]))
    opened = LatentCache.open(tmp_path, StandIn(), images(), split="train", sample=False, flip=True, dtype="float16")
    assert again.calls == 0 and len(opened) == 10
    assert len(LatentCache.open(tmp_path, image_size=8)) == 10  # the resolution checked without the dataset
    with pytest.raises(StaleCacheError, match="image size 8, not 16"):
        LatentCache.open(tmp_path, image_size=16)
    with pytest.raises(FileNotFoundError, match="rrepa latents encode"):
        LatentCache.open(tmp_path / "nothing")


@pytest.mark.parametrize("change, match", [
    ({"vae": StandIn(seed=1)}, r"another VAE \(stand-in @"),
    ({"ds": images(seed=1)}, r"other images under the same name \(TensorImageDataset:toy, 10\): the data changed"),
    ({"ds": images(n=9)}, r"other data \(TensorImageDataset:toy, 10 images\), not TensorImageDataset:toy \(9 images\)"),
    ({"ds": TensorImageDataset(images().images, images().targets, num_classes=5, image_size=4, name="toy")},
     "image size 8, not 4"),
    ({"split": "test"}, "holds the train split, not test"),
    ({"sample": True}, r"holds mean latents, not sample"),
    ({"sample": True, "seed": 2}, r"holds mean latents, not sample \(seed 2\)"),
    ({"flip": True}, "no latents of the flipped images"),
    ({"dtype": "float32"}, "stores float16, not float32"),
])
def test_a_stale_cache_is_refused_in_one_line_and_rebuilt_when_asked(tmp_path, change, match):
    build(tmp_path)
    kw = dict(change)
    vae, ds = kw.pop("vae", StandIn()), kw.pop("ds", images())
    for attempt in (lambda: build(tmp_path, vae, ds, **kw),
                    lambda: LatentCache.open(tmp_path, vae, ds, **{"split": "train", "sample": False, **kw})):
        with pytest.raises(StaleCacheError, match=match) as err:
            attempt()
        assert "\n" not in str(err.value) and "--rebuild" in str(err.value) and "--out" in str(err.value)
    assert vae.calls == 0
    cache = build(tmp_path, vae, ds, rebuild=True, **kw)
    assert vae.calls > 0 and LatentCache.open(tmp_path, vae, ds, **kw).manifest == cache.manifest
    noise = 2.0 if kw.get("sample") else 1e-2  # the stand-in's draws: 0.7 * 0.5 * N(0, 1)
    assert torch.allclose(cache.latents([5])[0], vae.encode(clean(ds, 5))[0], atol=noise)


def test_sample_mode_is_seeded(tmp_path):
    a = build(tmp_path / "a", sample=True, seed=3, dtype="float32")
    b = build(tmp_path / "b", sample=True, seed=3, dtype="float32")
    c = build(tmp_path / "c", sample=True, seed=4, dtype="float32")
    mean = build(tmp_path / "m", dtype="float32")
    assert np.array_equal(a.latents(range(10)), b.latents(range(10)))
    assert not np.allclose(a.latents(range(10)), c.latents(range(10)))
    noise = (a.latents(range(10)) - mean.latents(range(10))) / 0.7  # the stand-in's 0.5 * N(0, 1) draws
    assert 0.3 < noise.std().item() < 0.7 and a.manifest["seed"] == 3


@pytest.mark.parametrize("sample", [False, True])
def test_resume_after_an_interrupt_equals_an_uninterrupted_build(tmp_path, sample):
    kw = {"flip": True, "sample": sample, "seed": 5}
    whole = build(tmp_path / "whole", **kw)
    killed = StandIn(fail_at=6)  # 2 views x 3 batches: shard 0 (4 images, 2 batches) done, shard 1 half done
    with pytest.raises(Interrupted, match=r"interrupted with 1 of 3 shards complete; run the same command again"):
        build(tmp_path / "part", killed, **kw)
    part = tmp_path / "part"
    assert json.loads((part / MANIFEST).read_text())["shards"] == [0]
    assert not (part / shard_file(1)).exists()  # the half-encoded shard was never written
    before = (part / shard_file(0)).stat()
    with pytest.raises(StaleCacheError, match=r"incomplete \(1 of 3 shards\)"):
        LatentCache.open(part)
    resumed_vae = StandIn()
    resumed = build(part, resumed_vae, **kw)
    assert resumed_vae.images == 2 * 6  # shards 1 and 2 only: no shard encoded twice
    after = (part / shard_file(0)).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # shard 0 not rewritten
    for k in range(3):
        assert np.array_equal(np.load(part / shard_file(k)), np.load(tmp_path / "whole" / shard_file(k)))
        assert np.array_equal(np.load(part / labels_file(k)), np.load(tmp_path / "whole" / labels_file(k)))
    assert resumed.roundtrip == pytest.approx(whole.roundtrip, rel=1e-9)

    with pytest.raises(Interrupted):
        build(tmp_path / "part2", StandIn(fail_at=5), flip=True)
    with pytest.raises(StaleCacheError, match="half encoded with flips; finish it with the same arguments"):
        build(tmp_path / "part2", flip=False)  # a half-done cache continues as it began


def test_a_half_written_shard_is_never_read(tmp_path):
    with pytest.raises(Interrupted):
        build(tmp_path, StandIn(fail_at=4))  # one view: shard 0 complete, shard 1 half encoded
    # what a process killed while writing leaves: a temporary file, and a shard renamed into place before
    # the manifest listed it (here truncated, as no rename of ours can leave it)
    (tmp_path / f".{shard_file(1)}.x1y2.tmp").write_bytes(b"\x93NUMPY partial")
    (tmp_path / shard_file(1)).write_bytes(b"\x93NUMPY partial")
    (tmp_path / labels_file(1)).write_bytes(b"garbage")
    with pytest.raises(StaleCacheError, match="incomplete"):
        LatentCache.open(tmp_path)
    cache = build(tmp_path)
    assert np.array_equal(cache.latents(range(10)), build(tmp_path / "ref").latents(range(10)))
    assert not list(tmp_path.glob(".*.tmp"))
    # a listed shard damaged on disk is reported, not read
    np.save(tmp_path / shard_file(2), np.zeros((1, 1, 4, 4, 4), np.float16))
    with pytest.raises(StaleCacheError, match=r"shard 2 is float16 \(1, 1, 4, 4, 4\).*says float16 \(2, 1, 4, 4, 4\)"):
        LatentCache.open(tmp_path)
    # ... and a truncated one is reported before anything calls the cache complete (issue #33 item 16)
    (tmp_path / shard_file(2)).write_bytes((tmp_path / shard_file(2)).read_bytes()[:20])
    said = []
    with pytest.raises(StaleCacheError, match="shard 2 is unreadable"):
        build(tmp_path, log=said.append)
    assert not any("complete and matching" in m for m in said)


def test_resume_after_sigkill(tmp_path):
    """A real process, killed with SIGKILL after its first shard: the next build finishes it."""
    here = Path(__file__).resolve().parent
    script = (f"import sys; sys.path.insert(0, {str(here)!r}); from test_latents import StandIn, build; "
              f"build(sys.argv[1], StandIn(delay=0.3), flip=True, batch_size=2)")
    src = here.parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        m = json.loads((tmp_path / MANIFEST).read_text()) if (tmp_path / MANIFEST).is_file() else {"shards": []}
        if m["shards"]:
            break
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no shard was completed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((tmp_path / MANIFEST).read_text())["shards"]
    assert 1 <= len(done) < 3, done  # killed part way
    vae = StandIn()
    cache = build(tmp_path, vae, flip=True, batch_size=2)
    assert vae.images == 2 * sum(min(4, 10 - 4 * k) for k in range(3) if k not in done)
    assert np.array_equal(cache.latents(range(10), [True] * 10),
                          build(tmp_path / "ref", flip=True).latents(range(10), [True] * 10))


def test_concurrent_builders_take_turns(tmp_path):
    vaes, caches = [StandIn(delay=0.02), StandIn(delay=0.02)], []
    threads = [threading.Thread(target=lambda v=v: caches.append(build(tmp_path, v))) for v in vaes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(caches) == 2 and sum(v.images for v in vaes) == 10  # one encoded, the other opened its cache
    assert torch.equal(caches[0].latents(range(10)), caches[1].latents(range(10)))


def test_dataset_items_and_seeded_flips(tmp_path):
    cache = build(tmp_path, flip=True)
    ds = LatentDataset(cache, hflip=True)
    assert (len(ds), ds.channels, ds.image_size, ds.num_classes, ds.pixel_size) == (10, 4, 4, 5, 8)
    torch.manual_seed(0)
    items = [ds[i % 10] for i in range(200)]
    torch.manual_seed(0)
    assert all(bool(a[3]) == bool(b[3]) for a, b in zip(items, [ds[i % 10] for i in range(200)]))
    flips = sum(bool(it[3]) for it in items)
    assert 70 < flips < 130  # probability 1/2
    for z, y, i, f in items[:20]:
        assert z.dtype == torch.float32 and z.shape == (4, 4, 4) and y.dtype == torch.int64 and f.dtype == torch.bool
        assert torch.equal(z, cache.latents([int(i)], [bool(f)])[0]) and int(y) == cache.labels[int(i)]
    plain = LatentDataset(cache)
    assert not any(bool(plain[i][3]) for i in range(10))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert [t.shape for t in batch] == [(4, 4, 4, 4), (4,), (4,), (4,)]
    with pytest.raises(ValueError, match="no flipped latents; encode it with --flip"):
        LatentDataset(build(tmp_path / "noflip"), hflip=True)


def test_grey_images_and_bad_input(tmp_path):
    grey = images(channels=1)
    cache = build(tmp_path / "grey", StandIn(), grey)
    x = clean(grey, 2).expand(-1, 3, -1, -1)
    assert torch.allclose(cache.latents([2]), StandIn().encode(x), atol=1e-2) and cache.manifest["grey_to_rgb"]
    with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor 2"):
        build(tmp_path / "odd", ds=images(size=7))
    with pytest.raises(ValueError, match="the images have 3 channels but the VAE stand-in takes 1"):
        build(tmp_path / "ch", StandIn(in_channels=1))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"not empty and not a latent cache \(it holds notes.txt\)"):
        build(tmp_path / "mine", rebuild=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="dtype must be one of float16, float32"):
        build(tmp_path / "d", dtype="bfloat16")


@needs_vae_module
def test_with_the_real_vae_class(tmp_path):
    """rrepa.data.vae.VAE over a tiny random diffusers AutoencoderKL: the cache holds what VAE.encode gives."""
    from diffusers import AutoencoderKL

    from rrepa.data.vae import VAE

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=16,
                  scaling_factor=0.5).save_pretrained(tmp_path / "v")
    vae, ds = VAE.load(tmp_path / "v"), images(n=6, size=16)
    cache = build(tmp_path / "c", vae, ds, flip=True, dtype="float32", sample=True, seed=1)
    assert cache.latent_shape == (4, 8, 8) and cache.manifest["vae"]["fingerprint"] == vae.fingerprint
    x = from_uint8(ds.images)
    want = vae.encode(x.flip(-1))  # the mean: compare the flipped-image latents of a mean-mode cache
    mean = build(tmp_path / "m", vae, ds, flip=True, dtype="float32")
    assert torch.allclose(mean.latents(range(6), [True] * 6), want, atol=1e-5)
    assert not torch.allclose(cache.latents(range(6)), mean.latents(range(6)), atol=1e-3)  # sampled
    with pytest.raises(StaleCacheError, match="another VAE"):
        LatentCache.open(tmp_path / "m", StandIn())


# --------------------------------------------------------------------------------------------
# The command line (needs rrepa.data.vae, which the CLI imports; its VAE.load is replaced by the stand-in)
# --------------------------------------------------------------------------------------------

def run_cli(argv, monkeypatch, vae):
    from rrepa.cli import latents as cli

    monkeypatch.setattr(cli, "load_vae", lambda source, device, dtype: vae)
    parser = argparse.ArgumentParser(prog="rrepa")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["latents", "encode", *argv])
    args.func(args)


@needs_vae_module
def test_cli_encodes_an_npz_file(tmp_path, monkeypatch, capsys):
    rows = torch.randint(0, 256, (7, 3 * 8 * 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    np.savez(tmp_path / "val.npz", data=rows.numpy(), labels=np.arange(1, 8))
    out = tmp_path / "cache"
    argv = ["--vae", "x", "--data", str(tmp_path / "val.npz"), "--image-size", "8", "--out", str(out), "--flip",
            "--shard-size", "3", "--device", "cpu"]
    run_cli(argv, monkeypatch, StandIn())
    printed = capsys.readouterr().out
    assert f"wrote {out / 'train'}: 7 latents (and the latents of their mirrors) of shape 4 x 4 x 4, stored as " \
           f"float16" in printed and f"--set data.latent_cache={out} --set data.hflip=true" in printed
    cache = LatentCache.open(out / "train")  # DIR/<split>, where training looks for it
    assert cache.labels.tolist() == list(range(7)) and cache.manifest["data"]["num_classes"] == 1000
    want = StandIn().encode(from_uint8(rows.reshape(7, 3, 8, 8)[4:5]).flip(-1))
    assert torch.allclose(cache.latents([4], [True]), want, atol=1e-2)
    with pytest.raises(StaleCacheError, match="another VAE"):
        run_cli(argv, monkeypatch, StandIn(seed=2))
    with pytest.raises(ValueError, match="--image-size is required for a npz dataset"):
        run_cli(argv[:4] + argv[6:], monkeypatch, StandIn())


@needs_vae_module
def test_cli_fashion_mnist_resized(tmp_path, monkeypatch, capsys):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST is not installed (/usr/share/datasets/fashion-mnist)")
    vae = StandIn(channels=2)
    run_cli(["--vae", "x", "--data", "fmnist", "--data-dir", "/usr/share/datasets/fashion-mnist", "--split", "test",
             "--image-size", "32", "--out", str(tmp_path), "--batch-size", "500", "--device", "cpu"], monkeypatch, vae)
    assert "10000 latents of shape 2 x 16 x 16, stored as float16" in capsys.readouterr().out
    cache = LatentCache.open(tmp_path / "test")
    assert cache.manifest["grey_to_rgb"] and cache.manifest["data"]["image_size"] == 32 and len(cache.shards) == 1


@needs_vae_module
def test_training_reuses_the_cache_the_command_built(tmp_path, monkeypatch, capsys):
    """Issue #33 item 6: `rrepa latents encode ... --out DIR` then `rrepa train --set data.latent_cache=DIR` reads
    DIR/train as it is: nothing is encoded again."""
    from rrepa.data.latent_run import latent_dataset

    rows = torch.randint(0, 256, (7, 3 * 8 * 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    np.savez(tmp_path / "train.npz", data=rows.numpy(), labels=np.arange(1, 8))
    vae = StandIn()
    run_cli(["--vae", "x", "--data", str(tmp_path / "train.npz"), "--image-size", "8", "--out",
             str(tmp_path / "lat"), "--flip", "--device", "cpu"], monkeypatch, vae)
    monkeypatch.setattr(vae, "encode", lambda *a, **kw: pytest.fail("encoded again"))
    data = DataConfig(name="npz", path=str(tmp_path / "train.npz"), image_size=8, vae="x",
                      latent_cache=str(tmp_path / "lat"))
    latents = latent_dataset(data, vae, "train", hflip=True, progress=False, log=lambda m: None)
    assert len(latents) == 7
