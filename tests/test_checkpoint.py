"""Training checkpoints: atomic writes, the `last` pointer, keep-last-k, corrupt files, loading flows."""

import pytest
import torch

from rrepa.checkpoint import (
    atomic_write,
    list_checkpoints,
    load_checkpoint,
    load_flow,
    load_latest_checkpoint,
    save_checkpoint,
    save_weights,
)
from rrepa.flow import FlowConfig, TARFlow

TINY = FlowConfig(in_channels=1, image_height=8, image_width=8, patch_size=4, width=16, head_dim=8,
                  num_blocks=2, layers_per_block=1, num_classes=3)


def state(step: int, model: TARFlow | None = None) -> dict:
    model = model or TARFlow(TINY)
    return {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": {}, "scheduler": {}, "step": step,
            "config": {"model": dict(TINY.__dict__)}}


def test_keep_last_and_pointer(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, state(step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000030.pt", "ckpt-0000040.pt"]
    assert (tmp_path / "last").read_text().strip() == "ckpt-0000040.pt"
    assert not list(tmp_path.glob("*.tmp"))  # no temporary files left behind
    path, s = load_latest_checkpoint(tmp_path)
    assert path.name == "ckpt-0000040.pt" and s["step"] == 40


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old" and not list(tmp_path.glob("*.tmp"))


def test_corrupt_checkpoint_error_and_fallback(tmp_path):
    save_checkpoint(tmp_path, state(1))
    newest = save_checkpoint(tmp_path, state(2))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.raises(ValueError, match="ckpt-0000002.pt is corrupt or truncated"):
        load_checkpoint(newest)
    warnings = []
    path, s = load_latest_checkpoint(tmp_path, warn=warnings.append)
    assert path.name == "ckpt-0000001.pt" and s["step"] == 1
    assert len(warnings) == 1 and "ckpt-0000002.pt" in warnings[0]
    (tmp_path / "ckpt-0000001.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no loadable checkpoint"):
        load_latest_checkpoint(tmp_path, warn=warnings.append)


def test_not_a_checkpoint(tmp_path):
    torch.save({"step": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an rrepa training checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_latest_checkpoint(tmp_path / "empty")


def test_load_flow_from_checkpoint_run_dir_and_safetensors(tmp_path):
    model = TARFlow(TINY)
    torch.nn.init.normal_(model.blocks[0].proj_out.weight)
    s = state(5, model)
    s["ema"] = TARFlow(TINY).state_dict()
    save_checkpoint(tmp_path, s)
    raw, info = load_flow(tmp_path, weights="raw")
    assert info["step"] == 5 and torch.equal(raw.blocks[0].proj_out.weight, model.blocks[0].proj_out.weight)
    ema, _ = load_flow(tmp_path / "ckpt-0000005.pt", weights="ema")
    assert not torch.equal(ema.blocks[0].proj_out.weight, model.blocks[0].proj_out.weight)
    save_weights(tmp_path / "w.safetensors", model)
    again, info = load_flow(tmp_path / "w.safetensors")
    assert info["step"] is None and torch.equal(again.blocks[0].proj_out.weight, model.blocks[0].proj_out.weight)
