"""rrepa.data.vae: diffusers' AutoencoderKL behind VAE, checked against diffusers itself on a tiny random
AutoencoderKL saved with save_pretrained (the stand-in for SD-VAE: no network)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from rrepa.data.vae import VAE, as_dtype, check_latent_channels

SCALE, SHIFT = 0.37, 0.21


def tiny_autoencoder(seed: int = 0, **config) -> AutoencoderKL:
    """3 -> 4 channels, x2 downsampling, random weights, scaled and shifted (both must be applied)."""
    torch.manual_seed(seed)
    kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
              latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=SCALE, shift_factor=SHIFT)
    return AutoencoderKL(**{**kw, **config})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_autoencoder().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(folder):
    """diffusers' own model of the folder, float64: the independent computation."""
    return AutoencoderKL.from_pretrained(folder).double().eval()


def images(n: int = 5, c: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def test_attributes_come_from_the_config(folder):
    vae = VAE.load(folder)
    assert (vae.scaling_factor, vae.shift_factor) == (SCALE, SHIFT)
    assert (vae.in_channels, vae.latent_channels, vae.factor) == (3, 4, 2)
    assert vae.name == str(folder) and vae.latent_shape((16, 12)) == (4, 8, 6)
    assert not vae.model.training and not any(p.requires_grad for p in vae.model.parameters())


def test_encode_is_the_scaled_posterior_mean_and_decode_inverts_the_scaling(folder, reference):
    vae = VAE.load(folder, dtype=torch.float64)
    x = images()
    z = vae.encode(x)
    with torch.no_grad():
        post = reference.encode(x).latent_dist
        expected = (post.mean - SHIFT) * SCALE
        decoded = reference.decode(z / SCALE + SHIFT).sample
    assert z.shape == (5, 4, 8, 8) and z.dtype == torch.float64
    assert post.mean.std() > 0.05 and (z - post.mean).abs().max() > 0.05  # the scaling is not a no-op here
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-12)
    x_hat = vae.decode(z, clamp=False)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float64
    torch.testing.assert_close(x_hat, decoded, rtol=0, atol=1e-12)
    clamped = vae.decode(z)
    assert clamped.min() >= -1 and clamped.max() <= 1
    torch.testing.assert_close(clamped, decoded.clamp(-1, 1), rtol=0, atol=1e-12)


def test_a_posterior_sample_is_seeded_and_differs_from_the_mean(folder, reference):
    vae = VAE.load(folder, dtype=torch.float64)
    x = images()
    a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    c = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3 and (a - vae.encode(x)).abs().max() > 1e-3
    with torch.no_grad():
        post = reference.encode(x).latent_dist
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(a, (post.mean + post.std * eps - SHIFT) * SCALE, rtol=0, atol=1e-12)


def test_batches_give_the_result_of_one_batch(folder):
    vae = VAE.load(folder, dtype="float64")
    x = images(7)
    torch.testing.assert_close(vae.encode(x, batch_size=3), vae.encode(x, batch_size=7), rtol=0, atol=1e-12)
    s3 = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0), batch_size=3)
    s7 = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0), batch_size=100)
    torch.testing.assert_close(s3, s7, rtol=0, atol=1e-12)
    z = vae.encode(x)
    torch.testing.assert_close(vae.decode(z, batch_size=2), vae.decode(z, batch_size=7), rtol=0, atol=1e-12)
    assert vae.encode(x[:0]).shape == (0, 4, 8, 8) and vae.decode(z[:0]).shape == (0, 3, 16, 16)


def test_float32_and_bf16_on_the_cpu_follow_float64(folder):
    x = images()
    z64 = VAE.load(folder, dtype=torch.float64).encode(x)
    vae32 = VAE.load(folder)
    z32 = vae32.encode(x.float())
    assert z32.dtype == torch.float32 and vae32.decode(z32).dtype == torch.float32
    torch.testing.assert_close(z32.double(), z64, rtol=0, atol=1e-5)
    bf = VAE.load(folder, dtype="bf16")
    zbf = bf.encode(x.float())
    assert zbf.dtype == torch.float32 and bf.decode(zbf).dtype == torch.float32
    err = (zbf.double() - z64).abs().max() / z64.abs().max()
    assert 0 < err < 0.05  # bf16 convolutions ran (not float32), and stayed close


@pytest.mark.cuda
def test_cuda_float32_and_bf16_follow_the_cpu(folder):
    x = images()
    z64 = VAE.load(folder, dtype=torch.float64).encode(x)
    x64 = VAE.load(folder, dtype=torch.float64).decode(z64)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.05)):
        vae = VAE.load(folder, device="cuda", dtype=dtype)
        z = vae.encode(x.float().cuda(), batch_size=2)
        assert z.device.type == "cuda" and z.dtype == torch.float32
        assert (z.double().cpu() - z64).abs().max() / z64.abs().max() < tol
        assert (vae.decode(z).double().cpu() - x64).abs().max() < 2 * tol + 1e-3


def test_the_fingerprint_follows_weights_config_and_scaling(folder, tmp_path):
    fp = VAE.load(folder).fingerprint
    assert VAE.load(folder, dtype="float64").fingerprint == fp  # the same VAE, whatever the compute dtype
    other = tiny_autoencoder()
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(1e-3)
    other.save_pretrained(tmp_path / "changed")
    assert VAE.load(tmp_path / "changed").fingerprint != fp
    shutil.copytree(folder, tmp_path / "rescaled")
    cfg = json.loads((tmp_path / "rescaled" / "config.json").read_text())
    (tmp_path / "rescaled" / "config.json").write_text(json.dumps({**cfg, "scaling_factor": 0.5}))
    rescaled = VAE.load(tmp_path / "rescaled")
    assert rescaled.scaling_factor == 0.5 and rescaled.fingerprint != fp


def test_a_pipeline_folder_uses_its_vae_subfolder(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "pipe" / "vae")
    assert VAE.load(tmp_path / "pipe").fingerprint == VAE.load(folder).fingerprint


def test_bad_sources_are_one_line_errors(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"VAE .*nope: no such folder; pass a folder in diffusers layout"):
        VAE.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="stabilityai/sd-vae-ft-ema: no such folder, and downloads are off"):
        VAE.load("stabilityai/sd-vae-ft-ema")
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        VAE.load(tmp_path / "file.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VAE.load(tmp_path / "empty")
    shutil.copytree(folder, tmp_path / "noweights")
    (tmp_path / "noweights" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        VAE.load(tmp_path / "noweights")
    shutil.copytree(folder, tmp_path / "damaged")
    (tmp_path / "damaged" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="diffusers could not load .*damaged as an AutoencoderKL"):
        VAE.load(tmp_path / "damaged")
    shutil.copytree(folder, tmp_path / "unet")
    cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="holds a UNet2DModel, not an AutoencoderKL"):
        VAE.load(tmp_path / "unet")
    with pytest.raises(ValueError, match="per-channel latents_mean"):
        VAE(tiny_autoencoder(latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4))


def test_bad_inputs_are_one_line_errors(folder):
    vae = VAE.load(folder)
    with pytest.raises(ValueError, match=r"takes 3-channel images, got 1 channels"):
        vae.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"image size 15 x 16 is not divisible by VAE .* downsampling factor 2"):
        vae.encode(torch.zeros(2, 3, 15, 16))
    with pytest.raises(ValueError, match="not divisible"):
        vae.latent_shape((28, 27))
    with pytest.raises(ValueError, match="float images in \\[-1, 1\\], got torch.uint8"):
        vae.encode(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"decodes latents \(B, 4, h, w\), got \(2, 3, 8, 8\)"):
        vae.decode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="dtype must be one of"):
        as_dtype("float16")
    check_latent_channels(vae, 4)
    with pytest.raises(ValueError, match=r"gives 4 latent channels but model.in_channels is 3; .*in_channels=4"):
        check_latent_channels(vae, 3)
