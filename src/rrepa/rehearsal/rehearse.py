"""`rrepa rehearse`: a dry run of an ImageNet preset end to end, with the real architectures at their real size and
random weights, on a small synthetic dataset in the preset's real layout, on whatever device is there, so that
the first run on a cluster is not the first run ever. Nothing is downloaded (rrepa.rehearsal.assets makes the data
and the networks' weight files) and every stage goes through the entry point a user's command goes through:

    data        the synthetic dataset (ImageNet class folders of JPEGs, or downsampled-ImageNet npz files)
    vae         SD-VAE's architecture (latent presets), loaded as `--vae PATH` loads it
    encoder     DINOv2 at the preset's input size, loaded from a weights file as `--encoder-weights` loads it
    inception   torch-fidelity's FID-Inception, loaded as `--inception-weights` loads it
    latents     `rrepa latents encode` of the train split (with mirrors) and the test split (latent presets)
    features    the alignment feature cache of the train split (the presets compute targets online; the cache's
                size per image says why)
    probe       one training step (R-REPA, the preset's precision) at two batch sizes: FLOPs, activation bytes
                and peak memory per step, for the capacity plan (rrepa.rehearsal.capacity)
    train       `rrepa train`: steps with R-REPA and a checkpoint;   resume: `--resume` by one more step
                (no sample grid, train.sample_rows=0: at 1024 tokens it took longer than everything else, and
                the sample stages draw through the same sampler)
    ddp         `torchrun --nproc_per_node 2 -m rrepa.cli train` (gloo on the CPU, NCCL with 2 GPUs), opt-in
    sample      `rrepa sample` with guidance, sequential sampler;      jacobi: the same with the Jacobi sampler
    decode      the VAE's decoding of the samples (latent presets);   npz: ADM's sample file
    evaluate    `rrepa evaluate` with FID-Inception against an ADM-layout reference npz of the training images
    bpd         `rrepa bpd` on two test images

Each stage reports its wall time, its peak memory (rrepa.rehearsal.measure: the process's peak RSS on the CPU,
torch.cuda.max_memory_allocated on a GPU), and what it is about: parameters, FLOPs, bytes on disk. The report is a
Markdown table and a JSON file in the work folder. ``scale="tiny"`` runs the same stages on small networks and
images (a test's size); anything else can be changed with config overrides.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import traceback
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from rrepa.rehearsal.measure import Measure, human_bytes, human_count
from rrepa.rehearsal.stages import (
    PRESETS,
    SCALES,
    STAGES,
    Rehearsal,
    RehearsalError,
    StageRun,
    stage_bpd,
    stage_data,
    stage_ddp,
    stage_decode,
    stage_encoder,
    stage_evaluate,
    stage_features,
    stage_inception,
    stage_latents,
    stage_npz,
    stage_probe,
    stage_sample,
    stage_train,
    stage_vae,
)
from rrepa.utils import atomic_write

# In order; "resume" runs inside stage_train (it continues that run).
STEPS: dict[str, Callable[[StageRun], Measure | list[Measure]]] = {
    "data": stage_data, "vae": stage_vae, "encoder": stage_encoder, "inception": stage_inception,
    "latents": stage_latents, "features": stage_features, "probe": stage_probe, "train": stage_train, "ddp": stage_ddp,
    "sample": partial(stage_sample, jacobi=False), "jacobi": partial(stage_sample, jacobi=True), "decode": stage_decode,
    "npz": stage_npz, "evaluate": stage_evaluate, "bpd": stage_bpd}
__all__ = ["PRESETS", "SCALES", "STAGES", "Rehearsal", "RehearsalError", "format_report", "rehearse", "report_path"]


def report_path(work: str | os.PathLike, preset: str, scale: str = "full") -> Path:
    """Where the rehearsal of `preset` in the work folder `work` writes its JSON report."""
    return Rehearsal(preset, Path(work), scale).folder / "rehearsal.json"


def rehearse(r: Rehearsal, log: Callable[[str], None] = print) -> dict:
    """Run the stages of `r` (all but r.skip; ddp only with r.ddp) and write <folder>/rehearsal.{json,md}; returns
    the report (see `format_report`). A failing stage raises, naming the stage."""
    run = StageRun(r, log)
    run.dir.mkdir(parents=True, exist_ok=True)
    log(f"rehearsal of {r.preset} ({r.scale}) in {run.dir} on {run.device}, precision {run.precision}")
    for name, fn in STEPS.items():
        if name in r.skip or (name in ("vae", "latents", "decode") and not run.latent) or (name == "ddp" and not r.ddp):
            continue
        try:
            done = fn(run)
        except Exception as err:
            trace = run.dir / "rehearsal-error.txt"
            atomic_write(trace, lambda tmp: Path(tmp).write_text(traceback.format_exc()))
            first = (str(err).strip().splitlines() or [""])[0]
            raise RehearsalError(f"rehearsal of {r.preset}, stage {name}: {type(err).__name__}: {first} "
                                 f"(traceback in {trace})") from err
        for m in done if isinstance(done, list) else [done]:
            run.keep(m)
        gc.collect()
    report = {"preset": r.preset, "scale": r.scale, "device": describe_device(run.device),
              "precision": run.precision, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rehearsal": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(r).items()},
              "config": run.cfg.to_dict(), "facts": run.facts, "notes": run.notes,
              "stages": [m.as_dict() for m in run.stages]}
    atomic_write(run.dir / "rehearsal.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
    atomic_write(run.dir / "rehearsal.md", lambda tmp: Path(tmp).write_text(format_report(report) + "\n"))
    return report


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def format_report(report: dict) -> str:
    """The report as Markdown: a header line and one table row per stage."""
    m = report["config"]["model"]
    lines = [f"## Rehearsal of {report['preset']} ({report['scale']})", "",
             f"{report['device']}, torch {report['torch']}, {report['threads']} threads, precision "
             f"{report['precision']}; flow {m['num_blocks']} x {m['layers_per_block']}, width {m['width']}, "
             f"{m['in_channels']} x {m['image_height']} x {m['image_width']}, patch {m['patch_size']}; "
             f"batch {report['config']['optim']['batch_size']}.", "",
             "| stage | time | peak memory | parameters | FLOPs | bytes | notes |", "|---|---|---|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['seconds']:.1f} s | {human_bytes(s['peak_bytes'])} | "
                     f"{human_count(s.get('params')) if s.get('params') else ''} | "
                     f"{human_count(s.get('flops'), 'FLOP') if s.get('flops') else ''} | "
                     f"{human_bytes(s['bytes']) if s.get('bytes') else ''} | {s.get('note', '')} |")
    memory = sorted({s["memory"] for s in report["stages"] if s.get("memory")})
    lines += ["", f"Peak memory: {'; '.join(memory)}. FLOPs: torch.utils.flop_counter (matrix products, "
                  f"convolutions, attention), forward and backward of one step for the probe rows."]
    lines += [f"Note: {n}" for n in dict.fromkeys(report["notes"])]
    return "\n".join(lines)
