"""TARFlow on VAE latents, end to end (data.latent_run): the latent denoising step, a tiny `fmnist-latent` run from
a fresh cache (VAE, latent and feature caches built on first use), image-space grids / npz / evaluation, bits per
latent dimension, alignment targets of the clean images, and the one-line errors. Tiny random diffusers
AutoencoderKL models stand in for fmnist-vae / SD-VAE."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from PIL import Image

from helpers import write_fake_fmnist
from rrepa import cli
from rrepa.align.encoders import build_encoder
from rrepa.data.latent_run import ImageSpace, LatentsWithImages, latent_dataset, load_run_vae
from rrepa.data.latents import StaleCacheError, image_dataset
from rrepa.data.vae import VAE
from rrepa.distributed import Dist
from rrepa.flow.config import FlowConfig
from rrepa.flow.sample import draw, generate
from rrepa.flow.tarflow import TARFlow
from rrepa.fmnist import vae as fmnist_vae
from rrepa.fmnist.encoder import EMBEDDED_FILE, SSLBackbone, SSLConfig, save_embedded
from rrepa.fmnist.evaluator import FMNISTCNN, save_evaluator
from rrepa.fmnist.shipped import shipped
from rrepa.training.config import resolve
from rrepa.training.loop import train
from rrepa.training.objective import Batches
from rrepa.training.run import load_run
from rrepa.utils import from_uint8, to_uint8

# fmnist-latent shrunk: 2 blocks of 1 layer, width 32, on the 4 x 7 x 7 latents of a tiny VAE (49 tokens).
TINY = ["model.width=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1",
        "optim.batch_size=8", "optim.warmup_steps=2", "train.steps=4", "train.log_every=1", "train.sample_every=2",
        "train.ckpt_every=2", "train.sample_rows=1", "train.eval_batch_size=16"]
ALIGN = ["align.enabled=true", "align.positions=[[2, 1]]", "align.projector_hidden=32"]


def tiny_vae(path: Path, channels: int = 1, latent: int = 4, seed: int = 0) -> Path:
    """A random 3-stage AutoencoderKL (factor 4: 28 x 28 -> latent x 7 x 7), saved in diffusers layout."""
    torch.manual_seed(seed)
    AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                  latent_channels=latent, norm_num_groups=4, sample_size=28, scaling_factor=2.0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_fmnist(tmp_path_factory.mktemp("fmnist"), n_train=32, n_test=16)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh RREPA_CACHE_DIR holding a random fmnist-ssl encoder (pinned by `align`), and no VAE: fmnist-vae is
    the shipped one; training a VAE fails the test (nothing is trained on first use)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("RREPA_CACHE_DIR", str(root))
    torch.manual_seed(123)
    save_embedded(root / "encoders" / EMBEDDED_FILE, SSLBackbone(SSLConfig(widths=(8, 16), dim=16)))
    monkeypatch.setattr(fmnist_vae, "train_vae", lambda *a, **kw: pytest.fail("a VAE was trained"))
    return root


@pytest.fixture
def align(cache) -> list[str]:
    """ALIGN with the cache's random encoder pinned (the default would be the shipped fmnist-ssl)."""
    return [*ALIGN, f"align.encoder_weights={cache / 'encoders' / EMBEDDED_FILE}"]


def test_latent_denoising_is_the_score_step_in_float64():
    """draw() on a latent model = reverse, then z + sigma^2 * grad log p(z) with the gradient computed here by
    central finite differences of the flow's log-density (prior + logdet from a plain forward), in float64."""
    torch.manual_seed(0)
    cfg = FlowConfig(in_channels=4, image_height=4, image_width=4, patch_size=1, width=32, head_dim=16, num_blocks=2,
                     layers_per_block=1, num_classes=3, sigma=0.2)
    model = TARFlow(cfg).double().eval()
    for p in model.parameters():  # far from the identity, so that the score is not trivial
        p.data.add_(0.05 * torch.randn_like(p))
    z = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 2])
    x = model.reverse(z, y)
    out = draw(model, z, y)

    def log_p(v):
        o = model(v, y)
        flat = o.z.flatten(1)
        return (-0.5 * flat.pow(2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi) + o.logdet).sum()

    h, picked = 1e-5, np.random.default_rng(0).choice(x.numel(), 12, replace=False)
    score = torch.zeros(len(picked), dtype=torch.float64)
    with torch.no_grad():
        for k, i in enumerate(picked):
            e = torch.zeros(x.numel(), dtype=torch.float64)
            e[i] = h
            e = e.reshape(x.shape)
            score[k] = (log_p(x + e) - log_p(x - e)) / (2 * h)
    want = x.reshape(-1)[picked] + 0.2**2 * score
    assert torch.allclose(out.reshape(-1)[picked], want, rtol=0, atol=1e-8)
    assert (out - x).abs().max() > 1e-4  # the step moved the latents


def test_samples_are_decoded_with_the_runs_vae(tmp_path):
    """generate(to_images=ImageSpace(vae)) = the VAE's decoding of the latent samples, as (B, 1, 28, 28) images."""
    vae = VAE.load(tiny_vae(tmp_path / "v"))
    torch.manual_seed(0)
    model = TARFlow(FlowConfig(in_channels=4, image_height=7, image_width=7, patch_size=1, width=32, head_dim=16,
                               num_blocks=2, layers_per_block=1, num_classes=10, sigma=0.2)).eval()
    labels = torch.arange(5)
    latents = generate(model, labels, 5, 3, seed=1, d=Dist(), progress=False)
    images = generate(model, labels, 5, 3, seed=1, d=Dist(), progress=False, to_images=ImageSpace(vae))
    for j in latents:
        assert latents[j].shape[1:] == (4, 7, 7) and images[j].shape[1:] == (1, 28, 28)
        assert torch.allclose(images[j], vae.decode(latents[j]), atol=1e-6)
    assert ImageSpace()(latents[0]) is latents[0]  # a pixel run: as drawn


def test_fmnist_latent_first_use_train_sample_evaluate(data, cache, align, tmp_path, capsys):
    """`rrepa train --preset fmnist-latent` from a fresh cache: the shipped fmnist-vae is used (nothing trained),
    the latent and feature caches are built, training runs with alignment; grids, npz and evaluation are of decoded
    28 x 28 images; bits/dim is per latent dimension."""
    run = tmp_path / "run"
    cli.main(["train", "--preset", "fmnist-latent", "--out", str(run), "--device", "cpu", "--data-dir", str(data),
              *sum((["--set", s] for s in [*TINY, *align, "data.hflip=true"]), [])])
    out = capsys.readouterr()
    assert not (cache / "vae").exists()  # nothing trained into the cache: the shipped autoencoder
    vae = VAE.load(shipped("fmnist-vae"))
    caches = sorted(p.name for p in (cache / "latents").iterdir())
    assert len(caches) == 2 and any("-train-" in c and "-flip-" in c for c in caches)
    assert any("-test-" in c for c in caches)
    assert list((cache / "features").glob("fmnist-ssl-*"))  # targets of the clean images, cached
    stored = yaml_config(run)
    assert stored["data"]["vae"] == "fmnist-vae" and stored["data"]["vae_fingerprint"] == vae.fingerprint
    # Grids: one row of 10 decoded 28 x 28 grey images (2 px borders), not 7 x 7 latents.
    for step in (2, 4):
        with Image.open(run / "samples" / f"step-{step:07d}.png") as im:
            assert im.size == (10 * 30 + 2, 30 + 2) and im.mode == "L"
    bpd = json.loads((run / "bpd.json").read_text())
    assert bpd["unit"] == "bits per latent dimension" and bpd["space"] == "latent" and "no dequantization" in \
        bpd["protocol"] and bpd["images"] == 16
    assert bpd["bpd"] == pytest.approx(bpd["nats_per_dim"] / math.log(2))
    assert "per latent dimension" in out.out + out.err
    # --resume continues with the pinned VAE.
    cli.main(["train", "--resume", str(run), "--set", "train.steps=5", "--device", "cpu"])
    assert (run / "ckpt-0000005.pt").is_file() and yaml_config(run)["data"]["vae_fingerprint"] == vae.fingerprint
    # rrepa sample: ADM npz of the decoded images, equal to decoding the latent samples independently.
    cli.main(["sample", "--ckpt", str(run), "--num-samples", "6", "--batch-size", "4", "--format", "npz,png",
              "--device", "cpu", "--precision", "fp32"])
    npz = np.load(run / "samples-seed0.npz")
    assert npz["arr_0"].shape == (6, 28, 28, 1) and npz["arr_0"].dtype == np.uint8
    model, _ = load_run(run)
    parts = generate(model, torch.arange(6) % 10, 6, 4, 0, Dist(), progress=False)
    want = to_uint8(vae.decode(torch.cat([parts[j] for j in sorted(parts)]))).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(npz["arr_0"], want)
    # rrepa bpd: per latent dimension, labelled.
    cli.main(["bpd", "--ckpt", str(run), "--device", "cpu", "--max-images", "8"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["unit"] == "bits per latent dimension" and res["images"] == 8
    # rrepa evaluate --ckpt: decodes, then the fmnist features (a random evaluator).
    ev = save_evaluator(FMNISTCNN(), {"test_accuracy": 0.1}, tmp_path / "ev.safetensors")
    cli.main(["evaluate", "--ckpt", str(run), "--num-samples", "6", "--sample-batch-size", "3", "--ref",
              "fmnist:test", "--data-dir", str(data), "--evaluator-weights", str(ev), "--device", "cpu",
              "--out", str(tmp_path / "ev.json")])
    res = json.loads((tmp_path / "ev.json").read_text())
    assert res["num_samples"] == 6 and res["fid"] is not None
    # rrepa classify: on the test split's latents (with the training noise), as the model was trained.
    cli.main(["classify", "--ckpt", str(run), "--split", "test", "--limit", "8", "--batch-size", "4", "--device",
              "cpu", "--out", str(tmp_path / "cls")])
    report = json.loads((tmp_path / "cls" / "classify.json").read_text())
    assert report["images"] == 8 and 0 <= report["methods"]["one-step"]["top1"] <= 1


def yaml_config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


@pytest.mark.parametrize("feature_cache", [True, False])
def test_alignment_targets_are_the_clean_images_of_the_same_index_and_flip(data, cache, align, tmp_path,
                                                                          feature_cache):
    """Each latent training item (z, y, index, flipped) gets the encoder's tokens of that clean image (mirrored when
    flipped), from the feature cache or online, and z is the VAE's latents of that same image."""
    vae_dir = tiny_vae(tmp_path / "v")
    cfg = resolve("fmnist-latent", overrides=[*TINY, *align, "data.hflip=true", f"data.path={data}",
                                              f"data.vae={vae_dir}", f"align.feature_cache={feature_cache}"])
    vae = load_run_vae(cfg.data)
    latents = latent_dataset(cfg.data, vae, "train", hflip=True, progress=False)
    images = image_dataset(cfg.data, "train")
    batches = Batches(cfg, images, Dist(), lambda m: None)
    wrapped = batches.wrap(latents, True)
    assert isinstance(wrapped, LatentsWithImages) != feature_cache
    encoder = build_encoder("fmnist-ssl", cache / "encoders" / EMBEDDED_FILE)  # the one `align` pins
    torch.manual_seed(3)
    items = [wrapped[i] for i in range(12)]
    batch = [torch.stack([torch.as_tensor(it[k]) for it in items]) for k in range(len(items[0]))]
    x, y, tokens = batches.split(batch)
    index, flipped = batch[2], batch[3]
    assert flipped.any() and not flipped.all()
    clean = torch.stack([images.uint8(int(i)) for i in index])
    clean = torch.where(flipped[:, None, None, None], clean.flip(-1), clean)
    want = encoder(from_uint8(clean))
    assert torch.allclose(tokens, want, atol=2e-2 if feature_cache else 1e-6)  # the cache stores float16
    assert not torch.allclose(tokens, encoder(from_uint8(clean.flip(-1))), atol=2e-2)  # the flip matters
    assert torch.allclose(x, vae.encode(from_uint8(clean)), atol=2e-2)  # the latents of that same image
    assert batches.hw == (7, 7)  # the encoder's grid of the 28 px images, onto the 7 x 7 latent tokens


def test_one_line_errors(data, cache, tmp_path):
    vae_dir = tiny_vae(tmp_path / "v")
    base = [*TINY, f"data.path={data}", f"data.vae={vae_dir}"]
    with pytest.raises(ValueError, match=r"gives 4 latent channels but model.in_channels is 3") as err:
        train(resolve("fmnist-latent", overrides=[*base, "model.in_channels=3"]), tmp_path / "r1", device="cpu")
    assert "\n" not in str(err.value) and not (tmp_path / "r1").exists()
    with pytest.raises(ValueError, match="train.dequantize is for 8-bit images") as err:
        resolve("fmnist-latent", overrides=[*base, "train.dequantize=true"])
    with pytest.raises(ValueError, match="power-of-two multiple") as err:
        resolve("fmnist-latent", overrides=[*base, "data.image_size=30"])
    # A cache folder of another VAE is refused, in one line.
    cfg = resolve("fmnist-latent", overrides=[*base, f"data.latent_cache={tmp_path / 'lc'}"])
    latent_dataset(cfg.data, VAE.load(vae_dir), "test", progress=False)
    other = VAE.load(tiny_vae(tmp_path / "w", seed=1))
    with pytest.raises(StaleCacheError, match="another VAE") as err:
        latent_dataset(cfg.data, other, "test", progress=False)
    assert "\n" not in str(err.value)
    # A run pinned to one VAE refuses another under the same name.
    cfg.data.vae_fingerprint = other.fingerprint
    with pytest.raises(ValueError, match="the run was trained with") as err:
        ImageSpace.for_run(cfg)
    assert "\n" not in str(err.value)


def test_a_moved_vae_is_given_with_the_vae_option(data, cache, tmp_path, capsys):
    """Issue #33 item 13: a latent run whose VAE folder moved samples with `--vae NEW_PATH` (the fingerprint is still
    checked), which the error's advice names; --vae of a pixel run is refused."""
    import shutil

    vae_dir = tiny_vae(tmp_path / "v")
    run = tmp_path / "run"
    train(resolve("fmnist-latent", overrides=[*TINY, f"data.path={data}", f"data.vae={vae_dir}",
                                              "train.eval_bpd=false", "train.sample_every=0"]), run, device="cpu")
    moved = tmp_path / "moved"
    shutil.move(vae_dir, moved)
    sample = ["sample", "--ckpt", str(run), "--num-samples", "2", "--format", "npz", "--device", "cpu"]
    with pytest.raises(SystemExit):
        cli.main(sample)
    assert "--vae" in capsys.readouterr().err
    cli.main([*sample, "--vae", str(moved)])
    assert np.load(run / "samples-seed0.npz")["arr_0"].shape == (2, 28, 28, 1)
    other = tiny_vae(tmp_path / "w", seed=1)
    with pytest.raises(SystemExit):
        cli.main([*sample, "--vae", str(other), "--overwrite"])
    assert "the run was trained with" in capsys.readouterr().err
    pixels = tmp_path / "pixels"
    train(resolve("fmnist", overrides=[*TINY, f"data.path={data}", "train.eval_bpd=false", "train.sample_every=0",
                                       "model.patch_size=7"]), pixels, device="cpu")
    with pytest.raises(SystemExit):
        cli.main(["sample", "--ckpt", str(pixels), "--num-samples", "2", "--vae", str(moved), "--device", "cpu"])
    assert "this run trains on pixels" in capsys.readouterr().err


def test_grid_probes_a_latent_cell_on_its_latents(data, tmp_path):
    """`rrepa experiment probe` of a latent cell reads the split's latents (4 x 7 x 7), not the 28 x 28 images."""
    from rrepa.experiments.probes import probe_grid
    from rrepa.experiments.records import read_evals
    from rrepa.experiments.runner import run_grid

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "preset": "fmnist-latent", "seeds": [0],
        "set": [*TINY, f"data.path={data}", f"data.vae={tiny_vae(tmp_path / 'vae')}", "train.sample_every=0",
                "train.eval_every=4", "train.eval_samples=8", "train.eval_batch_size=8", "train.eval_bpd=false"],
        "arms": {"latent": []}}))
    out = tmp_path / "out"
    assert run_grid(grid, out, jobs=1, poll=0.2, probe=False, log=lambda m: None) == 0
    assert probe_grid(out, limit_train=16, limit_test=8, log=lambda m: None) == 1
    (row,) = read_evals(out / "probes.jsonl")
    assert row["arm"] == "latent" and row["step"] == 4 and row["test_images"] == 8 and 0 <= row["probe_top1"] <= 1
