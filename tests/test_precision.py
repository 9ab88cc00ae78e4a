"""train.precision (rrepa.precision): how `auto` resolves, what stays float32 under bf16 autocast, and bf16 training
end to end (the loss falls, master weights, AdamW state and EMA stay float32, the choice is stored)."""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import rows, tiny
from rrepa import precision
from rrepa.align.head import AlignConfig, AlignHead
from rrepa.flow.checkpoint import load_checkpoint
from rrepa.flow.config import FlowConfig
from rrepa.flow.tarflow import TARFlow
from rrepa.training.config import RunConfig, read_yaml
from rrepa.training.loop import train
from rrepa.training.objective import Objective


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, "fp32"), (True, False, "bf16"),
                                                        (False, True, "bf16")])
def test_auto_follows_the_cpu_capability(monkeypatch, avx512_bf16, amx, expected):
    """On x86, auto is bf16 exactly when the CPU has AVX512_BF16 or AMX (mocked here: any machine runs this)."""
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("fp32", "cpu") == "fp32"  # explicit settings are taken as given
    assert precision.resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("features, expected", [("fp asimd evtstrm aes bf16 i8mm", "bf16"), ("fp asimd aes", "fp32")])
def test_auto_on_arm_reads_the_bf16_feature(monkeypatch, features, expected):
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(precision.Path, "read_text", lambda self: f"processor\t: 0\nFeatures\t: {features}\n")
    assert precision.resolve_precision("auto", "cpu") == expected


def test_auto_on_cuda_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert precision.resolve_precision("auto", "cuda") == expected


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        precision.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="resolve 'auto'"):
        precision.autocast("auto", "cpu")


def small_flow() -> TARFlow:
    torch.manual_seed(0)
    model = TARFlow(FlowConfig(in_channels=1, image_height=8, image_width=8, patch_size=2, width=64, head_dim=32,
                               num_blocks=2, layers_per_block=2, num_classes=3, sigma=0.1))
    with torch.no_grad():
        for block in model.blocks:  # off the identity, so the transformer's output matters
            block.proj_out.weight.normal_(0, 0.05)
    return model


def test_cpu_attention_runs_in_float32_under_bf16_autocast(monkeypatch):
    """The projections run in bf16, attention in float32 (CPU bf16 attention kernels are slower), both in the
    forward pass and in the KV-cache reverse."""
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(q.dtype) or sdpa(q, k, v,
                                                                                                               **kw))
    model, x = small_flow(), torch.randn(2, 1, 8, 8) * 0.5
    with precision.autocast("bf16", "cpu"):
        h = model(x, hidden=[(1, 1)]).hidden[(1, 1)]
        model.reverse(torch.randn(2, 1, 8, 8))
    assert seen and set(seen) == {torch.float32}
    assert h.dtype == torch.float32  # the residual stream: bf16 projections added onto float32 embeddings


def test_what_stays_float32_under_bf16():
    """z, the log-determinant, the NLL and the objective's loss are float32 under bf16 autocast, close to fp32's;
    the denoising score step and, on the CPU, the sequential sampler ignore autocast altogether (bit for bit the
    float32 computation)."""
    model, x, y = small_flow(), torch.randn(4, 1, 8, 8) * 0.5, torch.tensor([0, 1, 2, 0])
    with precision.autocast("bf16", "cpu"):
        out = model(x, y)
        nll = model.nll(x, y)
        loss, logs = Objective(model)(x, y, 0.0, None, None)
        denoised = model.denoise(x, y)
        sampled = model.reverse(x, y, guidance=1.0)
    torch.testing.assert_close(sampled, model.reverse(x, y, guidance=1.0), atol=0, rtol=0)
    assert out.z.dtype == out.logdet.dtype == nll.dtype == loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in logs.values())
    torch.testing.assert_close(nll, model.nll(x, y), atol=0.02, rtol=0.02)
    assert not torch.equal(nll, model.nll(x, y))  # bf16 did run: the values differ by its rounding
    torch.testing.assert_close(denoised, model.denoise(x, y), atol=0, rtol=0)


@pytest.mark.parametrize("parts", [[], ["path"], ["projector"], ["path", "projector"]])
def test_align_float32_parts_run_in_float32_under_bf16(parts):
    """align.float32 puts the features' path (the reverse pass) and / or the projector in float32 under bf16
    autocast: the features h that reach the projector are bit for bit the float32 pass's with "path" (and differ
    by bf16's rounding without), the projector's first layer returns float32 with "projector" (bf16 without);
    with both parts the loss is bit for bit the float32 computation's on the same forward output."""
    model, x, y = small_flow(), torch.randn(4, 1, 8, 8) * 0.5, torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)
    head = AlignHead(AlignConfig(positions=[(2, 2)], strategy="reverse", reverse="pseudo", projector_hidden=16,
                                 float32=parts), flow_width=64, encoder_dim=6)
    seen = []
    head.projectors["t2_l2"][0].register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.dtype)))
    target = torch.randn(4, 16, 6)
    with precision.autocast("bf16", "cpu"):
        out = model(x, y)
        loss = head(model, x, y, target, forward_out=out).loss
    reference = head(model, x, y, target, forward_out=out).loss  # float32 throughout, on the same forward output
    (h, dtype), (h32, _) = seen
    assert torch.equal(h, h32) == ("path" in parts)
    assert dtype == (torch.float32 if "projector" in parts else torch.bfloat16)
    assert torch.equal(loss, reference) == (parts == ["path", "projector"])


def test_align_float32_names_known_parts():
    with pytest.raises(ValueError, match="align.float32 must list distinct parts among path, projector"):
        AlignConfig(float32=["head"])
    with pytest.raises(ValueError, match="needs strategy detach or reverse"):
        AlignConfig(strategy="forward", float32=["path"])


def test_bf16_training_learns_and_keeps_float32_state(data, tmp_path):
    """A bf16 run: its loss falls; weights, EMA and AdamW state are float32; config.yaml, the checkpoint and
    bpd.json record the resolved precision."""
    run = tmp_path / "run"
    cfg = tiny(data, "train.precision=bf16", "train.steps=30", "train.sample_every=0", "train.ckpt_every=30",
               "optim.warmup_steps=0", "train.label_drop=0")
    train(cfg, run, device="cpu")
    losses = [r["loss"] for r in rows(run)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    ckpt = load_checkpoint(run / "ckpt-0000030.pt")
    assert ckpt["config"]["train"]["precision"] == "bf16"
    assert RunConfig.from_dict(read_yaml(run / "config.yaml")).train.precision == "bf16"
    assert json.loads((run / "bpd.json").read_text())["dtype"] == "bf16"
    for key in ("model", "ema"):
        assert {v.dtype for v in ckpt[key].values()} == {torch.float32}, key
    state = [t for s in ckpt["optimizer"]["state"].values() for t in s.values() if t.is_floating_point()]
    assert state and {t.dtype for t in state} == {torch.float32}
    # The commands that run a flow take the run's own precision unless --precision says otherwise.
    from rrepa import cli

    for flag, want in (([], "bf16"), (["--precision", "fp32"], "fp32")):
        out = tmp_path / f"bpd-{want}.json"
        cli.main(["bpd", "--ckpt", str(run), "--max-images", "8", "--device", "cpu", "--json", str(out), *flag])
        assert json.loads(out.read_text())["dtype"] == want


def test_auto_is_stored_resolved(data, tmp_path, monkeypatch):
    """auto is resolved once, at the start, and the run stores the result (a resume keeps it on any machine)."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    run = tmp_path / "run"
    train(tiny(data, "train.precision=auto", "train.steps=1", "train.sample_every=0", "train.eval_bpd=false"), run,
          device="cpu")
    assert read_yaml(run / "config.yaml")["train"]["precision"] == "fp32"


@pytest.mark.parametrize("coarse_tol", [0.01, 0.1, 10.0])  # 10: the float32 iterations do all of the work
def test_jacobi_refines_a_bf16_solution_to_the_float32_one(coarse_tol):
    """Under bf16 autocast the Jacobi sampler iterates in bf16, then in float32 from that result: its images match
    the float32 sequential sampler's within the tolerance, which bf16 alone (refine=False) does not reach, whatever
    the bf16 iterations' tolerance (coarse_tol decides the cost, not the answer)."""
    from rrepa.flow.jacobi import Jacobi

    model = small_flow()
    z, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 1])
    exact = model.reverse(z, y)  # float32, sequential
    with precision.autocast("bf16", "cpu"):
        refined, stats = model.reverse(z, y, sampler=Jacobi(tol=1e-5, coarse_tol=coarse_tol), return_stats=True)
        rough = model.reverse(z, y, sampler=Jacobi(tol=1e-5, refine=False))
    err_refined, err_rough = (refined - exact).abs().max(), (rough - exact).abs().max()
    assert err_refined < 1e-4 and err_rough > 10 * err_refined, (err_refined, err_rough)
    N = model.cfg.num_tokens
    assert all(sum(it) <= 2 * (N - 1) for it in stats.iters)  # never more than two exact passes per chunk
