"""Training with representation alignment (each strategy), its checkpoints and exported weights, exact
resume, the feature cache, and in-training evaluation; on a tiny flow and a tiny random encoder/evaluator."""

import json
import signal
from pathlib import Path

import pytest
import torch

from helpers import ENV, finish, killer, rows, rrepa, tiny, write_fake_fmnist
from rrepa.align.encoder_base import FrozenEncoder
from rrepa.flow.checkpoint import load_checkpoint, load_weights
from rrepa.fmnist.encoder import EMBEDDED_FILE, SSLBackbone, SSLConfig, save_embedded
from rrepa.training import objective
from rrepa.training.loop import train
from rrepa.training.run import load_run

# A 4 x 4-token flow (patch 7) against a random 2-stage SSL CNN (7 x 7 x 16 tokens, pooled onto 4 x 4).
ALIGN = ["align.enabled=true", "align.positions=[[2, 1]]", "align.projector_hidden=32", "align.weight=1.0",
         "train.eval_bpd=false", "train.sample_every=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_fmnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """RREPA_CACHE_DIR with a random fmnist-ssl encoder (never trained) in it."""
    root = tmp_path / "cache"
    monkeypatch.setenv("RREPA_CACHE_DIR", str(root))
    torch.manual_seed(123)
    save_embedded(root / "encoders" / EMBEDDED_FILE, SSLBackbone(SSLConfig(widths=(8, 16), dim=16)))
    return root


@pytest.fixture
def align(cache) -> list[str]:
    """ALIGN with the cache's random encoder pinned (the default would be the shipped fmnist-ssl)."""
    return [*ALIGN, f"align.encoder_weights={cache / 'encoders' / EMBEDDED_FILE}"]


@pytest.fixture
def encoder_calls(monkeypatch) -> dict:
    calls = {"images": 0, "batches": 0}
    forward = FrozenEncoder.forward

    def counting(self, x):
        calls["images"] += x.shape[0]
        calls["batches"] += 1
        return forward(self, x)

    monkeypatch.setattr(FrozenEncoder, "forward", counting)
    return calls


@pytest.mark.parametrize("strategy", ["forward", "detach", "reverse"])
def test_each_strategy_logs_both_losses_and_trains_the_projector(data, cache, align, tmp_path, strategy,
                                                                 encoder_calls):
    run = tmp_path / "run"
    cfg = tiny(data, *align, f"align.strategy={strategy}", "align.reverse=pseudo", "align.feature_cache=false",
               "train.steps=4", "train.ckpt_every=2")
    train(cfg, run, device="cpu")
    r = rows(run)
    assert [x["step"] for x in r] == [1, 2, 3, 4]
    for x in r:
        assert {"loss", "nll", "align_loss", "align_t2_l1"} <= set(x)
        assert -1 <= x["align_loss"] <= 1 and x["align_loss"] == pytest.approx(x["align_t2_l1"])
        assert x["loss"] == pytest.approx(x["nll"] + 1.0 * x["align_loss"], rel=1e-5, abs=1e-6)
    assert encoder_calls["images"] == 4 * 8  # online targets: one encoder call per micro-batch
    # The projector is in the checkpoint and moved; the exported weights hold only the flow.
    first, last = load_checkpoint(run / "ckpt-0000002.pt"), load_checkpoint(run / "ckpt-0000004.pt")
    assert set(last["align_head"]) and all(k.startswith("projectors.t2_l1.") for k in last["align_head"])
    assert any(not torch.equal(first["align_head"][k], last["align_head"][k]) for k in last["align_head"])
    for name in ("ema.safetensors", "model.safetensors"):
        model = load_weights(run / name)
        assert not any("projector" in k for k in model.state_dict())
    load_run(run)  # the checkpoint's flow loads without the projector


def test_alignment_gradient_reaches_the_projector_and_lowers_the_align_loss(data, cache, align, tmp_path):
    # Only the alignment term moves the weights (NLL weight is 1, but a high lr on a fixed batch of 8): the
    # alignment loss falls.
    cfg = tiny(data, *align, "align.feature_cache=false", "align.weight=5.0", "train.steps=12",
               "train.ckpt_every=12", "optim.batch_size=64", "optim.lr=3e-3", "optim.warmup_steps=0",
               "train.label_drop=0")
    train(cfg, tmp_path / "run", device="cpu")
    r = rows(tmp_path / "run")
    assert r[-1]["align_loss"] < r[0]["align_loss"] - 0.05


def test_every_reverse_method_trains_on_the_same_values_with_its_own_gradient(data, cache, align, tmp_path):
    """naive, pseudo and jacobi-K reconstruct the same features, so while the weights agree the alignment loss
    agrees. Step 1 starts at a zero proj_out, where every path has the same gradient, so step 2 agrees too; from
    then on pseudo's gradient is approximate: its weights part from naive's, and jacobi-N's (exact) do not."""
    finals = {}
    for method, extra in {"naive": [], "pseudo": [], "jacobi-N": ["align.jacobi_steps=16"]}.items():
        run = tmp_path / method
        cfg = tiny(data, *align, "align.strategy=reverse", f"align.reverse={method.split('-')[0]}", *extra,
                   "align.feature_cache=false", "train.steps=4", "train.ckpt_every=4")
        train(cfg, run, device="cpu")
        finals[method] = (rows(run), load_checkpoint(run / "ckpt-0000004.pt")["model"])
    (naive_rows, naive_w), (pseudo_rows, pseudo_w), (exact_rows, exact_w) = finals.values()
    for r in (pseudo_rows, exact_rows):
        for step in (0, 1):
            assert r[step]["align_loss"] == pytest.approx(naive_rows[step]["align_loss"], abs=1e-6)
    gap = max(float((pseudo_w[k] - naive_w[k]).abs().max()) for k in naive_w)
    exact_gap = max(float((exact_w[k] - naive_w[k]).abs().max()) for k in naive_w)
    assert gap > 1e-5 and exact_gap < gap / 100


def test_compiled_training_matches_eager_without_graph_breaks(data, cache, align, tmp_path, monkeypatch):
    """train.compile=true with R-REPA (pseudo): the same losses as eager, and the objective (flow forward,
    reverse path, projector, loss) captured without a graph break. The "aot_eager" backend (dynamo and AOT
    autograd, no code generation) stands in for inductor, whose C++ build takes over a minute here."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compile_(module, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    losses = {}
    for compiled in (False, True):
        run = tmp_path / str(compiled)
        train(tiny(data, *align, "align.feature_cache=false", f"train.compile={compiled}", "train.steps=3",
                   "train.ckpt_every=3"), run, device="cpu")
        losses[compiled] = [r[k] for r in rows(run) for k in ("loss", "align_loss")]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_targets_come_from_the_cache(data, cache, align, tmp_path, encoder_calls):
    cfg = tiny(data, *align, "align.feature_cache=true", "train.steps=3", "data.hflip=true")
    train(cfg, tmp_path / "a", device="cpu")
    built = list((cache / "features").iterdir())
    assert any((p / "features.npy").is_file() for p in built)
    # Building: 64 images and their mirrors, in one batch each; training added no encoder call.
    assert encoder_calls == {"images": 128, "batches": 2}
    train(cfg, tmp_path / "b", device="cpu")  # the cache is reused: no encoder call at all
    assert encoder_calls == {"images": 128, "batches": 2}
    assert "align_loss" in rows(tmp_path / "b")[0]
    # Cached (float16) and online targets give the same alignment loss on the same batches.
    train(tiny(data, *align, "align.feature_cache=false", "train.steps=3", "data.hflip=true"), tmp_path / "c",
          device="cpu")
    for a, c in zip(rows(tmp_path / "a"), rows(tmp_path / "c")):
        assert a["align_loss"] == pytest.approx(c["align_loss"], abs=2e-3)


def test_alignment_off_builds_no_encoder(data, cache, align, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was built with alignment off")

    build = objective.build_encoder
    monkeypatch.setattr(objective, "build_encoder", refuse)
    run = tmp_path / "run"
    train(tiny(data, "train.steps=2", "train.eval_bpd=false", "train.sample_every=0"), run, device="cpu")
    r = rows(run)
    assert "align_loss" not in r[0] and r[0]["loss"] == r[0]["nll"]
    assert "align_head" not in load_checkpoint(run / "ckpt-0000002.pt")
    # Such a checkpoint cannot be resumed with alignment on (no projectors to restore): a clear error.
    monkeypatch.setattr(objective, "build_encoder", build)
    with pytest.raises(ValueError, match="without alignment.*--init-from"):
        train(tiny(data, *align, "align.feature_cache=false", "train.steps=4"), run, resume=True, device="cpu")


# Kills the process inside the 8th flow forward (the alignment objective calls TARFlow.forward once per step).
KILLER = killer("forward")


def test_resume_with_alignment_after_sigkill_is_bitwise_exact(data, cache, align, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(tiny(data, *align, "align.feature_cache=true", "data.hflip=true", "train.steps=10").to_yaml())
    env = {**ENV, "RREPA_CACHE_DIR": str(cache)}
    train(tiny(data, *align, "align.feature_cache=true", "data.hflip=true", "train.steps=10"), tmp_path / "ref",
          device="cpu")  # in this process (one thread, as the others): builds the cache
    killed = rrepa("train", "--config", str(cfg), "--out", str(tmp_path / "run"), script=KILLER,
                   env={**env, "KILL_AT_CALL": "8"})  # dies inside step 8, after the checkpoint at step 6
    finish(killed, rc=-signal.SIGKILL)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("ckpt-*.pt")) == ["ckpt-0000003.pt", "ckpt-0000006.pt"]
    out = finish(rrepa("train", "--resume", str(run), env=env))
    assert "at step 6" in out
    a, b = load_checkpoint(run / "ckpt-0000010.pt"), load_checkpoint(tmp_path / "ref" / "ckpt-0000010.pt")
    for key in ("model", "ema", "align_head"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name} differs after resume"
    ra, rb = rows(run), rows(tmp_path / "ref")
    assert [r["step"] for r in ra] == list(range(1, 11))
    assert [(r["loss"], r["nll"], r["align_loss"]) for r in ra] == [(r["loss"], r["nll"], r["align_loss"])
                                                                    for r in rb]


def test_in_training_evaluation(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path / "cache"))  # fresh: the shipped evaluator, nothing trained
    run = tmp_path / "run"
    train(tiny(data, "train.steps=4", "train.eval_every=2", "train.eval_samples=12", "train.eval_batch_size=5",
               "train.eval_bpd=false", "train.sample_every=0"), run, device="cpu")
    evals = [r for r in rows(run) if "eval_fid" in r]
    assert [r["step"] for r in evals] == [2, 4]
    out = capsys.readouterr().out  # the run ends with its last evaluation, the one of step 4
    assert f"  FID          {evals[-1]['eval_fid']:.2f} (12 samples at guidance 0 against fmnist:train" in out
    assert f"  class acc.   {100 * evals[-1]['eval_class_accuracy']:.1f} %" in out
    for r in evals:
        assert r["eval_num_samples"] == 12 and r["eval_fid"] > 0 and r["eval_is"] >= 1
        assert 0 <= r["eval_class_accuracy"] <= 1 and r["eval_feature_network"].startswith("fmnist-cnn@")
        # The run's resolved precision beside the metrics, which keep their own `precision` (of precision / recall).
        assert r["eval_dtype"] in ("fp32", "bf16") and 0 <= r["eval_precision"] <= 1
    assert list((tmp_path / "cache" / "stats").glob("*.npz"))  # the training split's statistics, cached
    assert (run / "loss.png").is_file()  # the loss curve skips the evaluation lines
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    # `rrepa evaluate --ckpt RUN --num-samples N` samples as `rrepa sample` does and evaluates them.
    import numpy as np

    from rrepa import cli
    from rrepa.training.run import samples_from_checkpoint

    cli.main(["sample", "--ckpt", str(run), "--num-samples", "6", "--batch-size", "4", "--seed", "3",
              "--format", "npz", "--out", str(tmp_path / "s"), "--device", "cpu"])
    images, labels = samples_from_checkpoint(str(run), 6, batch_size=4, seed=3)
    with np.load(tmp_path / "s.npz") as f:
        assert np.array_equal(f["arr_0"], images) and np.array_equal(f["labels"], labels)
    assert images.shape == (6, 28, 28, 1) and images.dtype == np.uint8 and list(labels) == [0, 1, 2, 3, 4, 5]
    cli.main(["evaluate", "--ckpt", str(run), "--num-samples", "10", "--ref", "fmnist:train", "--data-dir",
              str(data), "--out", str(tmp_path / "eval.json"), "--device", "cpu"])
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["num_samples"] == 10 and res["fid"] > 0 and res["ckpt"] == str(run) and res["weights"] == "ema"
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--ckpt", str(run), "--ref", "fmnist:train"])  # no --num-samples: one-line error


def test_ddp_with_alignment_matches_one_process(data, cache, align, tmp_path):
    # Targets from the cache, so the loader yields indices (through the DDP-sharded GlobalBatchSampler); no noise
    # and no label drop, so the two runs differ only in how the global batch is split. The projector is in DDP:
    # its gradients are averaged like the flow's.
    import subprocess
    import sys

    cfg = tiny(data, *align, "align.feature_cache=true", "train.steps=3", "model.sigma=0", "train.label_drop=0",
               "optim.lr=1e-2", "optim.warmup_steps=0")
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    train(cfg, tmp_path / "one", device="cpu")  # builds the cache first
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "rrepa.cli", "train", "--config", str(tmp_path / "cfg.yaml"), "--out",
                          str(tmp_path / "ddp"), "--device", "cpu"],
                         env={**ENV, "RREPA_CACHE_DIR": str(cache)}, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    a, b = load_checkpoint(tmp_path / "ddp" / "ckpt-0000003.pt"), load_checkpoint(tmp_path / "one" / "ckpt-0000003.pt")
    # atol 1e-4 against steps of lr = 1e-2: the key biases get gradients that are zero in exact arithmetic (softmax
    # ignores them), which AdamW turns from rounding noise into +-lr steps.
    for key in ("model", "align_head"):
        for name, value in b[key].items():
            torch.testing.assert_close(a[key][name], value, rtol=1e-4, atol=1e-4, msg=f"{key}.{name} differs")
    for r2, r1 in zip(rows(tmp_path / "ddp"), rows(tmp_path / "one")):
        assert r2["align_loss"] == pytest.approx(r1["align_loss"], rel=1e-5)
        assert r2["nll"] == pytest.approx(r1["nll"], rel=1e-5)


@pytest.mark.cuda
def test_cuda_bf16_training_with_reverse_alignment(data, cache, align, tmp_path):
    """R-REPA (pseudo) trains on the GPU under bf16 autocast: finite losses that add up, and the checkpoint
    and exported weights load on the CPU."""
    run = tmp_path / "run"
    cfg = tiny(data, *align, "align.strategy=reverse", "align.reverse=pseudo", "train.precision=bf16",
               "train.steps=4", "train.ckpt_every=2")
    train(cfg, run, device="cuda")
    for x in rows(run):
        assert all(torch.isfinite(torch.tensor(x[k])) for k in ("loss", "nll", "align_loss"))
        assert x["loss"] == pytest.approx(x["nll"] + x["align_loss"], rel=1e-4, abs=1e-5)
    model, _ = load_run(run)
    assert next(model.parameters()).device.type == "cpu"
    assert torch.isfinite(model(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1])).z).all()


def test_evaluating_during_training_leaves_the_training_unchanged(data, tmp_path, monkeypatch):
    # The evaluation draws random numbers (its evaluator's initialisation, reference statistics); none of that
    # may reach the training's noise stream, whether or not the statistics were cached.
    from rrepa.flow.checkpoint import load_checkpoint as load
    from rrepa.fmnist.evaluator import FMNISTCNN, save_evaluator

    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    ev = save_evaluator(FMNISTCNN(), {"test_accuracy": 0.1}, tmp_path / "ev.safetensors")
    common = ["train.steps=4", "train.eval_bpd=false", "train.sample_every=0", "train.ckpt_every=4"]
    evals = ["train.eval_every=2", "train.eval_samples=12", "train.eval_batch_size=8", "train.eval_test_images=8",
             f"train.eval_weights={ev}"]
    train(tiny(data, *common), tmp_path / "plain", device="cpu")
    train(tiny(data, *common, *evals), tmp_path / "first", device="cpu")  # computes the reference statistics
    train(tiny(data, *common, *evals), tmp_path / "cached", device="cpu")  # loads them from the cache
    plain = load(tmp_path / "plain" / "ckpt-0000004.pt")["model"]
    for name in ("first", "cached"):
        other = load(tmp_path / name / "ckpt-0000004.pt")["model"]
        assert all(torch.equal(plain[k], other[k]) for k in plain), name
    r = [x for x in rows(tmp_path / "cached") if "eval_fid" in x]
    assert [x["step"] for x in r] == [2, 4]
    assert all(0 <= x["eval_one_step_top1"] <= 1 and 0 <= x["eval_bayes_top1"] <= 1 and x["eval_bpd"] > 0
               and x["eval_test_images"] == 8 for x in r)
    assert 0 <= r[0]["eval_wall_s"] <= r[1]["eval_wall_s"]  # the run's clock (rounded to 0.1 s: may read 0.0)


def test_the_clutter_preset_aligns_to_and_is_evaluated_by_its_shipped_networks(data, tmp_path, monkeypatch, capsys):
    """`--preset fmnist-clutter` shrunk: R-REPA towards the shipped fmnist-clutter-ssl (8 x 8 tokens of the 32 px
    canvases, pooled onto the 4 x 4 flow grid), evaluated with the shipped fmnist-clutter-cnn against the variant's
    training split; nothing is trained or downloaded."""
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny(data, "model.patch_size=8", "train.steps=3", "train.sample_every=0", "train.eval_every=3",
               "train.eval_samples=10", "train.eval_batch_size=5", "train.eval_test_images=8", "train.eval_bpd=false",
               "align.enabled=true", "align.positions=[[2, 1]]", "align.projector_hidden=32", preset="fmnist-clutter")
    run = tmp_path / "run"
    train(cfg, run, device="cpu")
    r = rows(run)
    assert all(x["align_loss"] == x["align_loss"] for x in r if "align_loss" in x) and "align_loss" in r[0]
    (last,) = [x for x in r if "eval_fid" in x]
    assert last["eval_feature_network"] == "fmnist-cnn@618a048268" and last["eval_num_samples"] == 10
    assert "against fmnist-clutter-32px-seed0:train" in capsys.readouterr().out
    ckpt = load_checkpoint(run / "ckpt-0000003.pt")["config"]
    assert ckpt["align"]["encoder_weights"] == "fmnist-clutter-ssl" and ckpt["data"]["name"] == "fmnist-clutter"
    assert not (tmp_path / "cache" / "encoders").exists() and not (tmp_path / "cache" / "evaluator").exists()
