"""`rrepa rehearse`: an ImageNet preset end to end at full size with random weights on synthetic data
(rrepa.rehearsal.rehearse), and `--plan`, the GPU capacity plan from its measurements (rrepa.rehearsal.capacity)."""

from __future__ import annotations

import argparse
import json

from rrepa.cli.options import add_device
from rrepa.rehearsal.capacity import H100_BF16_TFLOPS, format_plan, plan
from rrepa.rehearsal.rehearse import PRESETS, SCALES, STAGES, Rehearsal, format_report, rehearse, report_path


def cmd_plan(args: argparse.Namespace) -> None:
    """The capacity plan of each --preset from its rehearsal's report in --work."""
    for preset in args.preset or PRESETS:
        path = report_path(args.work, preset, args.scale)
        if not path.is_file():
            raise FileNotFoundError(f"no rehearsal of {preset} in {args.work} ({path} is missing); run `rrepa rehearse "
                                    f"--preset {preset} --work {args.work}` first")
        print(format_plan(plan(json.loads(path.read_text()), gpus=args.gpus, gpu_memory_gb=args.gpu_memory,
                               tflops=args.tflops, utilisation=args.utilisation)) + "\n")


def cmd_rehearse(args: argparse.Namespace) -> None:
    """Rehearse each --preset (all three by default) in --work; print each report as Markdown (--plan: the plan)."""
    if args.plan:
        cmd_plan(args)
        return
    for preset in args.preset or PRESETS:
        r = Rehearsal(preset, args.work, scale=args.scale, batch=args.batch, probe_batches=tuple(args.probe_batches),
                      samples=args.samples, guidance=args.guidance, device=args.device, ddp=args.ddp,
                      skip=tuple(s for group in args.skip for s in group.split(",") if s), overrides=tuple(args.set))
        report = rehearse(r)
        print(format_report(report))
        print(f"\nwrote {r.folder / 'rehearsal.md'} and {r.folder / 'rehearsal.json'}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rehearse", help="rehearse an ImageNet preset end to end (real architectures, random "
                                        "weights, synthetic data); --plan: the GPU capacity plan",
                       description="A full-size dry run of an ImageNet preset on this device: synthetic data in the "
                                   "preset's layout, the real networks with random weights, and every stage through "
                                   "the entry point its command uses (latents encode, train with R-REPA, checkpoint, "
                                   "resume, sample sequential and Jacobi, decode, ADM npz, evaluate, bpd), each "
                                   "with its time, peak memory, parameters, FLOPs and bytes. Needs no download.")
    p.add_argument("--preset", action="append", choices=PRESETS, help="preset to rehearse (repeatable; default all)")
    p.add_argument("--work", default="rehearsals", help="work folder: data, weights, runs, reports (default "
                                                        "rehearsals/; <work>/<preset>/rehearsal.md)")
    p.add_argument("--scale", choices=SCALES, default="full",
                   help="full: the preset's networks; tiny: the same stages on small ones (seconds, for tests)")
    p.add_argument("--batch", type=int, default=2, help="global batch of the training stages (default 2)")
    p.add_argument("--probe-batches", type=int, nargs=2, default=[1, 2], metavar=("B1", "B2"),
                   help="the two batch sizes of the probe's training steps (memory per sample; default 1 2)")
    p.add_argument("--samples", type=int, default=4, help="images drawn by each sampler (default 4)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance of the samples (default 1)")
    p.add_argument("--ddp", action="store_true", help="also train one step under torchrun --nproc_per_node 2 "
                                                      "(gloo on the CPU, NCCL with 2 GPUs)")
    p.add_argument("--skip", action="append", default=[], metavar="STAGE[,STAGE]",
                   help=f"skip stages (repeatable): {', '.join(STAGES)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as rrepa train's")
    add_device(p)
    g = p.add_argument_group("capacity plan (--plan: from the reports of earlier rehearsals in --work)")
    g.add_argument("--plan", action="store_true", help="print the GPU capacity plan of each --preset instead")
    g.add_argument("--gpus", type=int, default=8, help="GPUs of the run (default 8)")
    g.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="memory per GPU (default 80)")
    g.add_argument("--tflops", type=float, default=H100_BF16_TFLOPS,
                   help=f"dense bf16 TFLOP/s per GPU (default {H100_BF16_TFLOPS:g}: H100 SXM)")
    g.add_argument("--utilisation", type=float, default=0.4, help="fraction of --tflops training sustains (0.4)")
    p.set_defaults(func=cmd_rehearse)
