"""Run config: preset -> YAML -> --set, typed values, unknown keys with suggestions, round trips."""

import pytest
import torch
import yaml

from rrepa import cli
from rrepa.config import PRESETS, RunConfig, merge, preset_model, resolve, valid_keys
from rrepa.flow import FlowConfig, TARFlow


def test_preset_is_the_default_and_lists_only_what_differs():
    cfg = resolve()
    assert cfg.model == FlowConfig(in_channels=1, image_height=28, image_width=28, patch_size=4, width=128,
                                   num_blocks=4, layers_per_block=2, num_classes=10)
    assert cfg.data.name == "fmnist"
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.label_drop == 0.1
    # What a preset does not name keeps the defaults.
    assert resolve("imagenet64").optim.betas == RunConfig().optim.betas


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_complete_and_consistent(name):
    """One registry: each preset names every section, and its sections agree with each other (no section
    falls back on a default meant for another dataset, e.g. Fashion-MNIST data under an ImageNet model)."""
    assert set(PRESETS[name]) == {"model", "data", "optim", "train", "align"}
    cfg = resolve(name)
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (d.image_size, d.image_size) == (m.image_height, m.image_width)
    assert (d.name == "fmnist") == (t.eval_features == "fmnist") == (m.num_classes == 10)
    assert m.in_channels == (1 if d.name == "fmnist" else 3)
    m.check_positions(cfg.align.positions)  # alignment targets a position the model has
    assert (cfg.align.encoder == "fmnist-ssl") == (d.name == "fmnist")
    resolve(name, overrides=["align.enabled=true"])  # and validates with alignment on


def test_preset_shapes():
    c = resolve("imagenet64").model
    assert (c.in_channels, c.image_height, c.patch_size, c.width, c.num_blocks, c.layers_per_block) == \
        (3, 64, 2, 768, 8, 8)
    assert c.num_tokens == 1024
    assert preset_model("fmnist", width=256).width == 256
    with pytest.raises(KeyError, match="unknown preset"):
        preset_model("cifar")
    model = TARFlow(preset_model("fmnist"))
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    assert model(x, torch.tensor([0, 9])).z.shape == (2, 1, 28, 28)


def test_image_size_must_match_the_model():
    with pytest.raises(ValueError, match="data.image_size 32 does not match the model's 28 x 28"):
        resolve(overrides=["data.image_size=32"])


def test_yaml_then_set_precedence_and_types(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  width: 256\noptim:\n  lr: 1.0e-3\n  betas: [0.8, 0.9]\ntrain:\n  steps: 50\n")
    cfg = resolve("fmnist", str(f), ["optim.lr=3e-4", "train.bf16=false", "data.path=/x", "model.sigma=0"])
    assert cfg.model.width == 256 and cfg.train.steps == 50  # from the YAML
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # --set wins; "3e-4" is a float
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.bf16 is False and cfg.data.path == "/x" and cfg.model.sigma == 0.0
    assert resolve(overrides=["data.path=null"]).data.path is None


def test_round_trip_through_yaml():
    cfg = resolve(overrides=["model.width=192", "optim.betas=[0.9, 0.99]"])
    assert RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("key, suggestion", [("optim.lrr", "optim.lr"), ("model.widht", "model.width"),
                                             ("trian.steps", "train.steps")])
def test_unknown_key_lists_the_closest(key, suggestion):
    with pytest.raises(KeyError, match=f"did you mean {suggestion}"):
        resolve(overrides=[f"{key}=1"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(KeyError, match="optim.learning_rate.*bad.yaml"):
        resolve(config_file=str(f))


@pytest.mark.parametrize("item, match", [("model.width=wide", "expected int"), ("model.width=1.5", "expected int"),
                                         ("train.bf16=maybe", "expected bool"), ("optim.betas=0.9", "list of 2"),
                                         ("optim.lr", "key=value")])
def test_bad_values(item, match):
    with pytest.raises(ValueError, match=match):
        resolve(overrides=[item])


def test_cross_checks():
    with pytest.raises(ValueError, match="patch_size 5 does not divide"):
        resolve(overrides=["model.patch_size=5"])
    with pytest.raises(ValueError, match="not divisible by 2 processes x optim.grad_accum 3"):
        resolve(overrides=["optim.batch_size=64", "optim.grad_accum=3"]).micro_batch(2)
    with pytest.raises(ValueError, match="label_drop"):
        resolve(overrides=["train.label_drop=1.5"])


def test_valid_keys_and_nested_merge():
    assert {"model.width", "optim.lr", "train.steps", "data.path"} <= set(valid_keys())
    assert merge(RunConfig(), {"train": {"steps": 7}, "optim.lr": "2e-4"}, "test").train.steps == 7


def test_print_config_cli(capsys):
    cli.main(["train", "--print-config", "--set", "model.width=256"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["width"] == 256 and set(printed) == {"model", "data", "optim", "train", "align"}


def test_cli_unknown_key_is_one_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--print-config", "--set", "optim.lrr=1"])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean optim.lr" in err


def test_align_section_presets_lists_and_checks(capsys):
    a = resolve().align
    assert not a.enabled and a.encoder == "fmnist-ssl" and a.positions == [(4, 2)] and a.feature_cache
    assert (a.strategy, a.reverse) == ("reverse", "pseudo")
    b = resolve("imagenet64").align
    assert b.positions == [(7, 6), (8, 6)] and b.encoder == "dinov2_vitb14" and not b.feature_cache
    cfg = resolve(overrides=["align.enabled=true", "align.strategy=detach", "align.positions=[[3, 1], [4, 2]]",
                             "align.weight=0.25", "align.jacobi_steps=4", "align.encoder_weights=/w.pth"])
    a = cfg.align
    assert a.enabled and a.strategy == "detach" and a.positions == [(3, 1), (4, 2)] and a.weight == 0.25
    assert a.jacobi_steps == 4 and a.encoder_weights == "/w.pth"
    assert RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg  # positions survive YAML (as lists)
    assert yaml.safe_load(cfg.to_yaml())["align"]["positions"] == [[3, 1], [4, 2]]
    with pytest.raises(ValueError, match="outside this model's blocks 1..4"):
        resolve(overrides=["align.enabled=true", "align.positions=[[5, 1]]"])
    resolve(overrides=["align.positions=[[5, 1]]"])  # not checked against the model while alignment is off
    with pytest.raises(ValueError, match="unknown strategy"):
        resolve(overrides=["align.strategy=sideways"])
    with pytest.raises(ValueError, match="expected a list"):
        resolve(overrides=["align.positions=4"])
    with pytest.raises(ValueError, match="train.eval_features"):
        resolve(overrides=["train.eval_features=clip"])
    cli.main(["train", "--print-config", "--set", "align.enabled=true", "--set", "align.strategy=reverse",
              "--set", "align.positions=[[4,2]]"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["align"]["enabled"] is True and printed["align"]["positions"] == [[4, 2]]
    # --encoder-weights and --data-dir (the flags the missing-file errors name) are align.encoder_weights, data.path
    cli.main(["train", "--print-config", "--preset", "imagenet64", "--encoder-weights", "/w/dinov2_vitb14.pth",
              "--data-dir", "/d/imagenet64.npz"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["align"]["encoder_weights"] == "/w/dinov2_vitb14.pth"
    assert printed["data"]["path"] == "/d/imagenet64.npz"
