"""Conversion of apple/ml-tarflow checkpoints (and STARFlow's per-block layer counts in the same layout), checked
against an independent float64 implementation of their forward pass written here from their formulas."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from rrepa.flow.checkpoint import load_weights
from rrepa.flow.convert import convert_file, convert_state_dict
from rrepa.flow.jacobi import Jacobi
from rrepa.flow.tarflow import TARFlow


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: with a busy second core, intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Their layout and forward pass
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    channels: int
    patch: int
    img: int
    width: int
    head_dim: int
    blocks: int
    layers: int | tuple[int, ...]  # one count for every block, or one per block (STARFlow's deep-shallow models)
    classes: int
    nvp: bool
    expansion: int = 4

    def block_layers(self, t: int) -> int:
        """Layers of 0-indexed block t."""
        return self.layers[t] if isinstance(self.layers, tuple) else self.layers

    @property
    def tokens(self) -> int:
        return (self.img // self.patch) ** 2

    @property
    def dim(self) -> int:
        return self.channels * self.patch**2


ARCHS = [
    Arch(channels=3, patch=2, img=8, width=16, head_dim=8, blocks=3, layers=2, classes=5, nvp=True),
    Arch(channels=1, patch=1, img=5, width=8, head_dim=4, blocks=2, layers=1, classes=0, nvp=True),
    Arch(channels=4, patch=4, img=8, width=16, head_dim=8, blocks=4, layers=2, classes=3, nvp=False),
    Arch(channels=3, patch=1, img=4, width=8, head_dim=8, blocks=1, layers=3, classes=0, nvp=False),
    Arch(channels=1, patch=2, img=6, width=12, head_dim=4, blocks=5, layers=1, classes=2, nvp=True, expansion=2),
    Arch(channels=4, patch=2, img=4, width=8, head_dim=2, blocks=2, layers=2, classes=0, nvp=True),
    # STARFlow's deep-shallow layout (shallow blocks first, the deep one last), and a deep block first
    Arch(channels=1, patch=2, img=8, width=16, head_dim=8, blocks=4, layers=(1, 1, 1, 3), classes=3, nvp=True),
    Arch(channels=3, patch=2, img=4, width=8, head_dim=4, blocks=3, layers=(3, 1, 2), classes=0, nvp=False),
]
RAGGED = [a for a in ARCHS if isinstance(a.layers, tuple)]
IDS = [f"C{a.channels}-p{a.patch}-T{a.blocks}-L{'-'.join(map(str, a.layers)) if a in RAGGED else a.layers}"
       f"-K{a.classes}-{'nvp' if a.nvp else 'shift'}" for a in ARCHS]


def their_state_dict(a: Arch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the shapes and key names of ml-tarflow's Model (float64)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    W, D, N, M = a.width, a.dim, a.tokens, a.expansion * a.width
    sd = {}
    for t in range(a.blocks):
        b = f"blocks.{t}."
        sd[b + "proj_in.weight"] = rnd(W, D, scale=D**-0.5)
        sd[b + "proj_in.bias"] = rnd(W, scale=0.1)
        sd[b + "pos_embed"] = rnd(N, W, scale=0.5)
        if a.classes:
            sd[b + "class_embed"] = rnd(a.classes, 1, W, scale=0.5)
        for l in range(a.block_layers(t)):
            p = f"{b}attn_blocks.{l}."
            sd[p + "attention.norm.weight"] = 1 + rnd(W, scale=0.1)
            sd[p + "attention.norm.bias"] = rnd(W, scale=0.1)
            sd[p + "attention.qkv.weight"] = rnd(3 * W, W, scale=W**-0.5)
            sd[p + "attention.qkv.bias"] = rnd(3 * W, scale=0.1)
            sd[p + "attention.proj.weight"] = rnd(W, W, scale=W**-0.5)
            sd[p + "attention.proj.bias"] = rnd(W, scale=0.1)
            sd[p + "mlp.norm.weight"] = 1 + rnd(W, scale=0.1)
            sd[p + "mlp.norm.bias"] = rnd(W, scale=0.1)
            sd[p + "mlp.main.0.weight"] = rnd(M, W, scale=W**-0.5)
            sd[p + "mlp.main.0.bias"] = rnd(M, scale=0.1)
            sd[p + "mlp.main.2.weight"] = rnd(W, M, scale=M**-0.5)
            sd[p + "mlp.main.2.bias"] = rnd(W, scale=0.1)
        out = 2 * D if a.nvp else D
        sd[b + "proj_out.weight"] = rnd(out, W, scale=0.1 * W**-0.5)
        sd[b + "proj_out.bias"] = rnd(out, scale=0.05)
        sd[b + "attn_mask"] = torch.tril(torch.ones(N, N))
    sd["var"] = torch.ones(N, D)
    return sd


def _layer_norm(h, w, b):
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + 1e-5) * w + b


def _linear(h, sd, name):
    return h @ sd[name + ".weight"].T + sd[name + ".bias"]


def their_forward(sd, a: Arch, x: torch.Tensor, y: torch.Tensor | None):
    """ml-tarflow's Model.forward written out: -> z (B, N, D) tokens, per-block logdets [(B,)]."""
    B = x.shape[0]
    heads = a.width // a.head_dim
    tokens = F.unfold(x, a.patch, stride=a.patch).transpose(1, 2)
    N = tokens.shape[1]
    causal = torch.tril(torch.ones(N, N, dtype=torch.bool))
    logdets = []
    for t in range(a.blocks):
        b = f"blocks.{t}."
        perm = (lambda v, dim=1: v.flip(dim)) if t % 2 else (lambda v, dim=1: v)
        x_in = perm(tokens)
        h = _linear(x_in, sd, b + "proj_in") + perm(sd[b + "pos_embed"], 0)
        if a.classes:
            table = sd[b + "class_embed"]  # (K, 1, W)
            if y is None:
                h = h + table.mean(0)
            else:
                null = (y < 0).to(h.dtype).view(-1, 1, 1)
                h = h + (1 - null) * table[y.clamp(min=0)] + null * table.mean(0)
        for l in range(a.block_layers(t)):
            p = f"{b}attn_blocks.{l}."
            u = _layer_norm(h, sd[p + "attention.norm.weight"], sd[p + "attention.norm.bias"])
            qkv = _linear(u, sd, p + "attention.qkv").reshape(B, N, 3 * heads, a.head_dim).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=1)
            scores = q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)
            attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
            h = h + _linear(attn.transpose(1, 2).reshape(B, N, a.width), sd, p + "attention.proj")
            u = _layer_norm(h, sd[p + "mlp.norm.weight"], sd[p + "mlp.norm.bias"])
            u = _linear(u, sd, p + "mlp.main.0")
            u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
            h = h + _linear(u, sd, p + "mlp.main.2")
        out = _linear(h, sd, b + "proj_out")
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        if a.nvp:
            xa, xb = out.chunk(2, dim=-1)
        else:
            xa, xb = torch.zeros_like(out), out
        tokens = perm((x_in - xb) * torch.exp(-xa))
        logdets.append(-xa.mean(dim=[1, 2]))
    return tokens, logdets


def _fold(tokens, a: Arch):
    return F.fold(tokens.transpose(1, 2), a.img, a.patch, stride=a.patch)


def _converted(a: Arch, sd=None):
    sd = their_state_dict(a) if sd is None else sd
    cfg, ours = convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim, sigma=0.1)
    model = TARFlow(cfg).double()
    model.load_state_dict(ours)
    return sd, cfg, model


def _inputs(a: Arch, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, a.channels, a.img, a.img, generator=g, dtype=torch.float64) * 2 - 1


# --------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a", ARCHS, ids=IDS)
def test_config_inferred(a):
    _, cfg, _ = _converted(a)
    assert (cfg.in_channels, cfg.image_height, cfg.image_width, cfg.patch_size) == (a.channels, a.img, a.img, a.patch)
    assert (cfg.width, cfg.num_blocks, cfg.layers_per_block) == (a.width, a.blocks, a.layers)
    assert (cfg.head_dim, cfg.mlp_ratio, cfg.num_classes, cfg.sigma) == (a.head_dim, a.expansion, a.classes, 0.1)


@pytest.mark.parametrize("a", ARCHS, ids=IDS)
def test_forward_matches_theirs(a):
    sd, cfg, model = _converted(a)
    x = _inputs(a)
    z_ref, lds = their_forward(sd, a, x, None)
    assert z_ref.abs().max() < 50  # the random weights give a well-conditioned flow
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.z, _fold(z_ref, a), rtol=0, atol=1e-10)
    expected = torch.stack(lds).sum(0) * a.tokens * a.dim
    torch.testing.assert_close(out.logdet, expected, rtol=0, atol=1e-10)
    if not a.nvp:
        assert out.logdet.abs().max() == 0
    else:
        assert out.logdet.abs().min() > 1e-3  # the log-scale half is really used
    # their loss, written with our outputs
    their_loss = 0.5 * z_ref.pow(2).mean() - torch.stack(lds).sum(0).mean()
    ours = (0.5 * out.z.pow(2).flatten(1).sum(1) - out.logdet).mean() / cfg.num_dims
    torch.testing.assert_close(ours, their_loss, rtol=0, atol=1e-10)


@pytest.mark.parametrize("a", [a for a in ARCHS if a.classes], ids=[i for a, i in zip(ARCHS, IDS) if a.classes])
def test_labels_and_null_label(a):
    sd, _, model = _converted(a)
    x = _inputs(a, batch=4)
    y = torch.tensor([0, a.classes - 1, 1, 0])
    with torch.no_grad():
        z_ref, lds = their_forward(sd, a, x, y)
        out = model(x, y)
        torch.testing.assert_close(out.z, _fold(z_ref, a), rtol=0, atol=1e-10)
        torch.testing.assert_close(out.logdet, torch.stack(lds).sum(0) * a.tokens * a.dim, rtol=0, atol=1e-10)
        # The null label: their y = -1 (and y = None) against our y = None.
        z_null, _ = their_forward(sd, a, x, torch.full((4,), -1))
        torch.testing.assert_close(model(x).z, _fold(z_null, a), rtol=0, atol=1e-10)
        # Mixed rows: their -1 entries against our uniform class weights.
        y_mixed = torch.tensor([0, -1, a.classes - 1, -1])
        w = torch.full((4, a.classes), 1.0 / a.classes, dtype=torch.float64)
        w[0], w[2] = F.one_hot(torch.tensor(0), a.classes), F.one_hot(torch.tensor(a.classes - 1), a.classes)
        z_mixed, _ = their_forward(sd, a, x, y_mixed)
        torch.testing.assert_close(model(x, w).z, _fold(z_mixed, a), rtol=0, atol=1e-10)
        assert not torch.allclose(z_mixed, z_null)  # the labels matter


@pytest.mark.parametrize("a", ARCHS, ids=IDS)
def test_reverse_inverts_forward(a):
    _, _, model = _converted(a)
    x = _inputs(a)
    y = torch.arange(3) % a.classes if a.classes else None
    with torch.no_grad():
        z = model(x, y).z
    torch.testing.assert_close(model.reverse(z, y), x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("a", ARCHS, ids=IDS)
@pytest.mark.parametrize("chunk", [None, 2])
def test_jacobi_sampler_equals_the_sequential_one(a, chunk):
    """At tol 0 the Jacobi sampler is exact on a converted model, with guidance (class-conditional models)
    or the attention temperature (unconditional ones)."""
    _, cfg, model = _converted(a)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, a.channels, a.img, a.img, generator=g, dtype=torch.float64)
    y = torch.arange(3) % a.classes if a.classes else None
    kw = dict(guidance=1.0, anneal=True) if a.classes else dict(guidance=0.5, attn_temp=0.8)
    for guided in (False, True):
        args = kw if guided else {}
        ref = model.reverse(z, y, **args)
        x, stats = model.reverse(z, y, **args, sampler=Jacobi(tol=0, chunk=chunk), return_stats=True)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)
        assert stats.passes() == [cfg.num_tokens - 1] * cfg.num_blocks
        assert not torch.allclose(ref, z)


# --------------------------------------------------------------------------------------------
# Checkpoint formats and files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"module." + k: v for k, v in sd.items()},
    lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},
    lambda sd: {"model": {"module._orig_mod." + k: v for k, v in sd.items()}, "step": 7},
    lambda sd: {"state_dict": sd, "optimizer": {"lr": 1e-4}},
    lambda sd: {"ema": {"module." + k: v for k, v in sd.items()}},
], ids=["raw", "ddp", "compiled", "model-ddp-compiled", "state_dict", "ema"])
def test_wrapped_and_prefixed(wrap):
    a = ARCHS[0]
    sd = their_state_dict(a)
    cfg, ref = convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim)
    cfg2, got = convert_state_dict(wrap(sd), in_channels=a.channels, head_dim=a.head_dim)
    assert cfg2 == cfg and got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_ema_preferred_over_model():
    a = ARCHS[1]
    ema, raw = their_state_dict(a, seed=1), their_state_dict(a, seed=2)
    _, got = convert_state_dict({"model": raw, "ema": ema}, in_channels=a.channels, head_dim=a.head_dim)
    _, ref = convert_state_dict(ema, in_channels=a.channels, head_dim=a.head_dim)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("a", [ARCHS[0], ARCHS[2], RAGGED[0]], ids=[IDS[0], IDS[2], "ragged"])
def test_convert_file_round_trip(tmp_path, a):
    sd = {k: v.float() for k, v in their_state_dict(a).items()}
    src, dst = tmp_path / "tarflow.pth", tmp_path / "out" / "flow.safetensors"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, src)
    cfg = convert_file(src, dst, in_channels=a.channels, head_dim=a.head_dim, sigma=0.2)
    model = load_weights(dst)
    assert model.cfg == cfg and cfg.sigma == 0.2 and cfg.num_classes == a.classes
    _, ref = convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim)
    loaded = model.state_dict()
    assert loaded.keys() == ref.keys()
    assert all(torch.equal(loaded[k], ref[k]) for k in ref)
    x = _inputs(a)
    z_ref, _ = their_forward({k: v.double() for k, v in sd.items()}, a, x, None)
    with torch.no_grad():
        z = model(x.float()).z
    torch.testing.assert_close(z.double(), _fold(z_ref, a), rtol=1e-4, atol=1e-4)


def test_cli_convert(tmp_path, capsys):
    from rrepa.cli import main

    a = ARCHS[3]
    src, dst = tmp_path / "c.pt", tmp_path / "c.safetensors"
    torch.save({k: v.float() for k, v in their_state_dict(a).items()}, src)
    main(["convert", str(src), str(dst), "--in-channels", "3", "--head-dim", "8"])
    assert load_weights(dst).cfg.image_height == a.img
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tmp_path / "missing.pt"), str(dst)])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Per-block layer counts
# --------------------------------------------------------------------------------------------


def test_per_block_layer_counts_are_inferred():
    """Each block's count comes from its own attn_blocks keys: a tuple when they differ, an int when they agree."""
    a = RAGGED[0]
    _, cfg, model = _converted(a)
    assert cfg.layers_per_block == (1, 1, 1, 3) and [len(b.layers) for b in model.blocks] == [1, 1, 1, 3]
    # The same blocks with equal counts: the int, as for ml-tarflow.
    _, cfg, _ = _converted(Arch(**{**a.__dict__, "layers": (2, 2, 2, 2)}))
    assert cfg.layers_per_block == 2
    # Dropping the deep block's last layer makes it a 2-layer block (nothing else is missing).
    sd = their_state_dict(a)
    for key in [k for k in sd if k.startswith("blocks.3.attn_blocks.2.")]:
        del sd[key]
    cfg, _ = convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim)
    assert cfg.layers_per_block == (1, 1, 1, 2)


def test_a_gap_in_a_blocks_layers_is_a_missing_key():
    a = RAGGED[0]
    sd = their_state_dict(a)
    for key in [k for k in sd if k.startswith("blocks.3.attn_blocks.1.")]:
        del sd[key]
    with pytest.raises(ValueError, match=r"missing key blocks\.3\.attn_blocks\.1\."):
        convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim)


def test_starflow_features_without_a_counterpart_are_refused():
    a = RAGGED[0]
    sd = their_state_dict(a)
    # STARFlow's identity blocks (0 layers) store no weights: rrepa has no 0-layer block.
    gap = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"block 1 has no weights .*identity blocks \(0 layers\)") as exc:
        convert_state_dict(gap, in_channels=a.channels, head_dim=a.head_dim)
    assert "\n" not in str(exc.value)
    no_layers = {k: v for k, v in sd.items() if not k.startswith("blocks.2.attn_blocks.")}
    with pytest.raises(ValueError, match=r"block 2 of the checkpoint has no transformer layers"):
        convert_state_dict(no_layers, in_channels=a.channels, head_dim=a.head_dim)
    W = a.width
    extras = {"blocks.3.sos_embed": ("sos_embed", torch.zeros(1, 1, a.dim)),
              "blocks.3.final_norm.weight": ("final_norm", torch.zeros(W)),
              "blocks.3.proj_txt.weight": ("proj_txt", torch.zeros(W, 4)),
              "learnable_self_denoiser.proj_in.weight": ("learnable_self_denoiser", torch.zeros(W, 4))}
    for key, (named, value) in extras.items():
        with pytest.raises(ValueError, match=rf"STARFlow features rrepa's TARFlow does not have: .*\({named}\)"):
            convert_state_dict({**sd, key: value}, in_channels=a.channels, head_dim=a.head_dim)
    rope = {k: v for k, v in sd.items() if not k.endswith(".pos_embed")}
    with pytest.raises(ValueError, match="rotary position embeddings"):
        convert_state_dict(rope, in_channels=a.channels, head_dim=a.head_dim)


# --------------------------------------------------------------------------------------------
# Errors and warnings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [5, 4, 2])
def test_wrong_in_channels(channels):
    a = ARCHS[0]  # D = 12
    with pytest.raises(ValueError, match="--in-channels") as exc:
        convert_state_dict(their_state_dict(a), in_channels=channels, head_dim=a.head_dim)
    assert "\n" not in str(exc.value)


def test_wrong_head_dim():
    a = ARCHS[0]
    with pytest.raises(ValueError, match="--head-dim"):
        convert_state_dict(their_state_dict(a), in_channels=a.channels, head_dim=64)


@pytest.mark.parametrize("key", ["blocks.1.attn_blocks.1.attention.qkv.bias", "blocks.2.proj_out.weight",
                                 "blocks.0.class_embed", "blocks.2.pos_embed", "blocks.1.mlp.norm.weight"])
def test_missing_key(key):
    a = ARCHS[0]
    sd = their_state_dict(a)
    if key in sd:
        del sd[key]
        with pytest.raises(ValueError, match="missing key " + key.replace(".", r"\.")):
            convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim)
    else:  # not one of theirs: an unknown key
        sd[key] = torch.ones(a.width)
        with pytest.raises(ValueError, match="unknown key " + key.replace(".", r"\.")):
            convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim)


def test_missing_class_embed_in_one_block():
    a = ARCHS[0]
    sd = their_state_dict(a)
    del sd["blocks.1.class_embed"]
    with pytest.raises(ValueError, match=r"missing key blocks\.1\.class_embed"):
        convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim)


def test_wrong_shape_and_not_a_state_dict():
    a = ARCHS[0]
    sd = their_state_dict(a)
    sd["blocks.1.attn_blocks.0.mlp.main.2.bias"] = torch.zeros(a.width + 1)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn_blocks\.0\.mlp\.main\.2\.bias has shape"):
        convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim)
    with pytest.raises(ValueError, match="no ml-tarflow state dict"):
        convert_state_dict({"optimizer": {"lr": torch.ones(1)}})


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_file(tmp_path / "nope.pth", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""], ids=["garbage", "empty"])
def test_corrupt_file(tmp_path, content):
    src = tmp_path / "bad.pth"
    src.write_bytes(content)
    with pytest.raises(ValueError, match="could not be read") as exc:
        convert_file(src, tmp_path / "out.safetensors")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_truncated_file(tmp_path):
    src = tmp_path / "cut.pth"
    torch.save(their_state_dict(ARCHS[1]), src)
    src.write_bytes(src.read_bytes()[:-200])
    with pytest.raises(ValueError, match="could not be read"):
        convert_file(src, tmp_path / "out.safetensors", in_channels=1, head_dim=4)


def test_var_warning():
    a = ARCHS[1]
    sd = their_state_dict(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim)  # var = 1: no warning
        sd["var"] = sd["var"] + 5e-4
        convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim)  # within 1e-3: no warning
    sd["var"] = torch.full_like(sd["var"], 0.5)
    with pytest.warns(UserWarning, match=r"sqrt\(var\).*likelihoods are unaffected"):
        convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim)
    del sd["var"], sd["blocks.0.attn_mask"]  # both optional
    convert_state_dict(sd, in_channels=a.channels, head_dim=a.head_dim)


def test_safetensors_source(tmp_path):
    from safetensors.torch import save_file

    a = ARCHS[1]
    sd = {k: v.float().contiguous() for k, v in their_state_dict(a).items()}
    src, dst = tmp_path / "theirs.safetensors", tmp_path / "ours.safetensors"
    save_file(sd, str(src))
    cfg = convert_file(src, dst, in_channels=a.channels, head_dim=a.head_dim)
    assert load_weights(dst).cfg == cfg
    src.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="could not be read as a safetensors file"):
        convert_file(src, dst, in_channels=a.channels, head_dim=a.head_dim)
