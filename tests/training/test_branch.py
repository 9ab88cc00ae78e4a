"""Branching a run (rrepa.training.branch): a longer run started at a shorter run's checkpoint ends bit for bit where
the longer run trained from step 0 ends, and a branch that would not is refused with the reason."""

import shutil

import pytest
import torch

from helpers import assert_same_state, rows, tiny
from rrepa import cli
from rrepa.training.branch import branch
from rrepa.training.loop import train
from rrepa.training.run import stored_config

# A wsd run of 8 steps holds its lr through step 6 (the cool-down starts there), one of 16 through step 12: their lrs
# agree up to step 6. The short one evaluates and draws grids on another cadence than the long one; neither moves the
# training state, which the bitwise comparison checks.
COMMON = ("optim.schedule=wsd", "train.eval_bpd=false", "train.keep_last=0", "train.eval_samples=16",
          "train.eval_test_images=16", "model.sigma=0")


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """(folder, short config, a maker of long configs); the short and the long run trained in folder."""
    from rrepa.fmnist.evaluator import FMNISTCNN, save_evaluator

    tmp = tmp_path_factory.mktemp("branch")
    torch.manual_seed(0)
    evaluator = save_evaluator(FMNISTCNN(), {"test_accuracy": 0.1}, tmp / "evaluator.safetensors")  # random

    def long(*extra):
        return tiny(data, *COMMON, f"train.eval_weights={evaluator}", "train.steps=16", "train.ckpt_every=4",
                    "train.sample_every=0", "train.eval_every=6", *extra)

    short = long("train.steps=8", "train.ckpt_every=3", "train.sample_every=3", "train.eval_every=3")
    train(short, tmp / "short", device="cpu")
    train(long(), tmp / "long", device="cpu")
    return tmp, short, long


def test_a_branch_ends_where_the_longer_run_ends(runs):
    tmp, _, long = runs
    assert branch(tmp / "short" / "ckpt-0000006.pt", long(), tmp / "branch") == 6
    # Its log reads as the long run's up to step 6: a training line every step, and the evaluation at step 6.
    assert [r["step"] for r in rows(tmp / "branch")] == [*range(1, 7), 6]
    assert not (tmp / "branch" / "samples").exists()  # the long run draws no grids (the short one did, at 3 and 6)
    train(stored_config(tmp / "branch"), tmp / "branch", resume=True, device="cpu")
    assert_same_state(tmp / "branch" / "ckpt-0000016.pt", tmp / "long" / "ckpt-0000016.pt")
    got, want = rows(tmp / "branch"), rows(tmp / "long")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r.get("loss") for r in got] == [r.get("loss") for r in want]
    fids = [r["eval_fid"] for r in got if "eval_fid" in r]
    assert len(fids) == 2 and fids == [r["eval_fid"] for r in want if "eval_fid" in r]  # step 6 copied, 12 computed


@pytest.mark.parametrize("source, change, match", [
    ("ckpt-0000008.pt", (), "learning rate of step 7 differs"),  # inside the short run's cool-down
    ("ckpt-0000006.pt", ("optim.lr=2e-3",), "optim.lr is 0.001 in the checkpoint's run and 0.002 here"),
    ("ckpt-0000006.pt", ("model.sigma=0.1",), "model.sigma is 0.0 in the checkpoint's run and 0.1 here"),
    ("ckpt-0000006.pt", ("train.steps=6",), "train.steps is 6, not beyond the checkpoint's step 6"),
    ("ckpt-0000006.pt", ("train.precision=bf16",), "train.precision is 'fp32' in the checkpoint's run"),
    ("ckpt-0000006.pt", ("train.eval_every=4",), "did not evaluate step 4; evaluate at multiples of 3"),
])
def test_a_branch_that_would_differ_is_refused(runs, source, change, match):
    tmp, _, long = runs
    target = tmp / "refused"
    with pytest.raises(ValueError, match=match):
        branch(tmp / "short" / source, long(*change), target)
    assert not target.exists()  # refused before anything is written


def test_the_command_line_branches_and_refuses_what_it_cannot(runs, capsys):
    tmp, _, long = runs
    config = tmp / "long.yaml"
    config.write_text(long("train.sample_every=3").to_yaml())  # grids do not move the state: the same end
    ckpt = str(tmp / "short" / "ckpt-0000006.pt")
    cli.main(["train", "--config", str(config), "--branch-from", ckpt, "--out", str(tmp / "cli"), "--device", "cpu"])
    assert f"branched {tmp / 'cli'} from {ckpt} at step 6" in capsys.readouterr().out
    assert_same_state(tmp / "cli" / "ckpt-0000016.pt", tmp / "long" / "ckpt-0000016.pt")
    grids = sorted(p.name for p in (tmp / "cli" / "samples").iterdir())
    assert grids[:3] == ["step-0000003.png", "step-0000006.png", "step-0000009.png"]  # 3 and 6 copied, 9 drawn
    for name in grids[:2]:
        assert (tmp / "cli" / "samples" / name).read_bytes() == (tmp / "short" / "samples" / name).read_bytes()
    for argv, message in (
            (["--resume", str(tmp / "cli")], "does not combine with --resume"),
            (["--out", str(tmp / "cli")], f"{tmp / 'cli'} is not empty; branch into a new folder")):
        with pytest.raises(SystemExit) as err:
            cli.main(["train", "--config", str(config), "--branch-from", ckpt, *argv, "--device", "cpu"])
        assert err.value.code == 2 and message in capsys.readouterr().err


def test_a_branch_that_fails_half_way_leaves_nothing(runs, monkeypatch):
    tmp, _, long = runs
    copy = shutil.copyfile

    def full_disk(src, dst):
        if str(src).endswith(".pt"):
            raise OSError(28, "No space left on device")
        return copy(src, dst)

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(OSError, match="No space left"):
        branch(tmp / "short" / "ckpt-0000006.pt", long("train.sample_every=3"), tmp / "full")
    assert not (tmp / "full").exists()  # config, log and grids were written before the checkpoint, and removed


def test_the_lr_of_the_step_after_the_checkpoint_must_agree_too(runs):
    """The checkpoint's AdamW holds the lr of the next update: at step 7 of the 8-step run (its cool-down's first
    step) a branch would take one step at the short run's lr, so it is refused though steps 0-6 agree."""
    tmp, _, long = runs
    train(long("train.steps=8", "train.ckpt_every=7", "train.eval_every=3", "train.sample_every=0"), tmp / "seven",
          device="cpu")
    with pytest.raises(ValueError, match="learning rate of step 7 differs"):
        branch(tmp / "seven" / "ckpt-0000007.pt", long(), tmp / "refused7")

