"""Frozen encoders (rrepa.align.encoders): DINOv2 loading (Meta's and timm's layouts), position-embedding resampling,
preprocessing, error messages. (The embedded fmnist-ssl encoder: tests/fmnist/test_ssl_encoder.py.)"""

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models.vision_transformer import checkpoint_filter_fn  # noqa: E402

from rrepa.align.encoders import IMAGENET_MEAN, IMAGENET_STD, build_encoder  # noqa: E402

torch.set_num_threads(1)
TINY = {"depth": 2}  # ViT-S/14 width, 2 blocks: the real architecture, fast enough on a CPU


def random_vit(reg: bool = False, seed: int = 0) -> torch.nn.Module:
    """timm's DINOv2 ViT-S/14 (2 blocks) at its 37 x 37 pretraining grid with random weights everywhere
    (layer scales too, so that every block matters)."""
    torch.manual_seed(seed)
    name = "vit_small_patch14_reg4_dinov2" if reg else "vit_small_patch14_dinov2"
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=518, **TINY)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith("gamma") or k in ("cls_token", "pos_embed", "reg_token"):
                p.normal_(0, 0.5)
    return model.eval()


def meta_layout(state: dict, reg: bool = False) -> dict:
    """timm's state dict written in Meta's original layout (as in dinov2_vits14_pretrain.pth)."""
    meta = {k: v.clone() for k, v in state.items()}
    d = state["cls_token"].shape[-1]
    meta["mask_token"] = torch.randn(1, d)
    if reg:  # Meta: register_tokens, and pos_embed with a CLS entry; timm folds that entry into cls_token
        pos0 = torch.randn(1, 1, d)
        meta["register_tokens"] = meta.pop("reg_token")
        meta["cls_token"] = state["cls_token"] - pos0
        meta["pos_embed"] = torch.cat([pos0, state["pos_embed"]], 1)
    return meta


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The same random ViT saved as Meta's .pth and as timm's .safetensors."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("dinov2")
    model = random_vit()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    torch.save(meta_layout(state), root / "dinov2_vits14_pretrain.pth")
    save_file(state, str(root / "model.safetensors"))
    return root


def images(B=2, C=3, S=28, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, S, S, generator=g) * 2 - 1


# --- DINOv2 -----------------------------------------------------------------------------------------------


def test_meta_and_timm_layouts_give_identical_tokens(weights):
    a = build_encoder("dinov2_vits14", weights / "dinov2_vits14_pretrain.pth", model_kwargs=TINY)
    b = build_encoder("vit_small_patch14_dinov2.lvd142m", weights / "model.safetensors", model_kwargs=TINY)
    x = images()
    ta, tb = a(x), b(x)
    assert ta.shape == (2, 256, 384) and a.grid((28, 28)) == (16, 16) and a.dim == 384
    assert torch.equal(ta, tb)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    # a folder holding model.safetensors (timm's hub layout) works too
    assert torch.equal(build_encoder("dinov2_vits14", weights, model_kwargs=TINY)(x), ta)


def test_register_variant_meta_layout_matches_timm(tmp_path):
    from safetensors.torch import save_file

    model = random_vit(reg=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(meta_layout(state, reg=True), tmp_path / "reg.pth")
    save_file(state, str(tmp_path / "reg.safetensors"))
    a = build_encoder("dinov2_vits14_reg", tmp_path / "reg.pth", image_size=56, model_kwargs=TINY)
    b = build_encoder("dinov2_vits14_reg", tmp_path / "reg.safetensors", image_size=56, model_kwargs=TINY)
    x = images(S=56)
    assert torch.allclose(a(x), b(x), atol=1e-5)
    assert a(x).shape == (2, 16, 384)  # registers and CLS dropped


@pytest.mark.parametrize("size", [28, 56, 224])
def test_position_embedding_resampled_as_timm_does(weights, size):
    enc = build_encoder("dinov2_vits14", weights / "dinov2_vits14_pretrain.pth", image_size=size, model_kwargs=TINY)
    g = size // 14
    assert enc.grid((64, 64)) == (g, g)
    # timm's own load-time resampling of the same weights into a fixed-size model
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=size, **TINY)
    state = torch.load(weights / "dinov2_vits14_pretrain.pth", weights_only=True)
    ref.load_state_dict(checkpoint_filter_fn(dict(state), ref))
    ref.eval()
    assert ref.pos_embed.shape == (1, 1 + g * g, 384)
    assert torch.allclose(resample_abs_pos_embed(enc.model.pos_embed, (g, g), num_prefix_tokens=1), ref.pos_embed)
    x = images(S=size)
    tokens = enc(x)
    assert tokens.shape == (2, g * g, 384)
    with torch.no_grad():
        expected = ref.forward_features(enc.preprocess(x))[:, 1:]
    assert torch.allclose(tokens, expected, atol=1e-5)


def test_preprocessing_gray_to_rgb_and_imagenet_normalisation(weights):
    enc = build_encoder("dinov2_vits14", weights / "dinov2_vits14_pretrain.pth", image_size=28, model_kwargs=TINY)
    gray = images(C=1)
    assert torch.equal(enc(gray), enc(gray.expand(-1, 3, -1, -1)))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(enc.preprocess(gray), ((gray + 1) / 2 - mean) / std)  # 28 px in, 28 px: no resize
    flat = torch.full((1, 1, 56, 56), 0.2)  # constant image: the resize keeps the value
    out = enc.preprocess(flat)
    assert out.shape == (1, 3, 28, 28)
    assert torch.allclose(out, ((torch.full((1, 3, 28, 28), 0.6) - mean) / std), atol=1e-5)
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3"):
        enc(torch.zeros(1, 2, 28, 28))
    with pytest.raises(ValueError, match="expected float images"):
        enc(torch.zeros(3, 28, 28))


def test_frozen_no_grad_eval(weights):
    enc = build_encoder("dinov2_vits14", weights / "dinov2_vits14_pretrain.pth", image_size=28, model_kwargs=TINY)
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    x = images().requires_grad_(True)
    assert not enc(x).requires_grad
    assert enc(x).dtype == torch.float32
    fp = enc.fingerprint
    other = build_encoder("dinov2_vits14", weights / "dinov2_vits14_pretrain.pth", image_size=56, model_kwargs=TINY)
    assert other.fingerprint != fp  # preprocessing is part of the key


def test_missing_weights_and_bad_input_errors(weights, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_encoder("dinov2_vitb14", tmp_path / "dinov2_vitb14_pretrain.pth")
    msg = str(e.value)
    assert str(tmp_path / "dinov2_vitb14_pretrain.pth") in msg
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth" in msg
    assert "vit_base_patch14_dinov2.lvd142m" in msg and "--encoder-weights" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="hub is off"):  # conftest sets HF_HUB_OFFLINE=1
        build_encoder("dinov2_vitl14")
    with pytest.raises(ValueError, match="unknown encoder 'clip'"):
        build_encoder("clip")
    with pytest.raises(ValueError, match="multiple of 14"):
        build_encoder("dinov2_vits14", weights / "model.safetensors", image_size=100)
    # a ViT-S file named as ViT-B
    with pytest.raises(ValueError, match="does not match this model.*check the encoder name"):
        build_encoder("dinov2_vitb14", weights / "model.safetensors", model_kwargs=TINY)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read encoder weights"):
        build_encoder("dinov2_vits14", tmp_path / "junk.pth")
