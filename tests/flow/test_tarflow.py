"""TARFlow: inverse, Jacobian, causality, KV cache, guidance, denoising, likelihood, labels, errors.

Math is checked in float64 on tiny models whose proj_out is randomised: a fresh model is the
identity, so a test at initialisation proves nothing.
"""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICES, random_flow
from rrepa.align.reverse import aligned_features
from rrepa.flow.blocks import KVCache, Layer
from rrepa.flow.checkpoint import load_weights, save_weights
from rrepa.flow.config import FlowConfig
from rrepa.flow.tarflow import TARFlow


def tiny(C=1, H=4, W=4, p=2, T=3, L=2, K=5, width=64, head_dim=32, sigma=0.05) -> FlowConfig:
    return FlowConfig(in_channels=C, image_height=H, image_width=W, patch_size=p, width=width, num_blocks=T,
                      layers_per_block=L, head_dim=head_dim, mlp_ratio=2, num_classes=K, sigma=sigma)


def images(cfg: FlowConfig, B: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (B, cfg.in_channels, cfg.image_height, cfg.image_width)
    return torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1


def labels(cfg: FlowConfig, B: int = 3):
    return torch.arange(B) % cfg.num_classes if cfg.num_classes else None


SHAPES = [  # (C, H, W, p, T): patch sizes 1/2/4, 1/3/4 channels, odd and even block counts, non-square
    (1, 4, 4, 1, 3),
    (1, 4, 4, 2, 2),
    (3, 4, 6, 2, 3),
    (4, 8, 8, 4, 4),
    (3, 8, 4, 2, 1),
]


# --- tokens ------------------------------------------------------------------------------------


@pytest.mark.parametrize("C,H,W,p,T", SHAPES)
def test_patchify_roundtrip_and_layout(C, H, W, p, T):
    model = TARFlow(tiny(C, H, W, p, T))
    x = torch.randn(2, C, H, W)
    tokens = model.patchify(x)
    assert tokens.shape == (2, (H // p) * (W // p), C * p * p)
    assert torch.equal(model.unpatchify(tokens), x)
    # Raster order over patches, channel-major inside a token: F.unfold's layout.
    assert torch.equal(tokens, F.unfold(x, p, stride=p).transpose(1, 2))


# --- invertibility -----------------------------------------------------------------------------


@pytest.mark.parametrize("C,H,W,p,T", SHAPES)
@pytest.mark.parametrize("K", [0, 5])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_reverse_inverts_forward(C, H, W, p, T, K, kv_cache):
    cfg = tiny(C, H, W, p, T, K=K)
    model = random_flow(cfg)
    x, y = images(cfg), labels(cfg)
    out = model(x, y)
    assert not torch.allclose(out.z, x)  # the model is not the identity
    x_rec = model.reverse(out.z, y, kv_cache=kv_cache)
    torch.testing.assert_close(x_rec, x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("guidance,anneal,attn_temp", [(0.0, False, 1.0), (0.5, False, 1.0), (1.0, True, 0.7)])
def test_kv_cache_reverse_equals_prefix_recompute(guidance, anneal, attn_temp):
    # (Strong guidance on a random model overflows exp(alpha); these weights keep values finite.)
    cfg = tiny(3, 4, 6, 2, 3)
    model = random_flow(cfg)
    z, y = images(cfg), labels(cfg)
    a = model.reverse(z, y, guidance, anneal, attn_temp, kv_cache=True)
    assert torch.isfinite(a).all()
    b = model.reverse(z, y, guidance, anneal, attn_temp, kv_cache=False)
    torch.testing.assert_close(a, b, atol=1e-11, rtol=0)


def test_reverse_with_grad_matches_no_grad_reverse():
    """Under autograd the KV cache grows by concatenation instead of in-place writes; same values."""
    cfg = tiny(1, 4, 4, 1, 2)
    model = random_flow(cfg)
    z, y = images(cfg), labels(cfg)
    x = model.reverse_with_grad(z, y)
    assert x.requires_grad
    torch.testing.assert_close(x.detach(), model.reverse(z, y), atol=1e-12, rtol=0)
    x.sum().backward()
    assert all(p.grad is not None for p in model.blocks[0].proj_out.parameters())


def test_kv_cache_preallocates_and_appends():
    cache = KVCache(length=3)
    with torch.no_grad():
        for i in range(3):
            k, v = cache.append(torch.full((1, 2, 1, 4), float(i)), torch.full((1, 2, 1, 4), -float(i)))
    assert k.shape == (1, 2, 3, 4)
    assert torch.equal(k[0, 0, :, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(v, -k)


# --- log-determinant ---------------------------------------------------------------------------


@pytest.mark.parametrize("C,H,W,p,T", [(1, 4, 4, 1, 2), (1, 4, 4, 2, 3), (3, 4, 2, 2, 2)])
@pytest.mark.parametrize("K", [0, 3])
def test_logdet_equals_slogdet_of_autograd_jacobian(C, H, W, p, T, K):
    cfg = tiny(C, H, W, p, T, K=K)
    model = random_flow(cfg)
    x = images(cfg, B=2)
    y = labels(cfg, B=2)
    out = model(x, y)
    for b in range(2):
        yb = None if y is None else y[b : b + 1]
        def f(v, yb=yb):
            return model(v.view(1, C, H, W), yb).z.flatten()
        J = torch.autograd.functional.jacobian(f, x[b].flatten())
        sign, logabsdet = torch.linalg.slogdet(J)
        assert sign > 0
        torch.testing.assert_close(out.logdet[b], logabsdet, atol=1e-9, rtol=0)
        assert abs(float(logabsdet)) > 1e-2  # a non-trivial Jacobian


# --- causality ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("k", [0, 3, 6])
def test_block_is_causal(flip, k):
    """Changing token k (in the block's order) changes no (mu, alpha) of tokens <= k."""
    cfg = tiny(1, 4, 8, 2, 2, K=3)
    model = random_flow(cfg)
    block = model.blocks[int(flip)]
    assert block.flip == flip
    e = block.embedding(torch.tensor([0, 2]))
    x = model.patchify(images(cfg, B=2))
    x2 = x.clone()
    x2[:, k] += 1.0
    mu, alpha, _ = block.mu_alpha(x, e)
    mu2, alpha2, _ = block.mu_alpha(x2, e)
    assert torch.equal(mu[:, : k + 1], mu2[:, : k + 1]) and torch.equal(alpha[:, : k + 1], alpha2[:, : k + 1])
    assert not torch.allclose(mu[:, k + 1], mu2[:, k + 1])  # token k+1 does see token k
    assert torch.equal(mu[:, 0], torch.zeros_like(mu[:, 0])) and torch.equal(alpha[:, 0], torch.zeros_like(mu[:, 0]))


def test_hidden_states_are_in_raster_order():
    """Block 2 flips: its hidden state at raster position j depends only on raster tokens >= j."""
    cfg = tiny(1, 4, 8, 2, 2, K=0)
    model = random_flow(cfg)
    x = images(cfg, B=1)
    k = 3  # raster token index
    # Block 2's input is block 1's output: perturb raster token k there.
    z1 = model.blocks[0](model.patchify(x), None)[0]
    z1b = z1.clone()
    z1b[:, k] += 1.0
    h = model.blocks[1](z1, None, keep=[1])[2][1]
    h2 = model.blocks[1](z1b, None, keep=[1])[2][1]
    assert torch.equal(h[:, k + 1 :], h2[:, k + 1 :])
    assert not torch.allclose(h[:, k], h2[:, k])
    # And the model-level hidden states are the block-level ones.
    out = model(x, hidden=[(1, 2), (2, 1)])
    assert set(out.hidden) == {(1, 2), (2, 1)}
    torch.testing.assert_close(out.hidden[(2, 1)], h)
    assert out.hidden[(1, 2)].shape == (1, cfg.num_tokens, cfg.width)


# --- attention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temp", [1.0, 0.5])
def test_layer_matches_explicit_attention(temp):
    torch.manual_seed(0)
    layer = Layer(width=64, head_dim=32, mlp_ratio=2).double()
    h = torch.randn(2, 5, 64, dtype=torch.float64)
    q_scale = torch.full((2, 1, 1, 1), 1 / temp, dtype=torch.float64)
    out = layer(h, q_scale)
    # Explicit: pre-norm, heads of 32, softmax(q k^T / (sqrt(32) temp)) with a causal mask, GELU MLP.
    a = F.layer_norm(h, (64,), layer.attn_norm.weight, layer.attn_norm.bias)
    q, k, v = (a @ layer.qkv.weight.T + layer.qkv.bias).split(64, dim=-1)
    heads = [slice(0, 32), slice(32, 64)]
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    att = []
    for s in heads:
        logits = q[..., s] @ k[..., s].transpose(1, 2) / (math.sqrt(32) * temp)
        att.append(logits.masked_fill(~mask, -math.inf).softmax(-1) @ v[..., s])
    ref = h + torch.cat(att, -1) @ layer.attn_out.weight.T + layer.attn_out.bias
    m = F.layer_norm(ref, (64,), layer.mlp_norm.weight, layer.mlp_norm.bias)
    ref = ref + F.gelu(m @ layer.fc1.weight.T + layer.fc1.bias) @ layer.fc2.weight.T + layer.fc2.bias
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


# --- guidance ----------------------------------------------------------------------------------


def test_guidance_zero_equals_unguided():
    cfg = tiny(3, 4, 4, 2, 2)
    model = random_flow(cfg)
    z, y = images(cfg), labels(cfg)
    torch.testing.assert_close(model.reverse(z, y, guidance=0.0, attn_temp=0.5), model.reverse(z, y), atol=0, rtol=0)


@pytest.mark.parametrize("K", [0, 4])
@pytest.mark.parametrize("w,anneal,attn_temp", [(1.0, False, 1.0), (2.5, True, 1.0), (1.5, False, 0.6)])
def test_guided_block_reverse_matches_formula(K, w, anneal, attn_temp):
    """Guided inversion of one block: the forward of the result under the guided (mu, alpha),
    (1 + w_i) cond - w_i uncond from two independent parallel passes, gives back z."""
    cfg = tiny(1, 4, 6, 2, 2, K=K)
    model = random_flow(cfg)
    z = model.patchify(images(cfg))
    y = labels(cfg)
    for block in model.blocks:
        e, e_null = block.embedding(y), block.embedding(None)
        x = block.reverse(z, e, e_null, guidance=w, anneal=anneal, attn_temp=attn_temp)
        xp = block.permute(x)
        mu_c, alpha_c, _ = block.mu_alpha(xp, e)
        q_scale = torch.full((xp.shape[0], 1, 1, 1), 1 / attn_temp, dtype=xp.dtype)
        mu_u, alpha_u, _ = block.mu_alpha(xp, e_null, q_scale=q_scale)
        N = cfg.num_tokens
        # Token j (j >= 1) is produced at step i = j - 1, with w_i = w (i + 1) / (N - 1) when annealed.
        wj = torch.tensor([w * j / (N - 1) if anneal else w for j in range(N)], dtype=xp.dtype)[None, :, None]
        mu = (1 + wj) * mu_c - wj * mu_u
        alpha = (1 + wj) * alpha_c - wj * alpha_u
        torch.testing.assert_close((xp - mu) * torch.exp(-alpha), block.permute(z), atol=1e-10, rtol=0)
        if K or attn_temp != 1.0:
            assert not torch.allclose(x, block.reverse(z, e))  # guidance changed the sample


# --- likelihood --------------------------------------------------------------------------------


def test_bits_per_dim_analytic():
    """One block, proj_out weight 0 and bias (mu, alpha) = (m, a): z_0 = x_0 and z_i = (x_i - m) e^-a for
    i >= 1, so every term of the bits/dim can be written by hand."""
    cfg = tiny(1, 4, 4, 2, T=1, K=0)
    model = TARFlow(cfg).double()
    m, a = 0.25, -0.5
    D, N = cfg.token_dim, cfg.num_tokens
    with torch.no_grad():
        model.blocks[0].proj_out.bias.copy_(torch.tensor([m] * D + [a] * D))
    x = torch.full((1, 1, 4, 4), 200, dtype=torch.uint8)
    u = torch.full((1, 1, 4, 4), 0.5, dtype=torch.float64)
    v = 200.5 / 128 - 1
    sq = D * v**2 + (N - 1) * D * ((v - m) * math.exp(-a)) ** 2
    nll_nats = (0.5 * sq + 0.5 * N * D * math.log(2 * math.pi) - (-a * (N - 1) * D)) / (N * D)
    expected = (nll_nats + math.log(128)) / math.log(2)
    assert float(model.bits_per_dim(x, noise=u).detach()) == pytest.approx(expected, abs=1e-12)


def test_nll_is_per_dimension_and_differentiable():
    cfg = tiny(3, 4, 4, 2, 2)
    model = random_flow(cfg)
    x, y = images(cfg), labels(cfg)
    nll = model.nll(x, y)
    torch.testing.assert_close(nll, -model.log_prob(x, y) / (3 * 4 * 4))
    nll.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# --- denoising ---------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [0, 3])
def test_denoise_equals_finite_difference_score(K):
    cfg = tiny(1, 4, 4, 2, 2, K=K, sigma=0.1)
    model = random_flow(cfg)
    y_img = images(cfg, B=2)
    y = labels(cfg, B=2)
    x_hat = model.denoise(y_img, y)
    # Independent score: central differences of log p, coordinate by coordinate.
    h = 1e-5
    score = torch.zeros_like(y_img)
    flat = score.view(2, -1)
    with torch.no_grad():
        for i in range(flat.shape[1]):
            d = torch.zeros_like(y_img).view(2, -1)
            d[:, i] = h
            d = d.view_as(y_img)
            flat[:, i] = (model.log_prob(y_img + d, y) - model.log_prob(y_img - d, y)) / (2 * h)
    torch.testing.assert_close(x_hat, y_img + 0.1**2 * score, atol=1e-8, rtol=0)
    assert not x_hat.requires_grad


def test_sample_shapes_and_reproducibility():
    cfg = tiny(3, 4, 4, 2, 2, K=4)
    model = random_flow(cfg)
    y = torch.tensor([0, 3])
    a = model.sample(2, y, guidance=1.0, generator=torch.Generator().manual_seed(7))
    b = model.sample(2, y, guidance=1.0, generator=torch.Generator().manual_seed(7))
    assert a.shape == (2, 3, 4, 4) and a.dtype == torch.float64
    assert torch.equal(a, b)
    # denoise=False returns the raw reverse of the same z
    z = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    raw = model.sample(2, y, guidance=1.0, denoise=False, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(raw, model.reverse(z, y, guidance=1.0))
    torch.testing.assert_close(a, model.denoise(raw, y))


def test_sample_keeps_the_finite_rows_of_a_diverged_batch(monkeypatch):
    """Issue #33 item 1: a diverged sample comes back as it is, with a warning naming its row, and the others are
    denoised exactly as without it."""
    cfg = tiny(1, 4, 4, 2, 2, K=4)
    model = random_flow(cfg)
    y = torch.tensor([0, 1, 2])
    clean = model.sample(3, y, generator=torch.Generator().manual_seed(7))
    reverse = TARFlow.reverse

    def diverging(self, z, *args, **kwargs):
        x, stats = reverse(self, z, *args, **kwargs)
        x = x.clone()
        x[1] = math.nan
        return x, stats

    monkeypatch.setattr(TARFlow, "reverse", diverging)
    with pytest.warns(RuntimeWarning, match=r"1 of 3 samples diverged \(NaN or inf\).*rows \[1\]"):
        x = model.sample(3, y, generator=torch.Generator().manual_seed(7))
    assert torch.isnan(x[1]).all()
    torch.testing.assert_close(x[[0, 2]], clean[[0, 2]])
    with pytest.raises(ValueError, match=r"in 1 of 3 images \(rows \[1\]\).*the model or sampler diverged"):
        model.denoise(x, y)  # not "check the data pipeline" alone


@pytest.mark.parametrize("n,kwargs,match", [
    (0, {}, "n \\(the number of samples\\) must be an int >= 1, got 0"),
    (-1, {}, "must be an int >= 1, got -1"),
    (2.5, {}, "must be an int >= 1, got 2.5"),
    (2, {"guidance": math.nan}, "guidance and attn_temp must be finite numbers, got nan"),
    (2, {"attn_temp": math.inf}, "must be finite numbers, got 0.0 and inf"),
])
def test_sample_refuses_bad_arguments_up_front(n, kwargs, match):
    """Issue #33 items 1 and 20: no torch internals, no NaN samples blamed on the data."""
    with pytest.raises(ValueError, match=match):
        TARFlow(tiny(K=0)).sample(n, **kwargs)


def test_likelihood_of_images_far_outside_the_scale_warns():
    """Issue #33 item 20: nll(x * 100) is not silently a number."""
    cfg = tiny(1, 4, 4, 2, 2, K=0)
    model = random_flow(cfg)
    x = images(cfg)
    with pytest.warns(RuntimeWarning, match=r"values up to .* far outside \[-1, 1\].*rescale them"):
        model.nll(x * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.nll(x * 4)  # training noise, dequantization and a latent flow's latents: no warning


def test_from_pretrained_says_what_a_path_is(tmp_path):
    """Issue #33 item 20: a missing local path is not a malformed hub id, and a run folder points to export."""
    for missing in ("/nonexistent", str(tmp_path / "no" / "such"), "../nothing-here"):
        with pytest.raises(FileNotFoundError, match=f"{missing} does not exist .*give a pretrained folder"):
            TARFlow.from_pretrained(missing)
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt-0000001.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a run folder of `rrepa train`.*rrepa export --ckpt"):
        TARFlow.from_pretrained(run)
    with pytest.raises(FileNotFoundError, match="holds no config.json: not a pretrained folder"):
        TARFlow.from_pretrained(tmp_path)
    model = random_flow(tiny(K=0))
    model.save_pretrained(tmp_path / "ok")
    assert TARFlow.from_pretrained(tmp_path / "ok").cfg == model.cfg


# --- labels ------------------------------------------------------------------------------------


def test_null_label_is_mean_embedding():
    cfg = tiny(1, 4, 4, 2, 3, K=5)
    model = random_flow(cfg)
    x = images(cfg)
    for block, e in zip(model.blocks, model.embeddings(None)):
        torch.testing.assert_close(e, block.class_embed.mean(0))
    uniform = torch.full((3, 5), 0.2, dtype=torch.float64)
    torch.testing.assert_close(model(x, None).z, model(x, uniform).z)
    # label dropout with p = 1 drops every label to the null label
    torch.testing.assert_close(model(x, labels(cfg), label_drop=1.0).z, model(x, None).z)


def test_class_weights_interpolate_embeddings():
    cfg = tiny(1, 4, 4, 2, 2, K=3)
    model = random_flow(cfg)
    x = images(cfg, B=2)
    one_hot = F.one_hot(torch.tensor([2, 0]), 3).double()
    torch.testing.assert_close(model(x, one_hot).z, model(x, torch.tensor([2, 0])).z)


def test_different_labels_give_different_outputs():
    cfg = tiny(1, 4, 4, 2, 2, K=3)
    model = random_flow(cfg)
    x = images(cfg, B=1)
    zs = [model(x, torch.tensor([k])).z for k in range(3)]
    assert not torch.allclose(zs[0], zs[1]) and not torch.allclose(zs[1], zs[2])
    lp = [float(model.log_prob(x, torch.tensor([k])).detach()) for k in range(3)]
    assert len(set(lp)) == 3


# --- precision ---------------------------------------------------------------------------------


def test_float32_forward_reverse():
    cfg = tiny(3, 8, 8, 2, 2)
    model = random_flow(cfg).float()
    x = images(cfg).float()
    out = model(x, labels(cfg))
    assert out.z.dtype == torch.float32
    torch.testing.assert_close(model.reverse(out.z, labels(cfg)), x, atol=1e-4, rtol=0)


# --- save / load -------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [2, (1, 3, 1)])
def test_save_load_roundtrip(tmp_path, L):
    cfg = tiny(3, 4, 4, 2, 3, L=L, K=4)
    model = random_flow(cfg).float()
    save_weights(tmp_path / "w.safetensors", model)
    loaded = load_weights(tmp_path / "w.safetensors")
    assert loaded.cfg == cfg
    x = images(cfg).float()
    torch.testing.assert_close(loaded(x, labels(cfg)).z, model(x, labels(cfg)).z, atol=0, rtol=0)


def test_loading_weights_of_another_shape_fails_clearly(tmp_path):
    from rrepa.flow.checkpoint import load_state_checked

    save_weights(tmp_path / "w.safetensors", TARFlow(tiny(width=64)))
    other = TARFlow(tiny(width=96))
    state = load_weights(tmp_path / "w.safetensors").state_dict()
    with pytest.raises(ValueError, match=r"blocks.0.pos_embed has shape \(4, 64\), expected \(4, 96\)"):
        load_state_checked(other, state)
    with pytest.raises(ValueError, match="missing keys"):
        load_state_checked(TARFlow(tiny(T=4)), state)


def test_corrupt_or_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(tmp_path / "nope.safetensors")
    save_weights(tmp_path / "w.safetensors", TARFlow(tiny()))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_weights(tmp_path / "cut.safetensors")


# --- bad input ---------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    cfg = tiny(3, 4, 4, 2, 2, K=4)
    model = TARFlow(cfg)
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"shape \(B, 3, 4, 4\).*got \(2, 1, 4, 4\)"):
        model(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(B, 3, 4, 4\).*got \(2, 3, 8, 8\)"):
        model(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"float tensor"):
        model(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    for bad in (math.nan, math.inf):
        xb = x.clone()
        xb[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            model(xb)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got values in \[0, 4\]"):
        model(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        model(x, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"class weights must have shape \(2, 4\)"):
        model(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="class weights contain NaN"):
        model(x, torch.full((2, 4), math.nan))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        model(x, torch.tensor([0]))
    with pytest.raises(ValueError, match="unconditional model"):
        TARFlow(tiny(3, 4, 4, 2, 2, K=0))(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside this model's blocks 1..2 and layers 1..2"):
        model(x, hidden=[(3, 1)])
    with pytest.raises(ValueError, match=r"shape \(B, 3, 4, 4\)"):
        model.reverse(torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="uint8"):
        model.bits_per_dim(x)


@pytest.mark.parametrize("kwargs,match", [
    ({"patch_size": 3}, "patch_size 3 does not divide the image size 4 x 4"),
    ({"width": 100}, "width 100 is not a multiple of head_dim 32"),
    ({"num_classes": -1}, "num_classes must be >= 0"),
    ({"num_blocks": 0}, "num_blocks must be >= 1"),
    ({"layers_per_block": 0}, "layers_per_block must be >= 1, got 0"),
    ({"layers_per_block": (1, 2, 3)}, r"lists 3 layer counts \[1, 2, 3\] for num_blocks = 2; give one count per block"),
    ({"layers_per_block": (1, 0)}, r"entries must be >= 1, got \[1, 0\]"),
    ({"layers_per_block": (1, 1.5)}, "an int or a list of ints"),
    ({"layers_per_block": "2"}, "an int or a list of ints"),
])
def test_bad_config_raises(kwargs, match):
    base = dict(in_channels=1, image_height=4, image_width=4, patch_size=2, width=64, num_blocks=2,
                layers_per_block=1, head_dim=32, num_classes=3)
    with pytest.raises(ValueError, match=match):
        FlowConfig(**{**base, **kwargs})


# --- per-block layer counts (STARFlow's deep-shallow design) ----------------------------------

RAGGED = [  # (C, H, W, p, layers per block): a deep block last (STARFlow), first, in the middle; N = 16, 6, 4
    (1, 4, 4, 1, (1, 1, 3)),
    (3, 4, 6, 2, (3, 1)),
    (1, 4, 4, 2, (2, 1, 4, 1)),
]


def test_layer_counts_and_positions_of_a_ragged_config():
    cfg = tiny(T=3, L=[3, 1, 2])  # a list (as from JSON / YAML) is stored as a tuple
    assert cfg.layers_per_block == (3, 1, 2) and cfg.layer_counts == (3, 1, 2)
    assert [cfg.layers(t) for t in (1, 2, 3)] == [3, 1, 2]
    assert cfg.positions == [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1), (3, 2)]
    assert cfg == tiny(T=3, L=(3, 1, 2)) and hash(cfg) == hash(tiny(T=3, L=(3, 1, 2)))
    assert tiny(T=3, L=2).layer_counts == (2, 2, 2) and tiny(T=3, L=2).layers(3) == 2
    assert [len(b.layers) for b in TARFlow(cfg).blocks] == [3, 1, 2]
    with pytest.raises(ValueError, match=r"block 4 is outside this model's blocks 1..3"):
        cfg.layers(4)
    # A layer beyond its own block's count is refused, naming that block's range, even where another block has it.
    cfg.check_positions([(1, 3), (2, 1), (3, 2)])
    with pytest.raises(ValueError, match=r"\(block 2, layer 2\) is outside this model's blocks 1..3 \(layers per "
                                         r"block \[3, 1, 2\]\); block 2 has layers 1..1"):
        cfg.check_positions([(1, 3), (2, 2)])
    with pytest.raises(ValueError, match=r"block 3 has layers 1..2 \(1-indexed\); e.g. \(3, 2\) is the deepest"):
        TARFlow(cfg)(images(cfg), labels(cfg), hidden=[(3, 3)])
    with pytest.raises(ValueError, match=r"\(block 4, layer 1\) is outside this model's blocks 1..3 \(layers"):
        cfg.check_positions([(4, 1)])


def test_a_ragged_config_round_trips_through_json():
    """What save_weights stores (FlowConfig.to_dict as JSON) and load_run reads (FlowConfig.from_dict): the tuple
    comes back."""
    cfg = tiny(T=3, L=(3, 1, 2))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["layers_per_block"] == [3, 1, 2]
    assert FlowConfig.from_dict(d) == cfg and FlowConfig.from_dict(d).layers_per_block == (3, 1, 2)
    assert FlowConfig.from_dict(json.loads(json.dumps(tiny(L=2).to_dict()))).layers_per_block == 2


@pytest.mark.parametrize("C,H,W,p,L", RAGGED)
@pytest.mark.parametrize("kv_cache", [True, False])
def test_ragged_model_inverts_exactly(C, H, W, p, L, kv_cache):
    cfg = tiny(C, H, W, p, T=len(L), L=L)
    model = random_flow(cfg)
    x, y = images(cfg), labels(cfg)
    out = model(x, y)
    assert not torch.allclose(out.z, x)
    torch.testing.assert_close(model.reverse(out.z, y, kv_cache=kv_cache), x, atol=1e-10, rtol=0)
    torch.testing.assert_close(model.reverse(out.z, y, guidance=0.5, kv_cache=kv_cache),
                               model.reverse(out.z, y, guidance=0.5, kv_cache=not kv_cache), atol=1e-11, rtol=0)


@pytest.mark.parametrize("C,H,W,p,L", RAGGED[:2])
def test_ragged_logdet_equals_slogdet_of_autograd_jacobian(C, H, W, p, L):
    cfg = tiny(C, H, W, p, T=len(L), L=L, K=3)
    model = random_flow(cfg)
    x, y = images(cfg, B=1), labels(cfg, B=1)
    J = torch.autograd.functional.jacobian(lambda v: model(v.view(1, C, H, W), y).z.flatten(), x.flatten())
    sign, logabsdet = torch.linalg.slogdet(J)
    assert sign > 0 and abs(float(logabsdet)) > 1e-2
    torch.testing.assert_close(model(x, y).logdet[0], logabsdet, atol=1e-9, rtol=0)


@pytest.mark.parametrize("C,H,W,p,L", RAGGED)
def test_ragged_hidden_states_of_every_block(C, H, W, p, L):
    """Every (block, layer) of a ragged model comes back, (B, N, width) in raster order: each equal to that block's
    own transformer run on its input, the deepest layer of block t being its layer L_t."""
    cfg = tiny(C, H, W, p, T=len(L), L=L)
    model = random_flow(cfg)
    x, y = images(cfg), labels(cfg)
    out = model(x, y, hidden=cfg.positions)
    assert list(out.hidden) == cfg.positions and len(out.hidden) == sum(L)
    es = model.embeddings(y)
    for t, block in enumerate(model.blocks, start=1):
        _, hs = block.transformer(block.permute(out.inputs[t - 1]), es[t - 1], keep=range(1, L[t - 1] + 1))
        assert sorted(hs) == list(range(1, L[t - 1] + 1))
        for l, h in hs.items():
            assert out.hidden[(t, l)].shape == (3, cfg.num_tokens, cfg.width)
            torch.testing.assert_close(out.hidden[(t, l)], block.permute(h), atol=0, rtol=0)
    with pytest.raises(ValueError, match=f"block 2 has layers 1..{L[1]}"):
        model(x, y, hidden=[(2, L[1] + 1)])


# --- float32 / bf16 on each device ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_float32_matches_the_float64_model(device):
    """The same weights in float32 (CPU, GPU) give the float64 model's z, logdet, exact reverse (KV cache)
    and guided reverse, up to float32 rounding."""
    cfg = tiny(3, 8, 8, 2, 3, K=5)
    ref = random_flow(cfg, scale=0.1)  # (at 0.3, guidance 2 on this random model overflows exp(alpha))
    model = random_flow(cfg, scale=0.1).float().to(device)
    x, y = images(cfg), labels(cfg)
    out_ref, out = ref(x, y), model(x.float().to(device), y.to(device))
    torch.testing.assert_close(out.z.double().cpu(), out_ref.z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logdet.double().cpu(), out_ref.logdet, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(model.reverse(out.z, y.to(device)).double().cpu(), x, atol=1e-4, rtol=0)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(model.reverse(z.float().to(device), y.to(device), guidance=2.0).double().cpu(),
                               ref.reverse(z, y, guidance=2.0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_keeps_the_affine_transform_in_float32(device):
    """Under bf16 autocast (train.precision=bf16) the transformer runs in bf16, z, logdet and the NLL stay
    float32, and the reverse still inverts the forward up to bf16 rounding."""
    cfg = tiny(3, 8, 8, 2, 2)
    model = random_flow(cfg).float().to(device)
    x, y = images(cfg).float().to(device), labels(cfg).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(x, y)
        nll = model.nll(x, y)
        x_rec = model.reverse(out.z, y)
    assert out.z.dtype == out.logdet.dtype == nll.dtype == x_rec.dtype == torch.float32
    ref = model(x, y)
    torch.testing.assert_close(out.z, ref.z, atol=0.1, rtol=0.05)
    torch.testing.assert_close(nll, model.nll(x, y), atol=0.05, rtol=0.05)
    torch.testing.assert_close(x_rec, x, atol=0.05, rtol=0)


@pytest.mark.parametrize("loss", ["nll", "pseudo", "jacobi"])
def test_activation_checkpointing_gives_the_same_gradients(loss):
    """TARFlow.activation_checkpointing recomputes the layers in the backward: the loss and every gradient are those of
    the plain backward (float64), for the NLL and for R-REPA's reverse paths (whose passes also record autograd);
    without autograd (sampling) it changes nothing."""
    cfg = FlowConfig(in_channels=1, image_height=8, image_width=8, patch_size=2, width=32, head_dim=16,
                     num_blocks=3, layers_per_block=2, num_classes=3)
    model = random_flow(cfg)
    x, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])

    def grads(on: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.activation_checkpointing = on
        model.zero_grad()
        out = model(x, y)
        value = -TARFlow.log_prob_of(out).mean()
        if loss != "nll":
            h = aligned_features(model, x, y, [(3, 1)], "reverse", loss, 2, forward_out=out)[(3, 1)]
            value = value + h.square().mean()
        value.backward()
        return value.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain_value, plain = grads(False)
    value, checked = grads(True)
    assert model.activation_checkpointing and all(b.checkpointing for b in model.blocks)
    assert value == plain_value and len(checked) == len(plain)
    for a, b in zip(checked, plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    with torch.no_grad():
        z = torch.randn(2, 1, 8, 8, dtype=torch.float64)
        on = model.reverse(z, y[:2])
        model.activation_checkpointing = False
        assert torch.equal(on, model.reverse(z, y[:2]))
