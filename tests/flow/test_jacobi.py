"""The Jacobi (parallel) sampler against the sequential KV-cache sampler, in float64.

The sequential sampler is the independent reference: inside a block x_i = z_i exp(alpha_i(x_<i)) + mu_i(x_<i)
is strictly triangular, so Jacobi iterations over a chunk of c tokens reach its solution after exactly c
iterations (with tol 0 the sampler runs that many), and with tol > 0 they stop early within a stated bound.
"""

import numpy as np
import pytest
import torch

from helpers import DEVICES, random_flow
from rrepa import cli
from rrepa.distributed import Dist
from rrepa.flow.blocks import KVCache, Layer
from rrepa.flow.checkpoint import save_weights
from rrepa.flow.config import FlowConfig
from rrepa.flow.jacobi import Jacobi, SampleStats, as_sampler
from rrepa.flow.sample import draw, generate
from rrepa.flow.tarflow import TARFlow


def tiny(C=1, H=4, W=4, p=2, T=3, L=2, K=5, width=64, head_dim=32, sigma=0.05) -> FlowConfig:
    return FlowConfig(in_channels=C, image_height=H, image_width=W, patch_size=p, width=width, num_blocks=T,
                      layers_per_block=L, head_dim=head_dim, mlp_ratio=2, num_classes=K, sigma=sigma)


def noise(cfg: FlowConfig, B: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((B, cfg.in_channels, cfg.image_height, cfg.image_width), generator=g, dtype=torch.float64)


def labels(cfg: FlowConfig, B: int = 3):
    return torch.arange(B) % cfg.num_classes if cfg.num_classes else None


def chunk_lengths(N: int, chunk: int | None) -> list[int]:
    """Lengths of the chunks the N - 1 input positions of a block are cut into."""
    size = N - 1 if chunk is None else chunk
    return [min(size, N - 1 - s) for s in range(0, N - 1, size)]


GUIDANCE = [(0.0, False, 1.0), (0.5, False, 1.0), (1.0, True, 0.7), (0.5, False, 0.6)]  # (w, anneal, attn_temp)
SHAPES = [(1, 4, 4, 1, 3), (3, 4, 6, 2, 3), (4, 8, 8, 4, 2), (3, 8, 4, 2, 1)]  # (C, H, W, p, T): N = 16, 6, 4, 8


# --- the cached multi-token attention ----------------------------------------------------------


@pytest.mark.parametrize("splits", [[7], [3, 1, 3], [1] * 7, [2, 5]])
def test_layer_chunks_with_cache_equal_the_causal_pass(splits):
    """Chunks of queries attending to the cache and causally among themselves give the causal pass over the
    whole sequence (the attention Jacobi iterations run)."""
    torch.manual_seed(0)
    layer = Layer(32, 8, 2).double()
    h = torch.randn(2, 7, 32, dtype=torch.float64)
    q_scale = torch.tensor([1.0, 0.6], dtype=torch.float64).view(2, 1, 1, 1)
    ref = layer(h, q_scale)
    cache, outs, s = KVCache(7), [], 0
    with torch.no_grad():
        for n in splits:
            outs.append(layer(h[:, s:s + n], q_scale, cache))
            s += n
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=1e-12, rtol=0)


def test_kv_cache_rewind():
    cache = KVCache(length=4)
    with torch.no_grad():
        cache.append(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
        cache.rewind(1)
        k, v = cache.append(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert k.shape == (1, 1, 3, 2) and torch.equal(k[0, 0, :, 0], torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"rewind the cache to 0..3 positions, got 4"):
        cache.rewind(4)


# --- exactness at tol 0 ------------------------------------------------------------------------


@pytest.mark.parametrize("C,H,W,p,T", SHAPES)
@pytest.mark.parametrize("K", [0, 5])
@pytest.mark.parametrize("chunk", [None, 1, 3, 4])
@pytest.mark.parametrize("w,anneal,attn_temp", GUIDANCE)
def test_jacobi_at_tol_zero_equals_the_sequential_sampler(C, H, W, p, T, K, chunk, w, anneal, attn_temp):
    cfg = tiny(C, H, W, p, T, K=K)
    model = random_flow(cfg)
    z, y = noise(cfg), labels(cfg)
    ref = model.reverse(z, y, w, anneal, attn_temp)
    assert ref.abs().max() < 100 and not torch.allclose(ref, z, atol=1e-2)  # well-conditioned, not the identity
    x, stats = model.reverse(z, y, w, anneal, attn_temp, sampler=Jacobi(tol=0, chunk=chunk), return_stats=True)
    torch.testing.assert_close(x, ref, atol=1e-10, rtol=0)
    # Exactly the chunk's length in iterations: c passes make c tokens exact, and no more are run.
    N = cfg.num_tokens
    assert stats.blocks == list(range(T, 0, -1)) and stats.sequential == [False] * T
    assert stats.iters == [chunk_lengths(N, chunk)] * T
    assert stats.passes() == [N - 1] * T


@pytest.mark.parametrize("L", [(1, 1, 3), (3, 1, 2)])  # STARFlow's deep-shallow layout, and a deep block first
@pytest.mark.parametrize("chunk", [None, 1, 4])
@pytest.mark.parametrize("w,anneal,attn_temp", [(0.0, False, 1.0), (1.0, True, 0.7)])
@pytest.mark.parametrize("sequential_blocks", [0, 1])
def test_jacobi_at_tol_zero_equals_the_sequential_sampler_with_per_block_layers(L, chunk, w, anneal, attn_temp,
                                                                                 sequential_blocks):
    cfg = tiny(1, 4, 4, 1, T=3, L=L)  # N = 16
    model = random_flow(cfg, scale=0.2)  # (at 0.3 the 3-layer last block's sequential inverse overflows exp(alpha))
    assert [len(b.layers) for b in model.blocks] == list(L)
    z, y = noise(cfg), labels(cfg)
    ref = model.reverse(z, y, w, anneal, attn_temp)
    assert ref.abs().max() < 100 and not torch.allclose(ref, z, atol=1e-2)  # well-conditioned, not the identity
    x, stats = model.reverse(z, y, w, anneal, attn_temp, return_stats=True,
                             sampler=Jacobi(tol=0, chunk=chunk, sequential_blocks=sequential_blocks))
    torch.testing.assert_close(x, ref, atol=1e-10, rtol=0)
    assert stats.sequential == [g < sequential_blocks for g in range(3)]
    assert stats.iters[-1] == chunk_lengths(cfg.num_tokens, chunk)  # block 1, generated last, by Jacobi


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("w,anneal,attn_temp", [(0.0, False, 1.0), (1.0, True, 0.7)])
def test_one_iteration_short_of_the_chunk_length_is_not_exact(chunk, w, anneal, attn_temp):
    """The exactness above needs every iteration: stopping one short leaves each chunk's last token wrong
    (this is what the test above catches when the cap is off by one)."""
    cfg = tiny(3, 4, 6, 2, 3)
    model = random_flow(cfg)
    z, y = noise(cfg), labels(cfg)
    ref = model.reverse(z, y, w, anneal, attn_temp)
    short = max(chunk_lengths(cfg.num_tokens, chunk)) - 1
    x = model.reverse(z, y, w, anneal, attn_temp, sampler=Jacobi(tol=0, chunk=chunk, max_iters=short))
    assert (x - ref).abs().max() > 1e-4


@pytest.mark.parametrize("sequential_blocks", [1, 2, 3])
def test_sequential_blocks_run_the_sequential_sampler(sequential_blocks):
    cfg = tiny(3, 4, 6, 2, 3)
    model = random_flow(cfg)
    z, y = noise(cfg), labels(cfg)
    ref = model.reverse(z, y, 1.0, True, 0.7)
    x, stats = model.reverse(z, y, 1.0, True, 0.7, sampler=Jacobi(tol=0, chunk=2, sequential_blocks=sequential_blocks),
                             return_stats=True)
    torch.testing.assert_close(x, ref, atol=1e-10, rtol=0)
    assert stats.sequential == [g < sequential_blocks for g in range(3)]
    assert stats.iters[0] == [1] * (cfg.num_tokens - 1)  # block T, generated first, is sequential
    if sequential_blocks == 3:
        assert torch.equal(x, ref)  # the very same computation


def test_a_fresh_model_converges_in_one_iteration_per_chunk():
    """A fresh model is the identity: x = z after the first iteration, which the second would confirm; with
    tol > 0 the increment 0 stops each chunk at once."""
    cfg = tiny(1, 4, 4, 1, 2)
    model = TARFlow(cfg).double()
    z, y = noise(cfg), labels(cfg)
    x, stats = model.reverse(z, y, sampler=Jacobi(tol=1e-6, chunk=4), return_stats=True)
    assert torch.equal(x, z)
    assert stats.iters == [[1] * 4] * 2 and stats.max() == [1, 1] and stats.mean() == [1.0, 1.0]


# --- tol > 0: the bound ------------------------------------------------------------------------

# Stated bound: max |x_jacobi - x_sequential| <= BOUND * tol. A chunk stops once its last increment is below tol;
# the error left in a token is of that order, propagated through the later tokens and blocks (their Lipschitz
# constants). On these models the ratio stays under 2; the bound leaves room for other seeds.
BOUND = 10.0


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("w,anneal,attn_temp", [(0.0, False, 1.0), (1.0, True, 0.7)])
@pytest.mark.parametrize("seed", [0, 1])
def test_jacobi_with_a_tolerance_stays_within_the_stated_bound(chunk, w, anneal, attn_temp, seed):
    cfg = tiny(1, 8, 8, 1, 3)  # N = 64 tokens
    model = random_flow(cfg, seed=seed, scale=0.1)
    z, y = noise(cfg), labels(cfg)
    ref = model.reverse(z, y, w, anneal, attn_temp)
    errors, early = [], False
    for tol in (1e-2, 1e-4, 1e-6):
        x, stats = model.reverse(z, y, w, anneal, attn_temp, sampler=Jacobi(tol=tol, chunk=chunk), return_stats=True)
        err = float((x - ref).abs().max())
        assert err <= BOUND * tol, f"tol {tol}: error {err:.3g}"
        errors.append(err)
        early |= any(k < c for it in stats.iters for k, c in zip(it, chunk_lengths(cfg.num_tokens, chunk)))
    assert early  # some chunk stopped before its length: the tolerance was exercised
    assert errors[0] > errors[2]


# --- sample(z=...), draw, generate ---------------------------------------------------------------


def test_sample_with_given_noise_and_either_sampler():
    cfg = tiny(3, 4, 4, 2, 2, K=4)
    model = random_flow(cfg)
    y = torch.tensor([0, 3])
    z = noise(cfg, B=2)
    raw = model.sample(2, y, guidance=1.0, denoise=False, z=z)
    torch.testing.assert_close(raw, model.reverse(z, y, guidance=1.0), atol=0, rtol=0)
    seq = model.sample(2, y, guidance=1.0, z=z)
    jac, stats = model.sample(2, y, guidance=1.0, z=z, sampler=Jacobi(tol=0), return_stats=True)
    torch.testing.assert_close(jac, seq, atol=1e-10, rtol=0)  # the score step is the same on the same x
    assert isinstance(stats, SampleStats) and stats.passes() == [cfg.num_tokens - 1] * 2
    _, seq_stats = model.sample(2, y, z=z, return_stats=True)
    assert seq_stats.sequential == [True, True] and seq_stats.max() == [1, 1]
    torch.testing.assert_close(draw(model, z, y, 1.0, sampler="jacobi"), model.sample(2, y, 1.0, z=z, sampler="jacobi"),
                               atol=0, rtol=0)


def test_generate_merges_the_stats_of_its_batches():
    cfg = tiny(1, 4, 4, 1, 2, K=0)
    model = random_flow(cfg)
    out, stats = generate(model, None, 5, 2, seed=0, d=Dist(), progress=False, sampler=Jacobi(tol=0, chunk=5),
                          return_stats=True)
    seq = generate(model, None, 5, 2, seed=0, d=Dist(), progress=False)
    assert sorted(out) == [0, 1, 2] and stats.batches == 3
    assert stats.iters == [[5, 5, 5] * 3] * 2 and stats.passes() == [15.0, 15.0]
    for j in out:
        torch.testing.assert_close(out[j], seq[j], atol=1e-10, rtol=0)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: Jacobi(tol=-1e-3), r"Jacobi tol must be >= 0 \(0 = exact\), got -0.001"),
    (lambda: Jacobi(tol=float("nan")), r"Jacobi tol must be >= 0"),
    (lambda: Jacobi(chunk=0), r"Jacobi chunk must be >= 1 token"),
    (lambda: Jacobi(max_iters=0), r"Jacobi max_iters must be >= 1"),
    (lambda: Jacobi(sequential_blocks=-1), r"Jacobi sequential_blocks must be >= 0"),
    (lambda: Jacobi(coarse_tol=-1.0), r"Jacobi coarse_tol must be >= 0"),
    (lambda: as_sampler("gauss-seidel"), r"unknown sampler 'gauss-seidel'; expected 'sequential', 'jacobi'"),
])
def test_bad_sampler_options_raise_one_line(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_bad_noise_and_sampler_in_sample():
    model = TARFlow(tiny(3, 4, 4, 2, 2, K=4))
    with pytest.raises(ValueError, match=r"z must have shape \(n, C, H, W\) = \(2, 3, 4, 4\), got \(3, 3, 4, 4\)"):
        model.sample(2, z=torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"got \(2, 1, 4, 4\)"):
        model.sample(2, z=torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="unknown sampler 'fast'"):
        model.sample(2, sampler="fast")


# --- the command -------------------------------------------------------------------------------


def test_cli_sample_with_the_jacobi_sampler(tmp_path, capsys):
    cfg = tiny(1, 8, 8, 2, 2, K=3)
    weights = tmp_path / "w.safetensors"
    save_weights(weights, random_flow(cfg, scale=0.1).float())
    args = ["sample", "--ckpt", str(weights), "--num-samples", "4", "--batch-size", "2", "--guidance", "0.5",
            "--format", "npz", "--precision", "fp32"]
    cli.main([*args, "--out", str(tmp_path / "seq")])
    assert "jacobi" not in capsys.readouterr().out
    cli.main([*args, "--sampler", "jacobi", "--tol", "0", "--chunk", "5", "--out", str(tmp_path / "jac")])
    out = capsys.readouterr().out
    assert "block 2: jacobi, 3 chunks, iterations per chunk mean 5.00 max 5, 15.0 passes" in out
    with np.load(tmp_path / "seq.npz") as a, np.load(tmp_path / "jac.npz") as b:
        # float32: the two samplers round differently, by far less than one uint8 level (and rarely across one)
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
    for extra, match in ((["--tol", "1e-3"], "--tol: only for --sampler jacobi"),
                         (["--sampler", "jacobi", "--chunk", "0"], "Jacobi chunk must be >= 1"),
                         (["--sampler", "newton"], "unknown sampler 'newton'")):
        with pytest.raises(SystemExit):
            cli.main([*args, *extra, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err


# --- float32 on each device ----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_float32_jacobi_matches_the_float64_sequential_sampler(device):
    cfg = tiny(3, 8, 8, 2, 3, K=5)
    ref = random_flow(cfg, scale=0.1)
    model = random_flow(cfg, scale=0.1).float().to(device)
    z, y = noise(cfg), labels(cfg)
    x = model.reverse(z.float().to(device), y.to(device), guidance=2.0, sampler=Jacobi(tol=0, chunk=4))
    torch.testing.assert_close(x.double().cpu(), ref.reverse(z, y, guidance=2.0), atol=1e-4, rtol=0)
    x = model.reverse(z.float().to(device), y.to(device), guidance=2.0, sampler=Jacobi(tol=1e-4))
    torch.testing.assert_close(x.double().cpu(), ref.reverse(z, y, guidance=2.0), atol=BOUND * 1e-4, rtol=0)
