"""Training throughput of a preset: one process vs N gloo processes (DDP) on this machine's CPU cores, in each
precision asked for, or one process on a GPU (--device cuda, bf16 autocast as train.precision sets it).

    python benchmarks/bench_train.py                  # fmnist, 40 steps, 1 and 2 processes, as the preset sets
    python benchmarks/bench_train.py --steps 100 --procs 1 2 4
    python benchmarks/bench_train.py --preset default --steps 140 --log-every 20 --precision fp32 bf16 --rounds 2
    python benchmarks/bench_train.py --device cuda --steps 400 --log-every 100

Each configuration runs `rrepa train` for --steps steps on the same global batch (the preset's) and
reports the images/s logged in metrics.jsonl after the first log window (start-up and warm-up excluded).
One process uses all cores; N processes use cores / N threads each. With --rounds R every configuration runs R
times, the configurations alternating, and the median counts: slow drift on a shared machine hits all alike.
Other load on the machine distorts the numbers: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from common import train_images_per_s


def run(procs: int, precision: str | None, args: argparse.Namespace, folder: Path) -> tuple[float, float]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    sets = args.set + ([f"train.precision={precision}"] if precision else [])
    return train_images_per_s(args.preset, folder / f"procs{procs}-{precision}", args.steps, args.log_every,
                              args.device, sets, max(1, (os.cpu_count() or 1) // procs), launcher,
                              what=f"{procs} process(es), precision {precision or 'as set'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fmnist")
    parser.add_argument("--steps", type=int, default=40, help="steps per configuration")
    parser.add_argument("--log-every", type=int, default=10, help="steps per measured window (the first is dropped)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16", "auto"), default=[None],
                        help="train.precision settings to compare (default: the preset's)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each configuration, alternating")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: one process on one GPU")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to rrepa train")
    args = parser.parse_args()
    if args.device == "cuda" and args.procs != [1]:
        args.procs = [1]  # one GPU here: DDP over several processes would share it
    configs = [(p, q) for q in args.precision for p in args.procs]
    rates: dict[tuple, list[float]] = {c: [] for c in configs}
    walls: dict[tuple, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for _ in range(args.rounds):
            for c in configs:
                rate, wall = run(*c, args, Path(tmp))
                rates[c].append(rate)
                walls[c].append(wall)
    rate = {c: statistics.median(v) for c, v in rates.items()}
    base = rate[configs[0]]
    where = (f"{os.cpu_count()} cores (CPU, gloo)" if args.device == "cpu" else
             "one GPU (CUDA; bf16 autocast unless --set train.precision=fp32)")
    print(f"\n{args.preset}: {args.steps} steps per configuration, {args.rounds} round(s), on {where}\n")
    print("| precision | processes | threads each | images/s | time vs first | wall s |")
    print("|---|---|---|---|---|---|")
    for c in configs:
        procs, precision = c
        threads = max(1, (os.cpu_count() or 1) // procs)
        print(f"| {precision or 'as set'} | {procs} | {threads} | {rate[c]:.1f} | {base / rate[c]:.2f}x | "
              f"{statistics.median(walls[c]):.0f} |")


if __name__ == "__main__":
    main()
