"""The arguments several commands share (rrepa.cli.options) are spelled, defaulted and read alike everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rrepa.cli import build_parser
from rrepa.cli.options import output_path

# A command line each (the required arguments only) for every command that reads a dataset folder.
DATA_COMMANDS = [
    ["train", "--preset", "fmnist"],
    ["bpd", "--ckpt", "run"],
    ["classify", "--ckpt", "run"],
    ["probe", "--ckpt", "run"],
    ["evaluate", "--samples", "s.npz", "--ref", "fmnist:test"],
    ["evaluator", "train"],
    ["encoder", "train"],
    ["encoder", "probe", "enc.safetensors"],
    ["vae", "train"],
    ["vae", "eval"],
    ["latents", "encode", "--vae", "v", "--data", "fmnist", "--out", "o"],
]
# `rrepa evaluator train` and `rrepa encoder probe` have no --device: they run on the CPU.
DEVICE_COMMANDS = [*(a for a in DATA_COMMANDS if a[:2] not in (["evaluator", "train"], ["encoder", "probe"])),
                   ["sample", "--ckpt", "run"]]


@pytest.mark.parametrize("argv", DATA_COMMANDS, ids=lambda a: " ".join(a[:2]))
@pytest.mark.parametrize("flag", ["--data-dir", "--data-path"])
def test_data_dir_has_one_name_and_its_old_spelling(argv, flag):
    assert build_parser().parse_args([*argv, flag, "/data"]).data_dir == "/data"
    assert build_parser().parse_args(argv).data_dir is None


@pytest.mark.parametrize("argv", DEVICE_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_device_defaults_to_auto(argv):
    assert build_parser().parse_args(argv).device == "auto"
    assert build_parser().parse_args([*argv, "--device", "cpu"]).device == "cpu"


def test_every_device_option_is_the_shared_one():
    """No command defines --device or a data folder its own way (a new one would drift from the others)."""
    def walk(parser, words):
        for a in parser._actions:
            if a.__class__.__name__ == "_SubParsersAction":
                for name, sub in a.choices.items():
                    yield from walk(sub, [*words, name])
            elif "--device" in a.option_strings:
                yield words, "device", a.default, a.help
            elif "--data-dir" in a.option_strings or "--data-path" in a.option_strings:
                yield words, "data", tuple(a.option_strings), a.dest
    seen = list(walk(build_parser(), []))
    devices = [s for s in seen if s[1] == "device"]
    data = [s for s in seen if s[1] == "data"]
    assert len(devices) >= len(DEVICE_COMMANDS)
    assert {(d[2], d[3]) for d in devices} == {("auto", "auto (CUDA if available), cuda or cpu")}
    assert {(d[2], d[3]) for d in data} == {(("--data-dir", "--data-path"), "data_dir")}


@pytest.mark.parametrize("argv", [["encoder", "train"], ["vae", "train"], ["evaluator", "train"]],
                         ids=lambda a: a[0])
@pytest.mark.parametrize("flag", ["--overwrite", "--force"])
def test_trained_outputs_are_refused_unless_overwritten(argv, flag, tmp_path):
    existing = tmp_path / "weights"
    existing.write_text("old")
    args = build_parser().parse_args([*argv, "--out", str(existing)])
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        output_path(args, tmp_path / "default")
    assert output_path(build_parser().parse_args([*argv, "--out", str(existing), flag]), tmp_path / "x") == existing
    assert output_path(build_parser().parse_args(argv), tmp_path / "default") == tmp_path / "default"


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """`rrepa ARGV` in this process -> (exit code, stderr)."""
    from rrepa import cli

    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# Every command that writes a result into a run folder (or to a named file), and the file it would write.
RESULT_COMMANDS = [
    (["sample", "--ckpt", "{run}", "--format", "npz"], "{run}/samples-seed0.npz"),
    (["sample", "--ckpt", "{run}", "--out", "{tmp}/s"], "{tmp}/s.png"),
    (["bpd", "--ckpt", "{run}", "--json", "{tmp}/b.json"], "{tmp}/b.json"),
    (["evaluate", "--samples", "{tmp}/s.npz", "--ref", "fmnist:test", "--out", "{tmp}/e.json"], "{tmp}/e.json"),
    (["classify", "--ckpt", "{run}"], "{run}/classify-test/classify.json"),
    (["probe", "--ckpt", "{run}", "--pool", "max"], "{run}/probe/probe-max.json"),
]


@pytest.mark.parametrize("argv,result", RESULT_COMMANDS, ids=lambda a: " ".join(a[:3]) if isinstance(a, list) else "")
def test_a_result_file_is_never_replaced_silently(argv, result, tmp_path, capsys):
    """Issue #33 item 7: a second command refuses at once (before any work) instead of replacing the first one's
    result; --overwrite is the way to replace it (tests/test_faults.py runs that)."""
    run = tmp_path / "run"
    run.mkdir()
    fill = {"run": str(run), "tmp": str(tmp_path)}
    existing = Path(result.format(**fill))
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_text("the first result")
    code, err = run_cli(capsys, [a.format(**fill) for a in argv])
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    flag = "--json" if "--json" in argv else "--out"
    assert f"{existing} exists; pass --overwrite to replace it, or {flag} to write elsewhere" in lines[0]
    assert existing.read_text() == "the first result"


@pytest.mark.parametrize("argv,flag", [
    (["train", "--out", ""], "--out"),
    (["sample", "--ckpt", "run", "--out", ""], "--out"),
    (["bpd", "--ckpt", ""], "--ckpt"),
    (["train", "--resume", ""], "--resume"),
    (["evaluate", "--samples", "s.npz", "--ref", "fmnist:test", "--out", ""], "--out"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_an_empty_path_is_refused(argv, flag, capsys):
    """Issue #33 item 8: `--out ''` is not the current folder."""
    code, err = run_cli(capsys, argv)
    assert code == 2 and f"error: {flag} is empty; give a path" in err and "Traceback" not in err


def test_resume_with_another_out_is_refused(tmp_path, capsys):
    """Issue #33 item 18: --out beside --resume was ignored."""
    code, err = run_cli(capsys, ["train", "--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert code == 2 and "--out" in err and "would be ignored" in err and "--init-from" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv", [["train", "--out", "{tmp}/run"], ["sample", "--ckpt", "{tmp}/run"],
                                  ["bpd", "--ckpt", "{tmp}/run"], ["classify", "--ckpt", "{tmp}/run"]],
                         ids=lambda a: a[0])
@pytest.mark.parametrize("device,expected", [
    ("tpu", "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    pytest.param("cuda", "--device cuda was asked for but CUDA is not available on this machine; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_an_unusable_device_is_one_line(argv, device, expected, tmp_path, capsys):
    """Issue #33 item 17: --device tpu ran on the CPU, --device cuda without a GPU ended in a torch traceback."""
    code, err = run_cli(capsys, [a.format(tmp=tmp_path) for a in argv] + ["--device", device])
    assert code == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,expected", [
    (["bpd", "--ckpt", "run", "--batch-size", "0"], "need --batch-size >= 1 and --max-images >= 1"),  # item 15
    (["bpd", "--ckpt", "run", "--max-images", "0"], "got 500 and 0"),
    (["bpd", "--ckpt", "run", "--max-images", "-5"], "got 500 and -5"),
    (["vae", "eval", "--limit", "-5"], "need --limit >= 1 (or none: all test images) and --fid-images >= 0"),
    (["vae", "eval", "--fid-images", "-1"], "got None and -1"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_counts_out_of_range_are_refused(argv, expected, capsys):
    """Issue #33 items 15 and 18: no "range() arg 3 must not be zero", no NaN with exit 0, no 9,995 images."""
    code, err = run_cli(capsys, argv)
    assert code == 2 and expected in err and "Traceback" not in err
