"""Alignment features along the forward, detached and reverse paths (docs/DESIGN.md section 2).

float64, a tiny TARFlow (1 x 4 x 4 image, patch 1: N = 16 tokens of dimension 1) whose proj_out is
randomised: at zero-initialised proj_out every block is the identity and the strategies coincide.
"""


import pytest
import torch

from helpers import DEVICES, random_flow
from rrepa.align.reverse import (
    aligned_features,
    detach_features,
    forward_features,
    jacobi_reverse,
    naive_reverse,
    pseudo_reverse,
)
from rrepa.flow.config import FlowConfig, FlowOutput
from rrepa.flow.tarflow import TARFlow

torch.set_num_threads(1)  # tiny ops: a second OpenMP thread only adds contention (100x slower under load)

T, L = 3, 2
RAGGED = (3, 1, 2)  # per-block layer counts (STARFlow's deep-shallow design; here the deep block first)


def tiny(T=T, L=L) -> FlowConfig:
    return FlowConfig(in_channels=1, image_height=4, image_width=4, patch_size=1, width=64, num_blocks=T,
                      layers_per_block=L, head_dim=32, mlp_ratio=2, num_classes=3, sigma=0.05)


def randomised(cfg: FlowConfig | None = None, seed: int = 0, scale: float = 0.5) -> TARFlow:
    return random_flow(cfg or tiny(), seed, scale)


def data(cfg: FlowConfig, B: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.rand((B, 1, cfg.image_height, cfg.image_width), generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.arange(B) % cfg.num_classes


def functional(feats: dict) -> torch.Tensor:
    """A fixed random linear functional of the features (a stand-in for the alignment loss)."""
    total = 0
    for (t, l), h in sorted(feats.items()):
        g = torch.Generator().manual_seed(100 * t + l)
        total = total + (h * torch.randn(h.shape, generator=g, dtype=h.dtype).to(h.device)).sum()
    return total


def grads_of(model: TARFlow, compute) -> dict[str, torch.Tensor]:
    """Parameter gradients of functional(compute()); parameters outside the graph get zeros."""
    model.zero_grad(set_to_none=True)
    functional(compute()).backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def cache_of(model, x, y, positions=(), drop=None) -> FlowOutput:
    return model(x, y, hidden=positions, drop=drop)


METHODS = {
    "naive": lambda m, c, pos: naive_reverse(m, c, pos),
    "pseudo": lambda m, c, pos: pseudo_reverse(m, c, pos),
    "jacobi1": lambda m, c, pos: jacobi_reverse(m, c, pos, 1),
    "jacobi3": lambda m, c, pos: jacobi_reverse(m, c, pos, 3),
    "jacobiN": lambda m, c, pos: jacobi_reverse(m, c, pos),
}


def max_rel_diff(a: dict, b: dict) -> float:
    scale = max(float(v.abs().max()) for v in a.values())
    return max(float((a[n] - b[n]).abs().max()) for n in a) / scale


# --- values --------------------------------------------------------------------------------------


def test_forward_output_carries_block_inputs_and_dropout_mask():
    """FlowOutput.inputs are the blocks' inputs, and (y, drop) reproduce the forward exactly."""
    model = randomised()
    x, y = data(model.cfg)
    pos = [(1, 2), (3, 1)]
    torch.manual_seed(5)
    c = model(x, y, hidden=pos, label_drop=0.5)
    assert len(c.inputs) == T + 1 and c.drop is not None and 0 < int(c.drop.sum()) < len(y)
    tok = model.patchify(x)
    assert torch.equal(c.inputs[0], tok)
    for t, (block, e) in enumerate(zip(model.blocks, model.embeddings(c.y, c.drop)), start=1):
        tok = block(tok, e)[0]
        assert torch.equal(c.inputs[t], tok)
    assert torch.equal(c.inputs[T], model.patchify(c.z))
    again = model(x, c.y, hidden=pos, drop=c.drop)
    assert torch.equal(again.z, c.z) and all(torch.equal(again.hidden[p], c.hidden[p]) for p in pos)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("layers", [L, RAGGED], ids=["uniform", "ragged"])
def test_reverse_paths_reproduce_forward_values_and_features(method, layers):
    model = randomised(tiny(L=layers))
    x, y = data(model.cfg)
    pos = [(1, 1), (2, 2), (3, 1), (3, 2)] if layers == L else [(1, 3), (2, 1), (1, 1), (3, 2)]
    drop = torch.tensor([True, False, False])  # the reverse reuses the forward's (dropped) embeddings
    c = cache_of(model, x, y, pos, drop=drop)
    r = METHODS[method](model, c, pos)
    assert list(r.features) == pos and sorted(r.recon) == list(range(T + 1))
    for s in range(T + 1):
        torch.testing.assert_close(r.recon[s], c.inputs[s], atol=1e-10, rtol=0)
    assert float((c.inputs[0] - c.inputs[T]).detach().abs().max()) > 0.1  # the model is far from the identity
    for p in pos:
        assert r.features[p].shape == (3, 16, 64)
        torch.testing.assert_close(r.features[p], c.hidden[p], atol=1e-10, rtol=0)


def test_reverse_stops_at_the_lowest_aligned_block():
    model = randomised()
    x, y = data(model.cfg)
    r = pseudo_reverse(model, cache_of(model, x, y), [(3, 1), (2, 1)])
    assert sorted(r.recon) == [1, 2, 3] and list(r.features) == [(3, 1), (2, 1)]


def test_all_strategies_give_the_same_values():
    model = randomised()
    x, y = data(model.cfg)
    pos = [(2, 1), (3, 2)]
    ref = model(x, y, hidden=pos).hidden
    for strategy, rev in [("forward", "pseudo"), ("detach", "pseudo"), ("reverse", "pseudo"),
                          ("reverse", "naive"), ("reverse", "jacobi")]:
        feats = aligned_features(model, x, y, pos, strategy, rev)
        for p in pos:
            torch.testing.assert_close(feats[p], ref[p], atol=1e-10, rtol=0)


# --- gradients: jacobi, pseudo and naive ---------------------------------------------------------


@pytest.mark.parametrize("layers,pos", [(L, [(1, 1)]), (L, [(2, 2), (3, 1)]), (L, [(1, 2), (3, 2)]),
                                        (RAGGED, [(1, 3), (2, 1)]), (RAGGED, [(3, 2)])])
def test_jacobi_N_gradients_equal_naive_gradients(layers, pos):
    model = randomised(tiny(L=layers))
    x, y = data(model.cfg)
    c = cache_of(model, x, y)
    g_naive = grads_of(model, lambda: naive_reverse(model, c, pos).features)
    g_jac = grads_of(model, lambda: jacobi_reverse(model, c, pos, steps=16).features)
    scale = max(float(g.abs().max()) for g in g_naive.values())
    for n in g_naive:
        torch.testing.assert_close(g_jac[n], g_naive[n], atol=1e-10 * scale, rtol=1e-8, msg=n)


def test_truncated_jacobi_gradients_are_approximate_and_one_step_is_pseudo():
    model = randomised()
    x, y = data(model.cfg)
    pos = [(1, 1)]
    c = cache_of(model, x, y)
    g_naive = grads_of(model, lambda: naive_reverse(model, c, pos).features)
    err = {k: max_rel_diff(g_naive, grads_of(model, lambda k=k: jacobi_reverse(model, c, pos, k).features))
           for k in (1, 2, 4, 16)}
    # The truncated Neumann series is not monotone in K (||J|| is not small here): only K = N is exact.
    assert min(err[1], err[2], err[4]) > 1e-2 and err[16] < 1e-10, err
    g_pseudo = grads_of(model, lambda: pseudo_reverse(model, c, pos).features)
    g_one = grads_of(model, lambda: jacobi_reverse(model, c, pos, 1).features)
    assert all(torch.equal(g_pseudo[n], g_one[n]) for n in g_pseudo)


@pytest.mark.parametrize("t", [1, 2, 3])
def test_pseudo_equals_naive_iff_involved_proj_out_weights_are_zero(t):
    model = randomised()
    x, y = data(model.cfg)
    pos = [(t, 1)]
    c = cache_of(model, x, y)
    g_naive = grads_of(model, lambda: naive_reverse(model, c, pos).features)
    g_pseudo = grads_of(model, lambda: pseudo_reverse(model, c, pos).features)
    assert max_rel_diff(g_naive, g_pseudo) > 1e-3  # random proj_out: the one-step gradient is approximate
    with torch.no_grad():
        for block in model.blocks[t - 1:]:  # blocks t..T; the blocks below stay random
            block.proj_out.weight.zero_()
            assert float(block.proj_out.bias.abs().min()) > 0
    c = cache_of(model, x, y)
    g_naive = grads_of(model, lambda: naive_reverse(model, c, pos).features)
    g_pseudo = grads_of(model, lambda: pseudo_reverse(model, c, pos).features)
    scale = max(float(g.abs().max()) for g in g_naive.values())
    for n in g_naive:
        torch.testing.assert_close(g_pseudo[n], g_naive[n], atol=1e-12 * scale, rtol=1e-10, msg=n)
    assert float(g_naive[f"blocks.{t - 1}.proj_out.weight"].abs().max()) > 0


# --- gradients: parameter scope of each strategy (docs/DESIGN.md section 2 table) ---------------------


def expected_nonzero(name: str, strategy: str, t: int, l: int) -> bool:
    _, b, part, *rest = name.split(".")
    b = int(b) + 1  # 1-indexed block
    if strategy == "reverse":
        return b >= t  # every parameter of blocks t..T, block t's proj_out and layers > l included
    if b != t:
        return strategy == "forward" and b < t  # forward: blocks 1..t-1 through the input
    if part == "layers":
        return int(rest[0]) + 1 <= l
    return part != "proj_out"  # proj_in, pos_embed, class_embed: yes; proj_out: no


SCOPE = [("forward", None), ("detach", None), ("reverse", "naive"), ("reverse", "pseudo"), ("reverse", "jacobi")]


@pytest.mark.parametrize("t", [1, 2, 3])
@pytest.mark.parametrize("strategy,rev", SCOPE)
@pytest.mark.parametrize("layers,deepest", [(L, False), (RAGGED, False), (RAGGED, True)],
                         ids=["uniform", "ragged-layer1", "ragged-deepest"])
def test_parameter_scope(strategy, rev, t, layers, deepest):
    model = randomised(tiny(L=layers))
    x, y = data(model.cfg)
    l = model.cfg.layers(t) if deepest else 1
    pos = [(t, l)]
    c = cache_of(model, x, y, pos)
    g = grads_of(model, lambda: aligned_features(model, x, y, pos, strategy, rev or "pseudo", 4, forward_out=c))
    for n, v in g.items():
        if expected_nonzero(n, strategy, t, l):
            assert float(v.abs().max()) > 1e-8, f"{strategy}/{rev}: {n} should receive a gradient"
        else:
            assert not v.any(), f"{strategy}/{rev}: {n} should receive no gradient"


@pytest.mark.parametrize("l", [1, 2])
@pytest.mark.parametrize("rev", ["naive", "pseudo", "jacobi"])
def test_reverse_gradients_differ_from_detach_at_the_last_block(rev, l):
    model = randomised()
    x, y = data(model.cfg)
    pos = [(T, l)]
    c = cache_of(model, x, y)
    g_det = grads_of(model, lambda: aligned_features(model, x, y, pos, "detach", forward_out=c))
    g_rev = grads_of(model, lambda: aligned_features(model, x, y, pos, "reverse", rev, forward_out=c))
    prefix = f"blocks.{T - 1}."
    shared = [n for n in g_det if n.startswith(prefix) and g_det[n].any()]
    assert f"{prefix}proj_in.weight" in shared and f"{prefix}layers.{l - 1}.fc2.weight" in shared
    for n in shared:  # the same parameters get a different gradient
        assert float((g_rev[n] - g_det[n]).abs().max()) > 1e-6 * float(g_det[n].abs().max()), n
    assert not g_det[f"{prefix}proj_out.weight"].any() and g_rev[f"{prefix}proj_out.weight"].abs().max() > 1e-8


def test_pseudo_differs_from_a_single_pass_on_the_detached_cache():
    """The pitfall of docs/DESIGN.md section 2: features read from the pass on the detached cache give D-REPA."""
    model = randomised()
    x, y = data(model.cfg)
    pos = [(2, 1)]
    c = cache_of(model, x, y)
    block, e = model.blocks[1], model.embeddings(c.y, c.drop)[1]

    def single_pass():
        _, hs = block.transformer(block.permute(c.inputs[1].detach()), e, keep=[1], upto=1)
        return {(2, 1): block.permute(hs[1])}

    g_single = grads_of(model, single_pass)
    g_det = grads_of(model, lambda: detach_features(model, c, pos))
    g_pseudo = grads_of(model, lambda: pseudo_reverse(model, c, pos).features)
    assert all(torch.equal(g_single[n], g_det[n]) for n in g_det)
    assert max_rel_diff(g_pseudo, g_det) > 1e-3


# --- the entry point ------------------------------------------------------------------------------


def test_aligned_features_reuses_or_recomputes_the_forward():
    model = randomised()
    x, y = data(model.cfg)
    pos = [(2, 1), (3, 2)]
    c = cache_of(model, x, y, pos)
    # forward strategy: the training forward's hidden states themselves
    feats = aligned_features(model, x, y, pos, "forward", forward_out=c)
    assert all(feats[p] is c.hidden[p] for p in pos)
    g_cached = grads_of(model, lambda: aligned_features(model, x, y, pos, "forward", forward_out=c))
    g_rerun = grads_of(model, lambda: forward_features(model, x, y, pos))
    assert max_rel_diff(g_cached, g_rerun) < 1e-12
    # detach / reverse: the same gradients from the cache, from a plain FlowOutput and from nothing
    plain = model(x, y)
    for strategy, rev in [("detach", "pseudo"), ("reverse", "pseudo"), ("reverse", "jacobi")]:
        g = [grads_of(model, lambda fo=fo, s=strategy, r=rev: aligned_features(model, x, y, pos, s, r, 2,
                                                                               forward_out=fo))
             for fo in (c, plain, None)]
        assert max_rel_diff(g[0], g[1]) < 1e-12 and max_rel_diff(g[0], g[2]) < 1e-12


def test_bad_arguments_raise():
    model = randomised()
    x, y = data(model.cfg)
    c = cache_of(model, x, y)
    with pytest.raises(ValueError, match="strategy"):
        aligned_features(model, x, y, [(1, 1)], "sideways")
    with pytest.raises(ValueError, match="reverse method"):
        aligned_features(model, x, y, [(1, 1)], "reverse", "magic")
    with pytest.raises(ValueError, match="outside"):
        aligned_features(model, x, y, [(4, 1)], "reverse", forward_out=c)
    with pytest.raises(ValueError, match="outside"):
        aligned_features(model, x, y, [(1, 0)], "detach", forward_out=c)
    with pytest.raises(ValueError, match="no aligned positions"):
        pseudo_reverse(model, c, [])
    with pytest.raises(ValueError, match=">= 1"):
        jacobi_reverse(model, c, [(1, 1)], 0)
    # A ragged model: a layer its block lacks is refused, though other blocks have it.
    ragged = randomised(tiny(L=RAGGED))
    rc = cache_of(ragged, x, y)
    for strategy in ("forward", "detach", "reverse"):
        with pytest.raises(ValueError, match=r"\(block 2, layer 2\) is outside.*block 2 has layers 1..1"):
            aligned_features(ragged, x, y, [(1, 3), (2, 2)], strategy, forward_out=rc)


# --- float32 / bf16 on each device ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_float32_reverse_paths_reproduce_the_cache_and_jacobi_n_matches_naive(device):
    """float32 on the CPU and the GPU: every reverse path reconstructs the forward's cached block inputs and
    features, and jacobi-N's gradients are naive's up to rounding (both are exact)."""
    model = randomised().float().to(device)
    x, y = data(model.cfg)
    x, y = x.float().to(device), y.to(device)
    pos = [(1, 2), (3, 1)]
    c = cache_of(model, x, y, pos)
    for method in ("naive", "pseudo", "jacobi3"):
        r = METHODS[method](model, c, pos)
        for s in range(T + 1):
            torch.testing.assert_close(r.recon[s], c.inputs[s], atol=1e-4, rtol=1e-4)
        for p in pos:
            torch.testing.assert_close(r.features[p], c.hidden[p], atol=1e-3, rtol=1e-3)
    g_naive = grads_of(model, lambda: naive_reverse(model, c, pos).features)
    g_exact = grads_of(model, lambda: jacobi_reverse(model, c, pos).features)
    assert max_rel_diff(g_naive, g_exact) < 5e-4  # measured 5e-5 on the CPU
    assert model.blocks[2].proj_out.weight.grad.abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_under_bf16_autocast_pseudo_reproduces_the_cache_and_naive_drifts(device):
    """Under bf16 autocast (train.precision=bf16) pseudo and jacobi-K rerun the forward's own bf16 passes, so they
    reconstruct the cache and its features to float32 rounding; naive's one-token products round differently
    and its sequential inverse drifts (measured up to 0.04 on the CPU). The exact (jacobi-N) bf16 gradient stays
    within bf16 rounding of the float32 one (measured 0.02-0.08 max relative difference on the CPU, where the
    approximate pseudo gradient's is ~0.7)."""
    model = randomised().float().to(device)
    x, y = data(model.cfg)
    x, y = x.float().to(device), y.to(device)
    pos = [(1, 2), (3, 1)]
    g_f32 = grads_of(model, lambda: naive_reverse(model, cache_of(model, x, y, pos), pos).features)
    with torch.autocast(device, dtype=torch.bfloat16):
        c = cache_of(model, x, y, pos)
        for method in ("pseudo", "jacobi3"):
            r = METHODS[method](model, c, pos)
            assert r.recon[0].dtype == torch.float32
            for s in range(T + 1):
                torch.testing.assert_close(r.recon[s], c.inputs[s], atol=1e-5, rtol=1e-5)
            assert all(torch.equal(r.features[p], c.hidden[p]) for p in pos)
        r = naive_reverse(model, c, pos)
        assert max(float((r.recon[s] - c.inputs[s]).detach().abs().max()) for s in range(T + 1)) < 0.1
        g_bf16 = grads_of(model, lambda: jacobi_reverse(model, c, pos).features)
    assert max_rel_diff(g_f32, g_bf16) < 0.15
