"""Training: outputs of a run, non-finite steps, refusing a used folder, exact resume after SIGKILL,
and DDP on two gloo processes matching one process on the same global batch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ENV, assert_same_state, finish, kill_tree, killer, rows, rrepa, sgd, tiny
from rrepa import cli
from rrepa.distributed import Dist, GlobalBatchSampler
from rrepa.flow.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from rrepa.flow.tarflow import TARFlow
from rrepa.training import loop
from rrepa.training.config import resolve
from rrepa.training.loop import train
from rrepa.training.objective import Objective
from rrepa.training.run import stored_config
from rrepa.utils import lr_factor


def test_a_run_leaves_everything_it_promises(data, tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(tiny(data, "train.keep_last=1"), run, device="cpu")
    out = capsys.readouterr().out
    assert f"  samples      {run}/samples/step-0000006.png" in out and "  bits/dim     " in out  # the final summary
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "last", "ckpt-0000006.pt", "ema.safetensors", "model.safetensors",
            "loss.png", "bpd.json", "samples", "tb"} <= names
    assert "ckpt-0000003.pt" not in names  # keep_last=1
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    assert list((run / "tb").iterdir())
    r = rows(run)
    assert [x["step"] for x in r] == list(range(1, 7))
    assert {"step", "loss", "nll", "bpd", "lr", "grad_norm", "skipped", "images_per_s"} <= set(r[0])
    bpd = json.loads((run / "bpd.json").read_text())
    assert bpd["images"] == 32 and bpd["split"] == "test" and 0 < bpd["bpd"] < 20 and summary["bpd"] == bpd["bpd"]
    ckpt = load_checkpoint(run / "ckpt-0000006.pt")
    assert ckpt["step"] == 6 and ckpt["config"]["model"]["patch_size"] == 7 and len(ckpt["rng"]) == 1
    # --init-from takes the weights only: a new run at step 0 that starts from them.
    train(tiny(data, "train.steps=1", "train.eval_bpd=false", "train.sample_every=0"), tmp_path / "init",
          init_from=str(run), device="cpu")
    assert load_checkpoint(tmp_path / "init" / "ckpt-0000001.pt")["step"] == 1


def test_refuses_a_used_folder(data, tmp_path):
    cfg = tiny(data, "train.steps=1", "train.eval_bpd=false", "train.sample_every=0")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds files.*--overwrite"):
        train(cfg, tmp_path, device="cpu")
    train(cfg, tmp_path, overwrite=True, device="cpu")
    with pytest.raises(ValueError, match="already holds a training run.*--resume"):
        train(cfg, tmp_path, device="cpu")
    assert (tmp_path / "notes.txt").read_text() == "mine"  # --overwrite removes only what a run writes
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        train(cfg, tmp_path / "nothing", resume=True, device="cpu")


def test_a_run_that_cannot_start_leaves_nothing_behind(data, tmp_path):
    """A bad dataset fails before the run folder exists, and --overwrite has then removed nothing."""
    bad = tiny(data, "data.name=npz", "data.path=" + str(tmp_path / "no-such.npz"))
    with pytest.raises(FileNotFoundError):
        train(bad, tmp_path / "new", device="cpu")
    assert not (tmp_path / "new").exists()
    run = tmp_path / "run"
    train(tiny(data, "train.steps=1", "train.eval_bpd=false", "train.sample_every=0"), run, device="cpu")
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(FileNotFoundError):
        train(bad, run, overwrite=True, device="cpu")
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("pin", ["train.eval_weights", "align.encoder_weights"])
def test_a_missing_pinned_file_is_an_error_before_anything_is_written(data, tmp_path, pin):
    """Issue #33 item 2: a mistyped pin names the file; no evaluator (or encoder) is trained in its place."""
    missing = tmp_path / "no" / "such.safetensors"
    cfg = tiny(data, "train.eval_every=2", "align.enabled=true", "align.positions=[[2, 1]]", f"{pin}={missing}")
    with pytest.raises(FileNotFoundError, match=f"{pin}={missing} does not exist"):
        train(cfg, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists() and not (tmp_path / "no").exists()


class NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_non_finite_steps_are_skipped(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = Objective.forward

    def faulty(self, *args, **kwargs):
        loss, logs = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            return NaNGrad.apply(loss), logs  # step 3: NaN gradient
        if calls["n"] == 5:
            return loss * float("inf"), logs  # step 5: infinite loss
        return loss, logs

    monkeypatch.setattr(Objective, "forward", faulty)
    train(tiny(data, "train.eval_bpd=false"), tmp_path, device="cpu")
    assert [r["skipped"] for r in rows(tmp_path)] == [0, 0, 1, 1, 2, 2]
    ckpt = load_checkpoint(tmp_path / "ckpt-0000006.pt")
    assert ckpt["skipped"] == 2
    assert all(torch.isfinite(v).all() for v in [*ckpt["model"].values(), *ckpt["ema"].values()])
    assert int(ckpt["optimizer"]["state"][0]["step"]) == 4  # only the 4 finite steps reached AdamW


@pytest.mark.parametrize("limit,stops", [(0.5, True), (1.0, False)])
def test_a_diverged_run_stops_with_an_error_and_keeps_its_last_checkpoint(data, tmp_path, capsys, monkeypatch,
                                                                         limit, stops):
    """Issue #33 item 3: from step 5 on every loss is infinite; more than half of the run's 20 steps are skipped by
    step 15, where it stops (exit 2) without a checkpoint or weights of that state."""
    calls = {"n": 0}
    forward = Objective.forward

    def diverging(self, *args, **kwargs):
        loss, logs = forward(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("inf") if calls["n"] >= 5 else loss), logs

    monkeypatch.setattr(Objective, "forward", diverging)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(tiny(data, "train.steps=20", "train.ckpt_every=2", "train.sample_every=0", "train.eval_bpd=false",
                        f"train.max_skipped_fraction={limit}").to_yaml())
    run = tmp_path / "run"
    code = 0
    try:
        cli.main(["train", "--config", str(cfg), "--out", str(run)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    if not stops:  # 1 = never: the run ends as before, its skipped steps counted
        assert code == 0 and rows(run)[-1]["skipped"] == 16 and (run / "ema.safetensors").is_file()
        return
    line = [x for x in err.splitlines() if x.startswith("rrepa train: error:")]
    assert code == 2 and len(line) == 1 and "Traceback" not in err, err[-2000:]
    assert "training diverged at step 15: 11 of the last 15 steps" in line[0]
    assert f"{run / 'ckpt-0000014.pt'}, is kept" in line[0] and "lower optim.lr" in line[0]
    assert list_checkpoints(run)[-1].name == "ckpt-0000014.pt"
    assert not (run / "ema.safetensors").exists() and not (run / ".lock").exists()
    with pytest.raises(ValueError, match="max_skipped_fraction must lie in"):
        tiny(data, "train.max_skipped_fraction=0").validate()


def test_global_batch_sampler_shards_one_order():
    one = GlobalBatchSampler(40, 8, seed=3, d=Dist())
    halves = [GlobalBatchSampler(40, 8, seed=3, d=Dist(rank=r, world_size=2)) for r in (0, 1)]
    batches = list(one)
    assert len(batches) == 5 and sorted(sum(batches, [])) == list(range(40))
    for b, (h0, h1) in enumerate(zip(*halves)):
        assert h0 + h1 == batches[b]
    one.set_epoch(1)
    assert list(one) != batches
    one.set_epoch(0, start=3)
    assert list(one) == batches[3:]
    accum = GlobalBatchSampler(40, 8, seed=3, d=Dist(), grad_accum=2)
    assert [a + b for a, b in zip(*[iter(accum)] * 2)] == batches


def test_lr_schedule():
    f = [lr_factor(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(f[10:], f[11:]))


def test_wsd_schedule_is_constant_until_its_cooldown():
    f = [lr_factor(s, warmup=10, total=100, min_ratio=0.1, schedule="wsd", cooldown=0.2) for s in range(101)]
    assert f[9] == f[10] == f[79] == f[80] == 1.0  # stable from the warm-up's end to the cool-down's start (step 80)
    assert f[90] == pytest.approx(0.55) and f[100] == pytest.approx(0.1)  # linear to min_ratio at step total
    assert all(a >= b for a, b in zip(f[80:], f[81:]))
    with pytest.raises(ValueError, match="optim.schedule in cosine, wsd"):
        resolve("fmnist", overrides=["optim.schedule=linear"])


KILLER = killer("forward")  # one forward per step (no alignment, no samples, no bpd)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_after_sigkill_is_bitwise_exact(data, tmp_path, precision):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(tiny(data, "train.steps=10", "train.sample_every=0", "train.eval_bpd=false",
                        f"train.precision={precision}").to_yaml())
    ref = rrepa("train", "--config", str(cfg), "--out", str(tmp_path / "ref"))
    killed = rrepa("train", "--config", str(cfg), "--out", str(tmp_path / "run"), script=KILLER,
                   env={**ENV, "KILL_AT_CALL": "8"})  # dies inside step 8, after the checkpoint at step 6
    finish(killed, rc=-signal.SIGKILL)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("ckpt-*.pt")) == ["ckpt-0000003.pt", "ckpt-0000006.pt"]
    # A crash while writing the next checkpoint would leave a truncated file; resume skips it.
    save_checkpoint(run, load_checkpoint(run / "ckpt-0000006.pt") | {"step": 9})
    (run / "ckpt-0000009.pt").write_bytes(b"PK\x03\x04 truncated")
    out = finish(rrepa("train", "--resume", str(run)))
    assert "ckpt-0000009.pt is corrupt" in out and "resumed" in out and "at step 6" in out
    finish(ref)
    assert_same_state(run / "ckpt-0000010.pt", tmp_path / "ref" / "ckpt-0000010.pt")
    assert [r["step"] for r in rows(run)] == list(range(1, 11))  # the steps after the checkpoint, once
    assert [r["loss"] for r in rows(run)] == [r["loss"] for r in rows(tmp_path / "ref")]


SGD_TRAIN = """
import sys, torch
from rrepa import cli
from helpers import sgd
torch.optim.AdamW = sgd
cli.main(sys.argv[1:])
"""


def test_ddp_two_gloo_processes_match_one_process(data, tmp_path, monkeypatch):
    """The property DDP must have: each process takes its half of the same global batch and the gradients are
    averaged over processes, so both runs take the same steps. Without noise and label drop the loss is
    deterministic and the runs differ only in summation order. The optimiser is SGD: AdamW divides by
    sqrt(v), which turns a gradient of 1e-9 into a full step of lr whatever its sign, so the summation order of
    near-zero gradients moved some weights by lr on one CPU (AMD EPYC) and not on another."""
    cfg = tiny(data, "train.steps=3", "train.sample_every=0", "train.eval_bpd=false", "model.sigma=0",
               "train.label_drop=0", "optim.lr=0.5", "optim.warmup_steps=0", "optim.grad_clip=0")
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    (tmp_path / "sgd_train.py").write_text(SGD_TRAIN)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(tmp_path / "sgd_train.py"), "train", "--config", str(tmp_path / "cfg.yaml"), "--out",
                            str(tmp_path / "ddp"), "--device", "cpu"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    monkeypatch.setattr(torch.optim, "AdamW", sgd)
    train(cfg, tmp_path / "one", device="cpu")
    assert "2 process(es) x 1 x 4 images per step" in finish(two)  # each process takes half the batch
    a, b = load_checkpoint(tmp_path / "ddp" / "ckpt-0000003.pt"), load_checkpoint(tmp_path / "one" / "ckpt-0000003.pt")
    assert a["world_size"] == 2 and len(a["rng"]) == 2
    start = TARFlow(cfg.model).state_dict()
    moved = 0.0
    for name, value in b["model"].items():
        delta_one, delta_two = value - start[name], a["model"][name] - start[name]
        # The update itself, not the weights, is compared: a wrong shard or a sum instead of a mean changes it
        # by O(1) of its size, summation order by ~1e-8 here.
        torch.testing.assert_close(delta_two, delta_one, rtol=1e-4, atol=1e-6, msg=f"{name}: the updates differ")
        moved = max(moved, float(delta_one.abs().max()))
    assert moved > 1e-2  # the weights did change, so the comparison means something
    for r2, r1 in zip(rows(tmp_path / "ddp"), rows(tmp_path / "one")):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)  # gradients averaged, not summed


def test_ddp_evaluates_in_training_on_rank_0_alone(data, tmp_path):
    """Rank 0 evaluates (samples, FID, the classifiers and bits/dim of test images) while the other process waits in
    its next collective: a collective inside the evaluation (the bits/dim's all-reduce did) deadlocks the run. Two
    gloo processes evaluate twice and finish, and their evaluations equal one process's (fixed noise and inputs;
    the weights differ by summation order only, so the figures agree to a few digits)."""
    from rrepa.fmnist.evaluator import FMNISTCNN, save_evaluator

    torch.manual_seed(0)
    evaluator = save_evaluator(FMNISTCNN(), {"test_accuracy": 0.1}, tmp_path / "evaluator.safetensors")  # random
    cfg = tiny(data, "train.steps=4", "train.sample_every=2", "train.eval_every=2", "train.eval_samples=16",
               "train.eval_test_images=16", f"train.eval_weights={evaluator}", "train.eval_bpd=false",
               "model.sigma=0", "train.label_drop=0")
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "rrepa.cli", "train", "--config", str(tmp_path / "cfg.yaml"), "--out",
                            str(tmp_path / "ddp"), "--device", "cpu"], env={**ENV, "RREPA_CACHE_DIR": str(tmp_path)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = finish(two)  # a deadlock is a timeout here
    finally:
        kill_tree(two.pid)  # torchrun's workers too, which run in sessions of their own
    assert "2 process(es)" in out
    train(cfg, tmp_path / "one", device="cpu")
    evals = {name: [r for r in rows(tmp_path / name) if "eval_fid" in r] for name in ("ddp", "one")}
    assert [r["step"] for r in evals["ddp"]] == [r["step"] for r in evals["one"]] == [2, 4]
    for r2, r1 in zip(evals["ddp"], evals["one"]):
        for key in ("eval_fid", "eval_one_step_top1", "eval_bayes_top1", "eval_bpd"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-3, abs=1e-3), key


def test_activation_checkpointing_trains_the_same_steps(data, tmp_path):
    """train.activation_checkpointing recomputes the layers in the backward: the run takes the same steps, loss for
    loss (float32 on the CPU, deterministic kernels), and stores the setting."""
    base = ["train.steps=3", "train.sample_every=0", "train.eval_bpd=false"]
    train(tiny(data, *base), tmp_path / "plain", device="cpu")
    train(tiny(data, *base, "train.activation_checkpointing=true"), tmp_path / "ckpt", device="cpu")
    assert [r["loss"] for r in rows(tmp_path / "ckpt")] == [r["loss"] for r in rows(tmp_path / "plain")]
    assert load_checkpoint(tmp_path / "ckpt" / "ckpt-0000003.pt")["config"]["train"]["activation_checkpointing"]


def test_the_end_frees_the_optimiser_state_before_the_final_grid(data, tmp_path, monkeypatch):
    """After the last checkpoint AdamW's moments and the gradients are dropped, so the final grid's KV caches do not
    come on top of them (a full-size rehearsal overflowed 24 GB there); the checkpoint still holds the state."""
    made = []
    real = loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer", lambda *a: made.append(real(*a)) or made[-1])
    train(tiny(data, "train.steps=2", "train.sample_every=0", "train.eval_bpd=false"), tmp_path / "r", device="cpu")
    optimizer = made[0][0]
    assert not optimizer.state and all(p.grad is None for g in optimizer.param_groups for p in g["params"])
    assert load_checkpoint(tmp_path / "r" / "ckpt-0000002.pt")["optimizer"]["state"]


def test_sample_rows_zero_draws_no_grid(data, tmp_path, capsys):
    """train.sample_rows=0 (the full-size rehearsal's setting: its sample stages draw instead) writes no grid, at the
    sample steps nor at the end, and the final summary says so."""
    run = tmp_path / "r"
    train(tiny(data, "train.sample_rows=0", "train.eval_bpd=false"), run, device="cpu")
    assert not list(run.glob("samples/*.png"))
    assert "  samples      none (train.sample_rows=0)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="train.sample_rows must be >= 0"):
        tiny(data, "train.sample_rows=-1")


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_a_run_resumed_with_more_steps_follows_its_new_schedule_from_the_first_step(data, tmp_path, schedule):
    """`--resume RUN --set train.steps=N` (a finished run trained further): the checkpoint's AdamW holds the old
    schedule's lr for the next update, which resume replaces by the new schedule's, so every step after the
    checkpoint uses lr x lr_factor(step) of the N-step schedule."""
    cfg = tiny(data, f"optim.schedule={schedule}", "train.steps=8", "train.eval_bpd=false", "train.sample_every=0")
    train(cfg, tmp_path / "run", device="cpu")
    train(stored_config(tmp_path / "run", ["train.steps=16"]), tmp_path / "run", resume=True, device="cpu")
    lrs = {r["step"]: r["lr"] for r in rows(tmp_path / "run")}
    o = cfg.optim
    for step in range(9, 17):  # the row of step k logs the lr of update k, factor k - 1
        want = o.lr * lr_factor(step - 1, o.warmup_steps, 16, o.min_lr_ratio, schedule, o.cooldown_fraction)
        assert lrs[step] == pytest.approx(want, rel=1e-12), step
