"""Training checkpoints: the `last` pointer, keep-last-k, corrupt files."""

import pytest
import torch

from rrepa.flow.checkpoint import list_checkpoints, load_checkpoint, load_latest_checkpoint, save_checkpoint
from rrepa.flow.config import FlowConfig
from rrepa.flow.tarflow import TARFlow

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


def test_a_lagging_pointer_loses_nothing(tmp_path):
    """A kill between a checkpoint's rename and the pointer's update leaves `last` naming the older file; loading
    still takes the newest complete one."""
    save_checkpoint(tmp_path, state(1))
    pointer = (tmp_path / "last").read_text()
    save_checkpoint(tmp_path, state(2))
    (tmp_path / "last").write_text(pointer)
    path, s = load_latest_checkpoint(tmp_path)
    assert path.name == "ckpt-0000002.pt" and s["step"] == 2


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
