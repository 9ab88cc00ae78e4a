"""Run config: preset -> YAML -> --set, typed values, unknown keys with suggestions, round trips."""

from dataclasses import replace

import pytest
import torch
import yaml

from rrepa import cli
from rrepa.flow.config import FlowConfig
from rrepa.flow.tarflow import TARFlow
from rrepa.training.config import DEFAULT_PRESET, PRESETS, RunConfig, merge, preset_model, resolve, valid_keys


def test_the_default_job_is_the_recipe_chosen_by_measurement():
    """`rrepa train` without a preset (and resolve()) is the default job of results/fmnist-recipe and
    results/default-job: fmnist-latent's model and data with the shipped VAE, a wsd schedule at lr 3e-3 for 2,000
    steps, bf16 where native, and one evaluation at its last step with the goal's protocol; the sample grid at guidance
    2, temperature 0.8."""
    from rrepa.cli import build_parser

    cfg = resolve()
    assert build_parser().parse_args(["train"]).preset is None  # cli.train resolves None to DEFAULT_PRESET
    assert cfg == resolve(DEFAULT_PRESET) and DEFAULT_PRESET == "default"
    latent = resolve("fmnist-latent")
    assert (cfg.model, cfg.data, cfg.align) == (latent.model, latent.data, latent.align)
    assert cfg.data.vae == "fmnist-vae"
    assert (cfg.optim.schedule, cfg.optim.lr, cfg.optim.batch_size) == ("wsd", 3e-3, 128)
    t = cfg.train
    assert (t.steps, t.precision, t.eval_every, t.eval_samples, t.eval_guidance, t.eval_test_images) == \
        (2000, "auto", 2000, 5000, 0.0, 2000)
    assert (t.eval_features, t.eval_weights, t.eval_ref) == ("fmnist", None, None)  # shipped evaluator, fmnist:train
    assert (t.sample_guidance, t.sample_temperature) == (2.0, 0.8)


def test_preset_lists_only_what_differs():
    cfg = resolve("fmnist")
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
    fashion = d.name in ("fmnist", "fmnist-clutter")
    if d.vae:  # a latent preset: the model takes the VAE's 4-channel latents of the data's images, sigma 0.2
        assert (d.image_size // LATENT_FACTOR[d.vae],) * 2 == (m.image_height, m.image_width)
        assert m.in_channels == 4 and m.sigma == 0.2 and not t.dequantize and d.vae_fingerprint is None
    else:
        assert (d.image_size, d.image_size) == (m.image_height, m.image_width)
        assert m.in_channels == (1 if fashion else 3)
    assert fashion == (t.eval_features == "fmnist") == (m.num_classes == 10) == (cfg.align.encoder == "fmnist-ssl")
    m.check_positions(cfg.align.positions)  # alignment targets a position the model has
    if d.name == "fmnist-clutter":  # the networks trained on the variant, never those of plain Fashion-MNIST
        assert (t.eval_weights, cfg.align.encoder_weights) == ("fmnist-clutter-cnn", "fmnist-clutter-ssl")
        assert m.image_height // m.patch_size == 8  # the target's 8 x 8 grid at 32 px, 1:1
    if not fashion:  # no Fashion-MNIST field (data, VAE, encoder, evaluator) leaks into another preset
        assert "fmnist" not in cfg.to_yaml()
    resolve(name, overrides=["align.enabled=true"])  # and validates with alignment on


LATENT_FACTOR = {"fmnist-vae": 4, "stabilityai/sd-vae-ft-ema": 8}  # spatial downsampling of each preset's VAE


def test_latent_presets():
    """fmnist-latent is fmnist's recipe on fmnist-vae's 4 x 7 x 7 latents with patch 1; the ImageNet 256 presets are
    the paper's: SD-VAE latents 4 x 32 x 32 of 256 px ImageNet folders, patch 2 (256 tokens) or 1 (1024), sigma 0.2,
    the imagenet64 model and recipe, FID-Inception, DINOv2 alignment online."""
    fl, fm = PRESETS["fmnist-latent"], PRESETS["fmnist"]
    assert all(fl[s] == fm[s] for s in ("optim", "train", "align"))
    m = resolve("fmnist-latent").model
    assert (m.in_channels, m.image_height, m.patch_size, m.num_tokens, m.token_dim) == (4, 7, 1, 49, 4)
    a, b = resolve("imagenet256-latent"), resolve("imagenet256-latent-p1")
    assert (a.data.name, a.data.image_size, a.data.vae, a.data.hflip) == ("folder", 256, "stabilityai/sd-vae-ft-ema",
                                                                          True)
    assert (a.model.in_channels, a.model.image_height, a.model.patch_size, a.model.num_tokens) == (4, 32, 2, 256)
    assert (b.model.patch_size, b.model.num_tokens) == (1, 1024)
    assert replace(b.model, patch_size=2) == a.model and (b.data, b.optim, b.train, b.align) == \
        (a.data, a.optim, a.train, a.align)
    i64 = resolve("imagenet64")
    assert (a.model.width, a.model.num_blocks, a.model.layers_per_block) == (768, 8, 8) == \
        (i64.model.width, i64.model.num_blocks, i64.model.layers_per_block)
    assert (a.optim.batch_size, a.optim.lr, a.train.steps, a.train.ema_decay) == (256, 1e-4, 1_000_000, 0.9999)
    assert a.train.eval_features == "inception" and a.align.encoder == "dinov2_vitb14" and not a.align.feature_cache
    assert a.align.positions == i64.align.positions == [(7, 6), (8, 6)]
    with pytest.raises(ValueError, match="train.dequantize is for 8-bit images"):
        resolve("imagenet256-latent", overrides=["train.dequantize=true"])


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
        resolve("fmnist", overrides=["data.image_size=32"])


def test_yaml_then_set_precedence_and_types(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  width: 256\noptim:\n  lr: 1.0e-3\n  betas: [0.8, 0.9]\ntrain:\n  steps: 50\n")
    cfg = resolve("fmnist", str(f), ["optim.lr=3e-4", "train.precision=fp32", "data.path=/x", "model.sigma=0"])
    assert cfg.model.width == 256 and cfg.train.steps == 50  # from the YAML
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # --set wins; "3e-4" is a float
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.precision == "fp32" and cfg.data.path == "/x" and cfg.model.sigma == 0.0
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
                                         ("train.precision=fp16", "one of auto, fp32, bf16"),
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


# --- per-block layer counts (model.layers_per_block: int | tuple[int, ...]) ---------------------


def test_layers_per_block_as_an_int_or_a_list_round_trips(tmp_path):
    cfg = resolve(overrides=["model.layers_per_block=[1, 1, 1, 5]"])
    assert cfg.model.layers_per_block == (1, 1, 1, 5)
    assert yaml.safe_load(cfg.to_yaml())["model"]["layers_per_block"] == [1, 1, 1, 5]  # plain YAML list
    back = RunConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert back == cfg and back.model.layers_per_block == (1, 1, 1, 5)
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  layers_per_block: [2, 1, 1, 3]\n")
    assert resolve(config_file=str(f)).model.layers_per_block == (2, 1, 1, 3)
    assert resolve(config_file=str(f), overrides=["model.layers_per_block=3"]).model.layers_per_block == 3
    assert RunConfig.from_dict(yaml.safe_load(resolve().to_yaml())).model.layers_per_block == 2


@pytest.mark.parametrize("item, match", [
    ("model.layers_per_block=deep", "expected int or a list of int, got 'deep'"),
    ("model.layers_per_block=null", "expected int or a list of int, got None"),
    ("model.layers_per_block=[1, x, 1, 1]", "expected int or a list of int"),
    ("model.layers_per_block=[1, 1, 5]", r"lists 3 layer counts \[1, 1, 5\] for num_blocks = 4"),
    ("model.layers_per_block=[1, 1, 0, 5]", r"entries must be >= 1"),
])
def test_bad_layers_per_block(item, match):
    with pytest.raises(ValueError, match=match):
        resolve(overrides=[item])


def test_align_positions_are_checked_against_each_blocks_layers():
    resolve(overrides=["model.layers_per_block=[1, 1, 1, 5]", "align.enabled=true", "align.positions=[[4, 5]]"])
    with pytest.raises(ValueError, match=r"align.positions entry \(block 3, layer 2\) is outside.*block 3 has "
                                         r"layers 1..1"):
        resolve(overrides=["model.layers_per_block=[1, 1, 1, 5]", "align.enabled=true",
                           "align.positions=[[4, 5], [3, 2]]"])


def test_deep_shallow_preset_is_fmnist_with_its_layers_redistributed(capsys):
    """fmnist-deep-shallow: fmnist's data, optimiser and loop, the same blocks, total layers and parameters, the
    deep block last (STARFlow), and an alignment position inside it."""
    ds, fm = PRESETS["fmnist-deep-shallow"], PRESETS["fmnist"]
    assert all(ds[s] == fm[s] for s in ("data", "optim", "train"))
    assert {k: v for k, v in ds["align"].items() if k != "positions"} == \
        {k: v for k, v in fm["align"].items() if k != "positions"}
    a, b = resolve("fmnist-deep-shallow", overrides=["align.enabled=true"]), resolve("fmnist")
    m = a.model
    assert m.layer_counts == (1, 1, 1, 5) and sum(m.layer_counts) == sum(b.model.layer_counts)
    assert max(m.layer_counts) == m.layers(m.num_blocks)  # the deep block is block T, the first in generation
    assert replace(m, layers_per_block=2) == b.model
    assert TARFlow(m).num_params() == TARFlow(b.model).num_params() == 1_641_600
    assert a.align.positions == [(4, 4)]
    cli.main(["presets", "fmnist-deep-shallow"])
    assert "| 4 x [1, 1, 1, 5] | 128 | 10 | 1.64 M |" in capsys.readouterr().out


@pytest.mark.parametrize("old, new", [("true", "auto"), ("false", "fp32")])
def test_the_old_bf16_key_reads_as_precision_with_a_note(old, new, tmp_path):
    """train.bf16 (CUDA only) of older configs and stored runs: true -> auto, false -> fp32, with a note."""
    with pytest.warns(FutureWarning, match=f"train.bf16 .* deprecated: read as train.precision={new}"):
        assert resolve(overrides=[f"train.bf16={old}"]).train.precision == new
    f = tmp_path / "old.yaml"  # a config.yaml written by an older rrepa
    f.write_text(f"train:\n  bf16: {old}\n  steps: 7\n")
    with pytest.warns(FutureWarning):
        cfg = resolve(config_file=str(f))
    assert (cfg.train.precision, cfg.train.steps) == (new, 7)
    with pytest.warns(FutureWarning):  # precision, when given too, wins
        assert resolve(overrides=[f"train.bf16={old}", "train.precision=bf16"]).train.precision == "bf16"
