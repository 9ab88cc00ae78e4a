"""Faults and bad input, as a new user meets them (issue #13): a wrong --data-dir, too few samples, Ctrl-C and
SIGTERM, a full disk, read-only outputs, two trainings into one folder, misleading messages, the likelihood
protocol. Signals and concurrent runs use real processes; full and read-only disks are simulated at the write."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ENV, finish, rows, tiny, write_fake_fmnist
from rrepa import cli, utils
from rrepa.data.datasets import DataConfig, build_dataset
from rrepa.flow import checkpoint
from rrepa.flow.checkpoint import checkpoint_name, list_checkpoints, load_checkpoint, save_checkpoint
from rrepa.fmnist.dataset import find_fashion_mnist
from rrepa.training.loop import train
from rrepa.training.objective import Objective

QUICK = ("train.sample_every=0", "train.eval_bpd=false")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_fmnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A finished tiny run (with bpd.json) to sample from, evaluate and convert."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny(data, "train.steps=3", "train.sample_every=0"), run, device="cpu")
    return run


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`rrepa ARGV` in this process -> (exit code, stdout, stderr)."""
    code = 0
    try:
        cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str, command: str) -> str:
    """The single `rrepa COMMAND: error: ...` line of stderr (and no traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"rrepa {command}: error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def spawn(*args: str) -> subprocess.Popen:
    """`rrepa ARGS` in a new session (its own process group, as a shell job gets)."""
    return subprocess.Popen([sys.executable, "-c", "from rrepa import cli; cli.main()", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until `path` holds n complete lines (the run has logged n steps)."""
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text().count("\n") >= n):
        if proc.poll() is not None:
            pytest.fail(f"the run ended early:\n{proc.communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not reach {n} lines")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# 1. A --data-dir the user gave is used or refused
# --------------------------------------------------------------------------------------------


def test_a_wrong_data_dir_is_an_error_not_a_fallback(tmp_path, capsys):
    pngs = tmp_path / "pngs" / "cats"
    pngs.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(pngs / "a.png")
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "x.npz", data=np.zeros((1, 12), np.uint8))
    cases = {tmp_path / "nonexistent": "does not exist", tmp_path / "empty": "is an empty folder",
             tmp_path / "pngs": "set data.name=folder", tmp_path / "x.npz": "set data.name=npz"}
    for path, expected in cases.items():
        with pytest.raises(FileNotFoundError, match=re.escape(expected)):
            find_fashion_mnist(path)
        out = tmp_path / f"run-{path.name}"
        code, _, err = run_cli(capsys, "train", "--data-dir", str(path), "--out", str(out), "--set", "train.steps=1")
        line = one_error_line(err, "train")
        assert code == 2 and str(path) in line and expected in line
        assert not out.exists()  # refused before the run folder was made
    # The explicit folder is the one read, even where the system has Fashion-MNIST too.
    mine = write_fake_fmnist(tmp_path / "mine", 6, 4)
    assert len(build_dataset(DataConfig(path=str(mine)), "train")) == 6


# --------------------------------------------------------------------------------------------
# 3. Too few samples are refused before any feature network is built (or trained)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 3])
def test_evaluate_refuses_too_few_samples_at_once(tmp_path, capsys, monkeypatch, n):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the feature network was built for an unusable sample file")

    monkeypatch.setattr(cli.evaluate, "build_feature_network", must_not_run)
    path = tmp_path / "s.npz"
    np.savez(path, arr_0=np.zeros((n, 28, 28, 1), np.uint8))
    code, _, err = run_cli(capsys, "evaluate", "--samples", str(path), "--ref", "fmnist:test")
    line = one_error_line(err, "evaluate")
    assert code == 2 and f"holds {n} samples" in line and "at least 4" in line  # --k 3: 4 for precision / recall
    code, _, err = run_cli(capsys, "evaluate", "--ckpt", str(tmp_path), "--num-samples", "3", "--ref", "fmnist:test")
    assert code == 2 and "N >= 4" in one_error_line(err, "evaluate")


# --------------------------------------------------------------------------------------------
# 4. Ctrl-C / SIGTERM during training: a checkpoint at the step, one line, exit 128 + signal
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig,workers", [(signal.SIGINT, 0), (signal.SIGTERM, 1)])
def test_a_signal_saves_the_step_and_says_how_to_resume(data, tmp_path, sig, workers):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(tiny(data, "train.steps=1000000", "train.ckpt_every=1000000", f"train.num_workers={workers}",
                        *QUICK).to_yaml())
    run = tmp_path / "run"
    p = spawn("train", "--config", str(cfg), "--out", str(run))
    wait_for_lines(run / "metrics.jsonl", 3, p)
    os.killpg(p.pid, sig)  # the whole process group, as Ctrl-C in a terminal (and DataLoader workers with it)
    out = finish(p, rc=128 + sig)
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(rf"interrupted at step (\d+); resume with --resume {re.escape(str(run))}", last)
    assert m, out[-2000:]
    n = int(m.group(1))
    assert n >= 3 and [p.name for p in list_checkpoints(run)] == [checkpoint_name(n)]
    assert load_checkpoint(run / checkpoint_name(n))["step"] == n
    assert not (run / ".lock").exists()
    finish(subprocess.Popen([sys.executable, "-c", "from rrepa import cli; cli.main()", "train", "--resume", str(run),
                             "--set", f"train.steps={n + 2}"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True))
    assert [r["step"] for r in rows(run)] == list(range(1, n + 3))  # nothing lost, nothing twice


# --------------------------------------------------------------------------------------------
# 5. A full disk while writing a checkpoint: one line naming the file, the cause and the intact checkpoint
# --------------------------------------------------------------------------------------------


def train_until_it_fails(data, tmp_path, capsys) -> tuple[Path, str]:
    """`rrepa train` of the quick tiny config into tmp_path/run, which must fail with exit 2: (the run folder, the
    one error line)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(tiny(data, *QUICK).to_yaml())
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--config", str(cfg), "--out", str(run))
    line = one_error_line(err, "train")
    assert code == 2
    return run, line


def test_a_full_disk_while_checkpointing(data, tmp_path, capsys, monkeypatch):
    real = checkpoint.torch_save

    def disk_full_at_step_6(obj, path):
        if obj["step"] == 6:
            Path(path).write_bytes(b"PK\x03\x04 the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, path)

    monkeypatch.setattr(checkpoint, "torch_save", disk_full_at_step_6)
    run, line = train_until_it_fails(data, tmp_path, capsys)
    for part in (str(run / "ckpt-0000006.pt"), "No space left on device", f"{run / 'ckpt-0000003.pt'} (step 3) is "
                 f"intact", f"--resume {run}"):
        assert part in line, line
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-0000003.pt"]
    assert (run / "last").read_text().strip() == "ckpt-0000003.pt"
    assert not list(run.glob(".*.tmp")) and not (run / ".lock").exists()


@pytest.mark.parametrize("fails,cause,expected,unexpected", [
    # A full disk before the first checkpoint: nothing to --resume from (issue #33 item 4).
    ("ckpt", errno.ENOSPC, ["ckpt-0000003.pt: No space left on device", "no earlier checkpoint exists",
                            "start the run again with --overwrite"], ["--resume"]),
    # An immutable `last` pointer: the pointer is named, not the complete checkpoint (issue #33 item 5).
    ("last", errno.EPERM, ["checkpoint pointer {run}/last: Operation not permitted",
                           "{run}/ckpt-0000003.pt is complete", "--resume {run}"], ["could not write checkpoint"]),
])
def test_a_failed_first_checkpoint_says_what_will_work(data, tmp_path, capsys, monkeypatch, fails, cause, expected,
                                                       unexpected):
    real = checkpoint.atomic_write

    def failing(path, write):
        if Path(path).name.startswith(fails):
            raise OSError(cause, os.strerror(cause), str(path))
        real(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write", failing)
    run, line = train_until_it_fails(data, tmp_path, capsys)
    for part in expected:
        assert part.format(run=run) in line, line
    for part in unexpected:
        assert part not in line, line


def test_the_real_writer_reports_the_os_error_not_unexpected_pos(tmp_path):
    """PyTorch turns a failed write into "unexpected pos A vs B"; a file-size limit makes the kernel fail it
    (EFBIG, as a full disk gives ENOSPC) and the error must name the file and the cause."""
    script = """
import resource, signal, sys, torch
from rrepa.flow.checkpoint import save_checkpoint
state = {"model": {"w": torch.zeros(200_000)}, "ema": {}, "optimizer": {}, "scheduler": {}, "step": 1, "config": {}}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    save_checkpoint(sys.argv[1], state)
except OSError as err:
    print(type(err).__name__, err.errno, err)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.startswith(f"CheckpointWriteError {errno.EFBIG} "), done.stdout + done.stderr[-2000:]
    assert str(tmp_path / "ckpt-0000001.pt") in done.stdout and "File too large" in done.stdout
    assert "unexpected pos" not in done.stdout and "no earlier checkpoint exists" in done.stdout
    assert not list(tmp_path.iterdir())  # the temporary file is gone


# --------------------------------------------------------------------------------------------
# 6. Unwritable outputs: every OSError becomes one line with the path and the cause
# --------------------------------------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """A folder where creating files fails with EROFS, as on a read-only mount."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mkstemp, mkdir, os_open = utils.tempfile.mkstemp, Path.mkdir, os.open

    def inside(path) -> bool:
        return str(path).startswith(str(ro))

    def fail(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(utils.tempfile, "mkstemp",
                        lambda suffix=None, prefix=None, dir=None, text=False: fail(f"{dir}/{prefix}x{suffix}")
                        if inside(dir) else mkstemp(suffix, prefix, dir, text))
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: fail(self) if inside(self) else mkdir(self, *a, **k))
    monkeypatch.setattr(utils.os, "open",
                        lambda path, flags, mode=0o777: fail(path) if inside(path) else os_open(path, flags, mode))
    return ro


def test_unwritable_outputs_are_one_line_errors(trained, data, read_only, capsys):
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(trained), "--num-samples", "2", "--batch-size", "2",
                           "--out", str(read_only / "s"))
    line = one_error_line(err, "sample")
    assert code == 2 and f"{read_only / 's.npz'}: Read-only file system" in line  # the file asked for, not a temp
    code, _, err = run_cli(capsys, "train", "--out", str(read_only / "run"), "--data-dir", str(data))
    line = one_error_line(err, "train")
    assert code == 2 and "Read-only file system" in line and str(read_only / "run") in line
    code, _, err = run_cli(capsys, "bpd", "--ckpt", str(trained), "--max-images", "2", "--json",
                           str(read_only / "bpd.json"))
    assert code == 2 and f"{read_only / 'bpd.json'}: Read-only file system" in one_error_line(err, "bpd")


@pytest.mark.parametrize("argv", [["sample", "--ckpt", "{run}", "--num-samples", "2", "--out", "{file}/s"],
                                  ["export", "--ckpt", "{run}", "--out", "{file}/exported"]], ids=lambda a: a[0])
def test_an_output_under_a_regular_file_is_not_a_directory(trained, tmp_path, capsys, argv):
    """Issue #33 item 9: "File exists" named the wrong cause; the same for every writer (convert, vae train)."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    code, _, err = run_cli(capsys, *(a.format(run=trained, file=blocker) for a in argv))
    line = one_error_line(err, argv[0])
    assert code == 2 and f"{blocker}: Not a directory (it is a file" in line and "File exists" not in line
    with pytest.raises(NotADirectoryError, match="Not a directory"):
        utils.atomic_write(blocker / "deeper" / "x.json", lambda tmp: Path(tmp).write_text("{}"))
    assert blocker.read_text() == "a file, not a folder"


def test_any_os_error_of_a_command_is_one_line(capsys, monkeypatch):
    def denied(args):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), "/immutable/folder/x")

    monkeypatch.setattr(cli.presets, "cmd_presets", denied)
    code, _, err = run_cli(capsys, "presets")
    assert code == 2 and "/immutable/folder/x: Operation not permitted" in one_error_line(err, "presets")


# --------------------------------------------------------------------------------------------
# 7. One writer per run folder
# --------------------------------------------------------------------------------------------


def test_two_trainings_into_one_folder(data, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(tiny(data, "train.steps=1000000", "train.ckpt_every=5", *QUICK).to_yaml())
    run = tmp_path / "run"
    first = spawn("train", "--config", str(cfg), "--out", str(run))
    try:
        wait_for_lines(run / "metrics.jsonl", 6, first)
        out = finish(spawn("train", "--config", str(cfg), "--out", str(run)), rc=2)
        assert f"is in use by process {first.pid}" in out and "Traceback" not in out
    finally:
        first.kill()
        first.communicate()
    assert (run / ".lock").read_text().startswith(f"{first.pid}@")  # stale: its holder was killed
    # the newest file on disk, even when the kill landed between its rename and the `last` pointer's update
    n = int(list_checkpoints(run)[-1].stem.split("-")[1])
    out = finish(spawn("train", "--resume", str(run), "--set", f"train.steps={n + 1}"))
    assert f"left by process {first.pid}@" in out and f"resumed {run / checkpoint_name(n)}" in out
    steps = [r["step"] for r in rows(run)]
    assert steps == list(range(1, n + 2))  # one writer: no doubled lines
    assert not (run / ".lock").exists()


# --------------------------------------------------------------------------------------------
# 8. Messages that say what is wrong
# --------------------------------------------------------------------------------------------


def test_messages_for_corrupt_checkpoints_convert_and_resume(trained, tmp_path, capsys):
    bad = tmp_path / "ckpt-0000001.pt"
    bad.write_bytes(b"\x80\x02 not a pickle of tensors")
    with pytest.raises(ValueError, match="corrupt") as e:
        load_checkpoint(bad)
    assert "weights_only" not in str(e.value)  # PyTorch's advice to load untrusted pickles is not ours to give
    ckpt = list_checkpoints(trained)[-1]
    code, _, err = run_cli(capsys, "convert", str(ckpt), str(tmp_path / "out.safetensors"))
    assert code == 2 and "already an rrepa training checkpoint" in one_error_line(err, "convert")
    code, _, err = run_cli(capsys, "convert", str(trained / "ema.safetensors"), str(tmp_path / "out.safetensors"))
    assert code == 2 and "already holds rrepa-layout weights" in one_error_line(err, "convert")
    assert not (tmp_path / "out.safetensors").exists()
    code, _, err = run_cli(capsys, "train", "--resume", str(ckpt))
    line = one_error_line(err, "train")
    assert code == 2 and "--resume takes a run folder" in line and f"its run folder is {trained}" in line
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path))
    assert code == 2 and "not a run folder of `rrepa train`" in one_error_line(err, "train")


def test_a_second_sample_or_a_finished_resume_replaces_nothing(trained, tmp_path, capsys):
    """Issue #33 items 7 and 8: the README's two `rrepa sample` lines no longer overwrite one another; --overwrite
    does; `train --resume` of a finished run says it is finished (and rewrites nothing); an empty run folder is
    refused by the library too."""
    out = str(tmp_path / "s")
    args = ["sample", "--ckpt", str(trained), "--num-samples", "2", "--batch-size", "2", "--format", "npz"]
    assert run_cli(capsys, *args, "--out", out)[0] == 0
    first = (tmp_path / "s.npz").read_bytes()
    code, _, err = run_cli(capsys, *args, "--out", out, "--sampler", "jacobi", "--seed", "1")
    assert code == 2 and "s.npz exists; pass --overwrite" in one_error_line(err, "sample")
    assert (tmp_path / "s.npz").read_bytes() == first
    assert run_cli(capsys, *args, "--out", out, "--seed", "1", "--overwrite")[0] == 0
    assert (tmp_path / "s.npz").read_bytes() != first
    finals = {name: (trained / name).stat().st_mtime_ns for name in ("ema.safetensors", "bpd.json", "loss.png")}
    code, _, err = run_cli(capsys, "train", "--resume", str(trained))
    line = one_error_line(err, "train")
    assert code == 2 and f"{trained} is finished" in line and "--set train.steps=N with N > 3" in line
    assert finals == {name: (trained / name).stat().st_mtime_ns for name in finals}
    with pytest.raises(ValueError, match="the run folder is empty"):
        train(tiny(trained.parent, *QUICK), "", device="cpu")


def test_sampler_and_weights_options_the_model_cannot_honour(trained, capsys):
    """Issue #33 item 18: --sequential-blocks beyond the model's blocks and --weights raw of an EMA-only file were
    accepted (the second silently ignored)."""
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(trained), "--sampler", "jacobi", "--sequential-blocks", "9",
                           "--num-samples", "2")
    assert code == 2 and "--sequential-blocks must lie in 0..2 for this 2-block model, got 9" in one_error_line(
        err, "sample")
    code, _, err = run_cli(capsys, "bpd", "--ckpt", str(trained / "ema.safetensors"), "--weights", "raw")
    assert code == 2 and "holds only the EMA weights, so --weights raw cannot be read" in one_error_line(err, "bpd")
    assert not list(trained.glob("samples-seed*"))


@pytest.mark.parametrize("case", ["partial fmnist", "text samples", "mismatched samples", "empty config"])
def test_messages_that_name_the_actual_fault(case, data, trained, tmp_path, capsys):
    """Issue #33 items 10, 11, 12, 19: a folder with some of the IDX files names the missing ones; a text file given as
    samples is "not an npz" (not numpy's advice to unpickle it); samples of another shape than the reference are
    refused (not an FID of 477); an empty config.yaml is said to be empty."""
    if case == "partial fmnist":
        part = tmp_path / "part"
        part.mkdir()
        for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
            (part / name).write_bytes((data / name).read_bytes())
        code, _, err = run_cli(capsys, "train", "--data-dir", str(part), "--out", str(tmp_path / "run"))
        line = one_error_line(err, "train")
        assert "holds 2 of Fashion-MNIST's 4 IDX files but not t10k-images-idx3-ubyte[.gz], t10k-labels-idx1" in line
    elif case == "mismatched samples":
        np.savez(tmp_path / "s.npz", arr_0=np.zeros((10, 32, 32, 3), np.uint8))
        code, _, err = run_cli(capsys, "evaluate", "--samples", str(tmp_path / "s.npz"), "--ref", "fmnist:test")
        assert "the samples are 3 x 32 x 32 images but --ref fmnist:test holds 1 x 28 x 28" in one_error_line(
            err, "evaluate")
    elif case == "text samples":
        (tmp_path / "s.npz").write_text("these are not samples\n")
        code, _, err = run_cli(capsys, "evaluate", "--samples", str(tmp_path / "s.npz"), "--ref", "fmnist:test")
        line = one_error_line(err, "evaluate")
        assert "is not an .npz archive" in line and "allow_pickle" not in line
    else:
        run = tmp_path / "run"
        run.mkdir()
        for p in trained.glob("ckpt-*.pt"):
            (run / p.name).write_bytes(p.read_bytes())
        (run / "config.yaml").write_text("")
        code, _, err = run_cli(capsys, "train", "--resume", str(run))
        line = one_error_line(err, "train")
        assert f"{run / 'config.yaml'} is empty" in line and "image_size" not in line
    assert code == 2


# --------------------------------------------------------------------------------------------
# 12. The likelihood protocol
# --------------------------------------------------------------------------------------------


def test_dequantized_training_inputs(data, tmp_path, monkeypatch):
    seen = []
    forward = Objective.forward

    def spy(self, x, *args, **kwargs):
        seen.append(x.detach().clone())
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(Objective, "forward", spy)
    for dequantize in (False, True):
        seen.clear()
        train(tiny(data, "train.steps=1", "model.sigma=0", f"train.dequantize={str(dequantize).lower()}", *QUICK),
              tmp_path / str(dequantize), device="cpu")
        levels = (seen[0] + 1) * 127.5
        if not dequantize:  # the 8-bit levels themselves
            assert torch.allclose(levels, levels.round(), atol=1e-3)
        else:  # each value spread uniformly over its level's bin [k / 128 - 1, (k + 1) / 128 - 1)
            v = (seen[0] + 1) * 128
            frac = v - v.floor()
            assert v.min() >= 0 and v.max() < 256 and 0.45 < float(frac.mean()) < 0.55 and float(frac.std()) > 0.25


def test_bpd_is_unconditional_by_default_and_names_its_protocol(trained, capsys):
    stored = json.loads((trained / "bpd.json").read_text())
    assert stored["protocol"] == "uniform dequantization, null label" and stored["sigma"] == 0.05
    assert stored["protocol_conditional"] == "uniform dequantization, true label"
    assert stored["bpd_conditional"] != stored["bpd"] and stored["train_dequantize"] is False
    results = {}
    for flags in ((), ("--unconditional",), ("--conditional",)):
        code, out, _ = run_cli(capsys, "bpd", "--ckpt", str(trained), "--batch-size", "16", *flags)  # as in training
        assert code == 0
        results[flags] = json.loads(out.strip().splitlines()[-1])
    default, conditional = results[()], results[("--conditional",)]
    assert default["protocol"] == "uniform dequantization, null label" and default["conditional"] is False
    assert default["sigma"] == 0.05 and default["bpd"] == pytest.approx(stored["bpd"])
    assert results[("--unconditional",)]["bpd"] == default["bpd"]
    assert conditional["protocol"] == "uniform dequantization, true label" and conditional["conditional"] is True
    assert conditional["bpd"] == pytest.approx(stored["bpd_conditional"])
    code, _, err = run_cli(capsys, "bpd", "--ckpt", str(trained), "--conditional", "--unconditional")
    assert code == 2 and "not both" in one_error_line(err, "bpd")


def test_save_checkpoint_helper_still_round_trips(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "ema": {}, "optimizer": {}, "scheduler": {}, "step": 4, "config": {}}
    path = save_checkpoint(tmp_path, state)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(3.0))
