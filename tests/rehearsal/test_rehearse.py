"""`rrepa rehearse` (rehearsal.rehearse): every ImageNet preset's stages at the tiny scale, the same code path as the
full-size rehearsal; the capacity plan (rehearsal.capacity) from its report; the measuring tools (rehearsal.measure)."""

import json
import mmap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rrepa.cli import main
from rrepa.rehearsal.capacity import format_plan, layer_passes, plan
from rrepa.rehearsal.measure import SavedTensors, count_flops, measure, peak_rss, reset_peak_rss
from rrepa.rehearsal.rehearse import PRESETS, Rehearsal, RehearsalError, rehearse, report_path
from rrepa.training.config import resolve

torch.set_num_threads(1)
# FID-Inception's 2048-d Frechet distances take seconds whatever the sample count: evaluated for one preset only.
SKIP = {"imagenet64": (), "imagenet256-latent": ("inception", "evaluate", "features"),
        "imagenet256-latent-p1": ("inception", "evaluate", "features")}
DDP = {"imagenet256-latent"}  # the DDP stage (torchrun, 2 gloo processes) for one preset: it is left out at full size


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One work folder for the three presets: the networks' weight files are made once."""
    return tmp_path_factory.mktemp("rehearsals")


@pytest.fixture(scope="module")
def reports(work):
    return {}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_stage_of_a_tiny_rehearsal_runs(preset, work, reports):
    r = Rehearsal(preset, work, scale="tiny", skip=SKIP[preset], ddp=preset in DDP)
    report = rehearse(r, log=lambda msg: None)
    reports[preset] = report
    latent = preset != "imagenet64"
    stages = [s["stage"] for s in report["stages"]]
    expected = ["data", *(["vae"] if latent else []), "encoder", "inception", *(["latents"] if latent else []),
                "features", "probe b=1", "probe b=2", "train", "resume", *(["ddp"] if preset in DDP else []),
                "sample", "jacobi",
                *(["decode"] if latent else []), "npz", "evaluate", "bpd"]
    assert stages == [s for s in expected if s not in SKIP[preset]]
    for s in report["stages"]:
        assert s["seconds"] >= 0 and s["peak_bytes"] > 0, s
    # The real layouts: class folders of JPEGs (256 presets) or downsampled-ImageNet npz files.
    data = r.folder / "data"
    if latent:
        assert len(list((data / "train").iterdir())) == 1000 and list(data.glob("val/*/*.JPEG"))
        assert (r.folder / "latents" / "train" / "manifest.json").is_file()
    else:
        assert (data / "train_data_batch_1.npz").is_file() and (data / "val_data.npz").is_file()
    # Trained, checkpointed, resumed by one step (keeping one checkpoint: 7.5 GB each at full size).
    assert [p.name for p in (r.folder / "run").glob("ckpt-*.pt")] == ["ckpt-0000003.pt"]
    # ADM's sample file of the decoded images, at the preset's image size.
    size = report["config"]["data"]["image_size"]
    with np.load(r.folder / "samples.npz") as z:
        assert z["arr_0"].shape == (4, size, size, 3) and z["arr_0"].dtype == np.uint8
        assert z["labels"].tolist() == [0, 1, 2, 3]
    # FLOPs grow with the batch; the probe counted the CPU's attention too.
    lo, hi = (s for s in report["stages"] if s["stage"].startswith("probe"))
    assert hi["flops"] == 2 * lo["flops"] > 0 and hi["saved_bytes"] > lo["saved_bytes"] > 0
    assert report["facts"]["flow_params"] > 0 and report["facts"]["checkpoint_bytes"] > 0
    md = (r.folder / "rehearsal.md").read_text()
    assert "| train |" in md and "| bpd |" in md
    assert json.loads(report_path(work, preset, "tiny").read_text())["preset"] == preset


def test_the_plan_from_a_rehearsal(work, reports, capsys):
    if "imagenet64" not in reports:
        pytest.skip("needs the imagenet64 rehearsal of this module")
    report = reports["imagenet64"]
    p = plan(report, gpus=8, gpu_memory_gb=80, tflops=1000, utilisation=0.5)
    assert p["batch"] == 256 and p["steps"] == 1_000_000 and p["plain"]["micro_batch"] == 32
    assert p["plain"]["fits"] and p["checkpointed"]["fits"]
    assert p["gpu_hours"] == pytest.approx(p["flops_per_image"] * 256 * 1_000_000 / (1000e12 * 0.5) / 3600)
    f = report["facts"]
    assert p["static_total"] == f["weights_bytes"] + f["grad_bytes"] + f["adam_bytes"] + f["ema_bytes"] + \
        f["encoder_bytes"]
    assert f["adam_bytes"] == 2 * f["grad_bytes"]  # AdamW's two float32 moments
    assert 0.5 < p["check"]["ratio"] < 2  # the goal is 25 %; RSS at the tiny scale is mostly the process's own
    assert "Capacity plan: imagenet64 on 8 x 80 GB" in format_plan(p)
    # A card too small for the batch: the plan says which accumulation fits.
    small = plan(report, gpus=8, gpu_memory_gb=(p["static_total"] + 20 * p["activations_per_sample"]) / 1e9 / 0.9)
    assert not small["plain"]["fits"] and small["plain"]["grad_accum"] == 2
    main(["rehearse", "--plan", "--preset", "imagenet64", "--scale", "tiny", "--work", str(work)])
    assert "GPU-hours" in capsys.readouterr().out
    # A rehearsal that trained with activation checkpointing is checked against the checkpointed prediction.
    ckpt = {**report, "config": {**report["config"], "train": {**report["config"]["train"],
                                                                "activation_checkpointing": True}}}
    c = plan(ckpt)["check"]
    assert c["checkpointed"] and not p["check"]["checkpointed"]
    assert c["predicted"] - p["check"]["predicted"] == pytest.approx(
        (p["activations_per_sample_checkpointed"] - p["activations_per_sample"]) * c["batch"])
    assert "with activation checkpointing the model predicts" in format_plan(plan(ckpt))


def test_layer_passes_of_the_paper_setting():
    cfg = resolve("imagenet64")
    a = cfg.align
    assert layer_passes(cfg.model, a.positions, "reverse", "pseudo") == 64 + 16 + 12  # blocks 7, 8 again; 2 x 6
    assert layer_passes(cfg.model, [], "reverse", "pseudo") == 64


def test_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="rehearse takes an ImageNet preset"):
        Rehearsal("fmnist", tmp_path)
    with pytest.raises(ValueError, match="unknown stage"):
        Rehearsal("imagenet64", tmp_path, skip=("trian",))
    with pytest.raises(SystemExit) as exit:
        main(["rehearse", "--plan", "--preset", "imagenet64", "--work", str(tmp_path)])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "run `rrepa rehearse --preset imagenet64" in err
    bad = Rehearsal("imagenet64", tmp_path, scale="tiny", overrides=("align.encoder_image_size=30",))
    with pytest.raises(RehearsalError, match="stage encoder: ValueError: DINOv2 image_size must be a positive"):
        rehearse(bad, log=lambda msg: None)


def test_flops_count_the_cpu_attention_and_saved_bytes_skip_parameters():
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    with count_flops() as flops:
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    assert flops.get_total_flops() == 4 * 16 * 16 * 8 * 2 + 10 * 16 * 16 * 8 * 2  # forward 2 bmm, backward 5
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64)
    with SavedTensors(list(lin.parameters())) as saved:
        lin(x).relu().sum()
    assert saved.bytes == 2 * 32 * 64 * 4  # the input and the relu's output; not the weight


def test_peak_memory_is_per_stage():
    if not reset_peak_rss():
        pytest.skip("no resettable peak RSS here")
    # 64 MiB of anonymous memory, every page touched, then unmapped: the resident set surely falls again (a freed
    # tensor may stay in malloc's heap, resident, depending on what the process allocated before).
    big = mmap.mmap(-1, 64 * 2**20)
    for i in range(0, len(big), mmap.PAGESIZE):
        big[i] = 1
    before = peak_rss()
    big.close()
    with measure("small") as m:
        torch.ones(1000).sum()
    assert m.peak_bytes < before - 32 * 2**20 and m.memory == "peak RSS" and m.seconds >= 0
