"""Training throughput of a preset: one process vs N gloo processes (DDP) on this machine's CPU cores, or one
process on a GPU (--device cuda, bf16 autocast as train.precision sets it).

    python benchmarks/bench_train.py                  # fmnist, 40 steps, 1 and 2 processes
    python benchmarks/bench_train.py --steps 100 --procs 1 2 4
    python benchmarks/bench_train.py --device cuda --steps 400 --log-every 100

Each configuration runs `rrepa train` for --steps steps on the same global batch (the preset's) and
reports the images/s logged in metrics.jsonl after the first log window (start-up and warm-up excluded).
One process uses all cores; N processes use cores / N threads each. Other load on the machine
distorts the numbers: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from common import train_images_per_s


def run(procs: int, args: argparse.Namespace, folder: Path) -> dict:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    rate, wall = train_images_per_s(args.preset, folder / f"procs{procs}", args.steps, args.log_every, args.device,
                                    args.set, max(1, (os.cpu_count() or 1) // procs), launcher,
                                    what=f"{procs} process(es)")
    return {"procs": procs, "images_per_s": rate, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fmnist")
    parser.add_argument("--steps", type=int, default=40, help="steps per configuration")
    parser.add_argument("--log-every", type=int, default=10, help="steps per measured window (the first is dropped)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: one process on one GPU")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to rrepa train")
    args = parser.parse_args()
    if args.device == "cuda" and args.procs != [1]:
        args.procs = [1]  # one GPU here: DDP over several processes would share it
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        results = [run(p, args, Path(tmp)) for p in args.procs]
    base = results[0]["images_per_s"]
    where = (f"{os.cpu_count()} cores (CPU, train.precision as resolved, gloo)" if args.device == "cpu" else
             "one GPU (CUDA; bf16 autocast unless --set train.precision=fp32)")
    print(f"\n{args.preset}: {args.steps} steps per configuration on {where}\n")
    print("| processes | threads each | images/s | vs first | wall s |")
    print("|---|---|---|---|---|")
    for r in results:
        threads = max(1, (os.cpu_count() or 1) // r["procs"])
        print(f"| {r['procs']} | {threads} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x | "
              f"{r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
