"""Run config: preset -> YAML -> --set, typed values, unknown keys with suggestions, round trips."""

import pytest
import yaml

from rrepa import cli
from rrepa.config import RunConfig, merge, resolve, valid_keys
from rrepa.flow import PRESETS


def test_preset_is_the_default_and_lists_only_what_differs():
    cfg = resolve()
    assert cfg.model == PRESETS["fmnist"]
    assert cfg.data.name == "fmnist"
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.label_drop == 0.1
    # A preset without run overrides keeps the defaults.
    assert resolve("imagenet64").optim.lr == RunConfig().optim.lr


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
