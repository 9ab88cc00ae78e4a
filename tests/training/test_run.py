"""Run folders: the one loader of trained models (load_run), the stored config of --resume, --init-from, and
the run lock."""

import os
from dataclasses import asdict

import pytest
import torch

from rrepa.flow.checkpoint import save_checkpoint, save_weights
from rrepa.flow.config import FlowConfig
from rrepa.flow.tarflow import TARFlow
from rrepa.flow.testing import random_flow
from rrepa.training.config import resolve
from rrepa.training.run import export_pretrained, init_weights, load_run, stored_config
from rrepa.utils import RunInUseError, run_lock

TINY = FlowConfig(in_channels=1, image_height=8, image_width=8, patch_size=4, width=16, head_dim=8,
                  num_blocks=2, layers_per_block=1, num_classes=3)


def state(step: int, model: TARFlow | None = None) -> dict:
    model = model or TARFlow(TINY)
    return {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": {}, "scheduler": {}, "step": step,
            "config": {"model": dict(TINY.__dict__), "data": {"name": "fmnist"}}}


def saved(run, step: int) -> TARFlow:
    """A checkpoint at `step` whose raw weights (returned) differ from its EMA ones (a fresh model)."""
    model = TARFlow(TINY)
    torch.nn.init.normal_(model.blocks[0].proj_out.weight)
    s = state(step, model)
    s["ema"] = TARFlow(TINY).state_dict()
    save_checkpoint(run, s)
    return model


def test_load_run_from_checkpoint_run_dir_and_safetensors(tmp_path):
    model = saved(tmp_path, 5)
    raw, info = load_run(tmp_path, weights="raw")
    assert info["step"] == 5 and torch.equal(raw.blocks[0].proj_out.weight, model.blocks[0].proj_out.weight)
    ema, _ = load_run(tmp_path / "ckpt-0000005.pt", weights="ema")
    assert not torch.equal(ema.blocks[0].proj_out.weight, model.blocks[0].proj_out.weight)
    save_weights(tmp_path / "w.safetensors", model)
    again, info = load_run(tmp_path / "w.safetensors")
    assert info["step"] is None and torch.equal(again.blocks[0].proj_out.weight, model.blocks[0].proj_out.weight)
    assert info["weights"] == "ema" and info["data"] is None  # no config.yaml beside the file


def test_load_run_prefers_the_newest_of_exports_and_checkpoints(tmp_path):
    raw, ema = random_flow(TINY, seed=1, dtype=torch.float32), random_flow(TINY, seed=2, dtype=torch.float32)
    run = tmp_path / "run"
    (run).mkdir()
    (run / "config.yaml").write_text("data:\n  name: fmnist\n  path: /somewhere\n")
    save_weights(run / "ema.safetensors", ema, {"step": "10", "weights": "ema"})
    save_weights(run / "model.safetensors", raw, {"step": "10", "weights": "raw"})
    key = "blocks.0.proj_out.weight"
    for weights, source in (("ema", ema), ("raw", raw)):
        model, info = load_run(run, weights)
        assert torch.equal(model.state_dict()[key], source.state_dict()[key])
        assert info["file"].endswith(f"{'ema' if weights == 'ema' else 'model'}.safetensors")
        assert info["step"] == 10 and info["data"]["path"] == "/somewhere"
    # a checkpoint newer than the export wins (the run went on after the export)
    newer = random_flow(TINY, seed=3, dtype=torch.float32)
    save_checkpoint(run, {"model": raw.state_dict(), "ema": newer.state_dict(), "optimizer": {}, "scheduler": {},
                          "step": 20, "config": {"model": asdict(TINY), "data": {"name": "fmnist"}}})
    model, info = load_run(run, "ema")
    assert torch.equal(model.state_dict()[key], newer.state_dict()[key]) and info["step"] == 20
    model, info = load_run(run / "ema.safetensors")
    assert torch.equal(model.state_dict()[key], ema.state_dict()[key])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither ema.safetensors"):
        load_run(tmp_path / "empty")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match="neither"):
        load_run(tmp_path / "w.txt")
    with pytest.raises(ValueError, match="weights"):
        load_run(run, "best")


@pytest.mark.parametrize("name, error, match", [
    ("missing", FileNotFoundError, "checkpoint .*missing does not exist"),
    ("weights.bin", ValueError, "neither a .safetensors file, a ckpt-\\*.pt file nor a run folder"),
    ("empty", FileNotFoundError, "holds neither ema.safetensors nor ckpt-\\*.pt"),
])
def test_load_run_errors_say_what_it_takes(tmp_path, name, error, match):
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(error, match=match):
        load_run(tmp_path / name)
    with pytest.raises(ValueError, match="'ema' or 'raw'"):
        load_run(tmp_path / "weights.bin", weights="best")


def test_load_run_reports_the_data_section(tmp_path):
    save_checkpoint(tmp_path, state(3))
    _, info = load_run(tmp_path, weights="raw")
    assert info["data"] == {"name": "fmnist"} and info["weights"] == "raw" and info["step"] == 3


def test_init_weights_takes_the_raw_weights(tmp_path):
    model = saved(tmp_path, 4)
    fresh, said = TARFlow(TINY), []
    init_weights(fresh, str(tmp_path), said.append)
    assert torch.equal(fresh.blocks[0].proj_out.weight, model.blocks[0].proj_out.weight)
    assert said == [f"initialised the weights from {tmp_path / 'ckpt-0000004.pt'}"]
    with pytest.raises(FileNotFoundError, match="--init-from .* does not exist"):
        init_weights(fresh, str(tmp_path / "nope"), said.append)


def test_stored_config_of_a_run_folder(tmp_path):
    cfg = resolve("fmnist", overrides=["train.steps=7"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    assert stored_config(tmp_path) == cfg
    assert stored_config(tmp_path, ["train.steps=9"]).train.steps == 9
    with pytest.raises(ValueError, match="takes a run folder .*not the file"):
        stored_config(tmp_path / "config.yaml")
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        stored_config(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="it has no config.yaml"):
        stored_config(tmp_path / "other")


def test_run_lock_refuses_a_second_holder_and_takes_over_a_stale_one(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        assert (run / ".lock").read_text().startswith(f"{os.getpid()}@")
        with pytest.raises(RunInUseError, match=f"in use by process {os.getpid()}"):
            with run_lock(run):
                pass
    assert not run.exists()  # made for the lock, left empty: removed
    run.mkdir()
    (run / ".lock").write_text("999999999@elsewhere\n")  # left by a killed process: nobody holds the flock
    notes = []
    with run_lock(run, warn=notes.append):
        pass
    assert len(notes) == 1 and "999999999@elsewhere" in notes[0] and "taking it over" in notes[0]
    assert run.is_dir() and not (run / ".lock").exists()


def test_save_and_from_pretrained_round_trip(tmp_path):
    cfg = FlowConfig(**{**TINY.to_dict(), "layers_per_block": (2, 1)})
    model = random_flow(cfg, seed=4, dtype=torch.float32)
    model.save_pretrained(tmp_path / "p")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "p").iterdir()}
    again = TARFlow.from_pretrained(tmp_path / "p")
    assert again.cfg == cfg and again.cfg.layers_per_block == (2, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_load_run_takes_a_pretrained_folder_and_export_writes_one(tmp_path):
    model = saved(tmp_path / "run", 6)
    cfg = resolve("fmnist", overrides=["data.path=/somewhere"])
    (tmp_path / "run" / "config.yaml").write_text(cfg.to_yaml())
    raw, _ = load_run(tmp_path / "run", weights="raw")
    out = export_pretrained(raw, tmp_path / "shared", cfg)
    loaded, info = load_run(out)
    assert torch.equal(loaded.blocks[0].proj_out.weight, model.blocks[0].proj_out.weight)
    assert info["data"]["path"] == "/somewhere" and info["step"] is None
    with pytest.raises(ValueError, match="already exists"):
        export_pretrained(raw, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "shared"]  # no temporary folder left behind


def test_a_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local path, and the hub is off"):
        load_run("someone/some-flow")


def test_rrepa_export_then_load_by_folder(tmp_path, capsys):
    from rrepa import cli

    model = saved(tmp_path / "run", 2)
    cli.main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "shared"), "--weights", "raw"])
    assert "wrote" in capsys.readouterr().out
    again = TARFlow.from_pretrained(tmp_path / "shared")
    assert torch.equal(again.blocks[0].proj_out.weight, model.blocks[0].proj_out.weight)
