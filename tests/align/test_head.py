"""Alignment head: config, projectors, the cosine loss, grid matching, and the loss on a tiny flow."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rrepa.align.head import (
    AlignConfig,
    AlignHead,
    ConvProjector,
    build_projector,
    cosine_alignment_loss,
    match_grid,
    position_key,
    spatial_norm,
)
from rrepa.align.reverse import aligned_features
from rrepa.flow.config import FlowConfig
from rrepa.flow.tarflow import TARFlow

torch.set_num_threads(1)  # tiny ops: a second OpenMP thread only adds contention


def grid_tokens(fn, h, w, d=1, B=1, dtype=torch.float64):
    """Tokens (B, h*w, d) in raster order with value fn(i, j) (same in every channel)."""
    v = torch.tensor([[fn(i, j) for j in range(w)] for i in range(h)], dtype=dtype)
    return v.reshape(1, h * w, 1).expand(B, h * w, d).clone()


# --- config and projectors ------------------------------------------------------------------------


def test_config_defaults_and_validation():
    cfg = AlignConfig()
    assert cfg.positions == [(7, 6), (8, 6)] and cfg.strategy == "reverse" and cfg.reverse == "pseudo"
    assert cfg.weight == 0.5 and cfg.projector_hidden == 2048 and cfg.grid_mode == "pool"
    assert cfg.jacobi_steps is None and cfg.encoder == "dinov2_vitb14"
    assert AlignConfig(positions=[[2, 1]]).positions == [(2, 1)]
    for kwargs, match in [({"positions": []}, "empty"), ({"positions": [(0, 1)]}, "1-indexed"),
                          ({"positions": [(1, 1), (1, 1)]}, "repeat"), ({"strategy": "sideways"}, "strategy"),
                          ({"reverse": "magic"}, "reverse"), ({"jacobi_steps": 0}, "jacobi"),
                          ({"weight": -1.0}, "weight"), ({"projector_hidden": 0}, "projector_hidden"),
                          ({"grid_mode": "nearest"}, "grid_mode"), ({"projector": "attention"}, "projector"),
                          ({"target_norm": "layer"}, "target_norm")]:
        with pytest.raises(ValueError, match=match):
            AlignConfig(**kwargs)


def test_projector_layout():
    proj = build_projector(64, 768, hidden=32)
    assert [type(m) for m in proj] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    dims = [(m.in_features, m.out_features) for m in proj if isinstance(m, nn.Linear)]
    assert dims == [(64, 32), (32, 32), (32, 768)]
    assert proj(torch.randn(2, 5, 64)).shape == (2, 5, 768)  # per token


def test_one_projector_per_position():
    head = AlignHead(AlignConfig(positions=[(7, 6), (8, 6), (2, 1)], projector_hidden=16), flow_width=24,
                     encoder_dim=10)
    assert position_key((7, 6)) == "t7_l6"
    assert sorted(head.projectors.keys()) == ["t2_l1", "t7_l6", "t8_l6"]
    assert all(p[0].in_features == 24 and p[-1].out_features == 10 for p in head.projectors.values())
    default = AlignHead(AlignConfig(), flow_width=8, encoder_dim=4)
    assert len(default.projectors) == 2 and default.projectors["t8_l6"][0].out_features == 2048


# --- the loss --------------------------------------------------------------------------------------


def test_cosine_loss_equals_explicit_computation():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 7, generator=g, dtype=torch.float64), torch.randn(3, 5, 7, generator=g,
                                                                                      dtype=torch.float64)
    explicit = 0.0
    for b in range(3):
        for i in range(5):
            p, q = pred[b, i], target[b, i]
            explicit -= float(p @ q) / (float(p.norm()) * float(q.norm()))
    explicit /= 15
    assert math.isclose(float(cosine_alignment_loss(pred, target)), explicit, rel_tol=1e-12)
    assert math.isclose(float(cosine_alignment_loss(pred, 3 * pred)), -1.0, rel_tol=1e-12)
    assert math.isclose(float(cosine_alignment_loss(pred, -pred)), 1.0, rel_tol=1e-12)


def test_cosine_loss_is_float32_for_low_precision_inputs():
    pred, target = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    ref = cosine_alignment_loss(pred, target)
    assert ref.dtype == torch.float32
    low = cosine_alignment_loss(pred.bfloat16(), target.bfloat16())
    assert low.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cosine_alignment_loss(pred, target).dtype == torch.float32
    assert abs(float(low) - float(ref)) < 0.02
    with pytest.raises(ValueError, match="differ in shape"):
        cosine_alignment_loss(pred, target[:, :3])


# --- grid matching ---------------------------------------------------------------------------------


def test_pool_shrinks_by_averaging_groups():
    x = torch.randn(2, 16, 3, dtype=torch.float64)  # 4 x 4 grid
    out = match_grid(x, (4, 4), (2, 2), "pool")
    grid = x.reshape(2, 4, 4, 3)
    explicit = torch.stack([grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((1, 2)) for i in range(2) for j in range(2)],
                           dim=1)
    torch.testing.assert_close(out, explicit)


def test_pool_grows_by_repeating_tokens():
    x = torch.randn(2, 4, 3, dtype=torch.float64)  # 2 x 2 grid
    out = match_grid(x, (2, 2), (4, 6), "pool")  # 2x rows, 3x columns
    explicit = x.reshape(2, 2, 2, 3).repeat_interleave(2, dim=1).repeat_interleave(3, dim=2).reshape(2, 24, 3)
    torch.testing.assert_close(out, explicit)


def test_interpolate_grows_bilinearly():
    a, b = 0.3, -0.7
    x = grid_tokens(lambda i, j: a * i + b * j, 4, 4, d=2)
    out = match_grid(x, (4, 4), (8, 8), "interpolate").reshape(8, 8, 2)
    for i in range(1, 7):  # away from the clamped border, a linear field is reproduced at the sample points
        for j in range(1, 7):
            si, sj = (i + 0.5) / 2 - 0.5, (j + 0.5) / 2 - 0.5
            assert torch.allclose(out[i, j], torch.tensor(a * si + b * sj, dtype=torch.float64))


def test_interpolate_shrinks_with_antialiasing():
    a, b = 0.3, -0.7
    x = grid_tokens(lambda i, j: a * i + b * j + ((i + j) % 2), 8, 8)  # a linear field plus a checkerboard
    out = match_grid(x, (8, 8), (4, 4), "interpolate").reshape(4, 4)
    for i in (1, 2):  # interior: the symmetric (1, 3, 3, 1) / 8 filter keeps the linear part, damps the checkerboard
        for j in (1, 2):
            ci, cj = 2 * i + 0.5, 2 * j + 0.5
            assert math.isclose(float(out[i, j]), a * ci + b * cj + 0.5, abs_tol=1e-12)
    plain = F.interpolate(x.reshape(1, 8, 8, 1).permute(0, 3, 1, 2), size=(4, 4), mode="bilinear")
    assert not torch.allclose(plain.flatten(), out.flatten())  # plain bilinear aliases the checkerboard


@pytest.mark.parametrize("mode", ["pool", "interpolate"])
@pytest.mark.parametrize("src,dst", [((4, 4), (2, 2)), ((2, 2), (4, 4)), ((16, 16), (32, 32)), ((32, 32), (16, 16)),
                                     ((3, 5), (6, 2)), ((4, 4), (4, 4))])
def test_match_grid_shapes_and_constants(mode, src, dst):
    c = torch.randn(2, 1, 5, dtype=torch.float64)
    x = c.expand(2, src[0] * src[1], 5)
    out = match_grid(x, src, dst, mode)
    assert out.shape == (2, dst[0] * dst[1], 5)
    torch.testing.assert_close(out, c.expand_as(out))  # a constant field stays constant, both ways
    if src == dst:
        assert out is x


def test_match_grid_errors():
    x = torch.randn(1, 16, 2)
    with pytest.raises(ValueError, match="do not fill"):
        match_grid(x, (3, 5), (2, 2))
    with pytest.raises(ValueError, match="grid mode"):
        match_grid(x, (4, 4), (2, 2), "nearest")
    with pytest.raises(ValueError, match=r"\(B, n, d\)"):
        match_grid(x[0], (4, 4), (2, 2))


# --- the loss on a tiny flow -------------------------------------------------------------------------


def tiny_flow() -> TARFlow:
    cfg = FlowConfig(in_channels=1, image_height=4, image_width=4, patch_size=1, width=64, num_blocks=3,
                     layers_per_block=2, head_dim=32, mlp_ratio=2, num_classes=3)
    torch.manual_seed(0)
    model = TARFlow(cfg).double()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.5 / 8)
            block.proj_out.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("enc_hw", [(2, 2), (8, 8), (4, 4)])  # flow grid 4 x 4: larger, smaller, equal
@pytest.mark.parametrize("mode", ["pool", "interpolate"])
def test_head_loss_matches_explicit_and_trains_the_right_parameters(enc_hw, mode):
    model = tiny_flow()
    pos = [(2, 1), (3, 2)]
    cfg = AlignConfig(positions=pos, strategy="reverse", reverse="pseudo", weight=0.5, projector_hidden=16,
                      grid_mode=mode)
    head = AlignHead(cfg, flow_width=64, encoder_dim=6).double()
    g = torch.Generator().manual_seed(3)
    x = torch.rand((2, 1, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 2])
    enc = torch.randn(2, enc_hw[0] * enc_hw[1], 6, generator=g, dtype=torch.float64)
    out = head(model, x, y, enc, enc_hw)

    feats = aligned_features(model, x, y, pos, "reverse", "pseudo")
    target = match_grid(enc, enc_hw, (4, 4), mode)
    losses = [-F.cosine_similarity(head.projectors[position_key(p)](feats[p]), target, dim=-1).mean() for p in pos]
    assert math.isclose(out.loss.item(), 0.5 * (losses[0].item() + losses[1].item()) / 2, rel_tol=1e-10)
    assert all(math.isclose(out.per_position[p].item(), v.item(), rel_tol=1e-10) for p, v in zip(pos, losses))

    out.loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in head.parameters())
    assert all(p.grad is None or not p.grad.any() for p in model.blocks[0].parameters())  # R-REPA: never t < 2
    assert model.blocks[1].proj_out.weight.grad.any() and model.blocks[2].layers[1].fc2.weight.grad.any()


def test_head_reuses_the_training_forward():
    model = tiny_flow()
    x = torch.rand((2, 1, 4, 4), dtype=torch.float64) * 2 - 1
    y = torch.tensor([1, 2])
    enc = torch.randn(2, 4, 6, dtype=torch.float64)
    for strategy in ("forward", "detach", "reverse"):
        cfg = AlignConfig(positions=[(3, 1)], strategy=strategy, projector_hidden=16)
        head = AlignHead(cfg, 64, 6).double()
        fwd = model(x, y, hidden=cfg.positions)
        nll = -(fwd.logdet - 0.5 * fwd.z.pow(2).flatten(1).sum(1)).mean()
        total = nll + head(model, x, y, enc, forward_out=fwd).loss  # one backward for both terms
        total.backward()
        plain = head(model, x, y, enc).loss
        assert math.isclose((total - nll).item(), plain.item(), rel_tol=1e-10)


# --- iREPA: the convolutional projector and the spatial normalisation of the targets -------------------


def test_conv_projector_is_a_3x3_convolution_on_the_token_grid():
    torch.manual_seed(0)
    proj = ConvProjector(5, 3).double()
    h = torch.randn(2, 4 * 6, 5, dtype=torch.float64)
    out = proj(h, (4, 6))
    assert out.shape == (2, 24, 3)
    # explicit: token (i, j) is bias + sum over the 3 x 3 neighbourhood (zero outside the grid)
    grid = h.reshape(2, 4, 6, 5)
    w, b = proj.conv.weight, proj.conv.bias  # (3, 5, 3, 3), (3,)
    for i, j in [(0, 0), (1, 2), (3, 5)]:
        ref = b.clone().expand(2, 3).clone()
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if 0 <= i + di < 4 and 0 <= j + dj < 6:
                    ref = ref + grid[:, i + di, j + dj] @ w[:, :, di + 1, dj + 1].T
        assert torch.allclose(out[:, i * 6 + j], ref, atol=1e-12)
    # tokens two rows or columns away have no influence
    h = h.requires_grad_(True)
    (g,) = torch.autograd.grad(proj(h, (4, 6))[0, 0].sum(), h)
    reach = g[0].abs().sum(-1).reshape(4, 6) > 0
    assert reach[:2, :2].all() and not reach[2:].any() and not reach[:, 2:].any()


def test_spatial_norm_standardises_over_positions_and_removes_the_shared_component():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(3, 16, 4, generator=g, dtype=torch.float64) * 2 + 5
    n = spatial_norm(t, eps=0)
    assert torch.allclose(n.mean(1), torch.zeros(3, 4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(n.std(1, unbiased=False), torch.ones(3, 4, dtype=torch.float64), atol=1e-12)
    shared = torch.randn(3, 1, 4, generator=g, dtype=torch.float64)  # the same vector added to every token
    assert torch.allclose(spatial_norm(t + shared, eps=0), n, atol=1e-12)


@pytest.mark.parametrize("projector, target_norm", [("conv", "none"), ("mlp", "spatial"), ("conv", "spatial")])
def test_head_with_irepa_options_matches_explicit(projector, target_norm):
    model = tiny_flow()
    pos = [(3, 2)]
    cfg = AlignConfig(positions=pos, strategy="reverse", projector_hidden=16, projector=projector,
                      target_norm=target_norm)
    head = AlignHead(cfg, flow_width=64, encoder_dim=6).double()
    g = torch.Generator().manual_seed(3)
    x = torch.rand((2, 1, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    enc = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    out = head(model, x, torch.tensor([0, 2]), enc, (2, 2))
    feats = aligned_features(model, x, torch.tensor([0, 2]), pos, "reverse", "pseudo")
    target = match_grid(enc, (2, 2), (4, 4))
    if target_norm == "spatial":
        target = (target - target.mean(1, keepdim=True)) / (target.std(1, keepdim=True, unbiased=False) + 1e-6)
    proj = head.projectors["t3_l2"]
    pred = proj(feats[(3, 2)], (4, 4)) if projector == "conv" else proj(feats[(3, 2)])
    ref = -F.cosine_similarity(pred, target, dim=-1).mean()
    assert math.isclose(out.per_position[(3, 2)].item(), ref.item(), rel_tol=1e-9)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in head.parameters())
