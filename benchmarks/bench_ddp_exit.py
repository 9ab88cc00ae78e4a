"""How often a torchrun worker aborts at exit, with and without rrepa.distributed.teardown's gc.collect().

Each launch is `torchrun --standalone --nproc_per_node 2` of this file in worker mode: gloo on the CPU, a small
DDP model for a few AdamW steps, one all_gather_object (what rrepa's checkpoints and locks use), then the end of
the process group either by rrepa.distributed.teardown() ("collect") or by what it did before, barrier and
destroy_process_group only ("plain"). A launch that fails with "terminate called without an active exception"
(gloo, in interpreter finalization) counts as an abort. The two arms alternate, --parallel launches at a time
(the abort needs a loaded machine: two at once on 2 cores), so that load hits both alike.

    python benchmarks/bench_ddp_exit.py --launches 40

Measured on the 2-core CPU machine, torch 2.14.1, beside two training runs: 1 of 10 and 3 of 40 plain launches
aborted (4 of 50), 0 of 10 and 0 of 40 with the collection (0 of 50); one-sided Fisher p = 0.06.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm


def worker(arm: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from rrepa import distributed

    d = distributed.setup("cpu")
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)))
    optimizer = torch.optim.AdamW(model.parameters())
    for _ in range(3):
        model(torch.randn(4, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    distributed.gather_objects({"rank": d.rank}, d)
    del model, optimizer
    if arm == "collect":
        distributed.teardown()
    else:
        dist.barrier()
        dist.destroy_process_group()


def launch(arm: str) -> bool:
    """One 2-process launch; True when it aborted at exit."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          __file__, "--worker", arm], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "terminate called" not in out.stdout + out.stderr:
        raise RuntimeError(f"launch failed for another reason:\n{(out.stdout + out.stderr)[-2000:]}")
    return out.returncode != 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launches", type=int, default=40, help="launches per arm")
    p.add_argument("--parallel", type=int, default=2, help="launches at a time")
    p.add_argument("--worker", choices=("collect", "plain"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)

    import torch

    arms = ["plain", "collect"] * args.launches
    with ThreadPoolExecutor(args.parallel) as pool:
        aborted = list(tqdm(pool.map(launch, arms), total=len(arms), desc="launches", unit="launch"))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.parallel} launches at a time\n")
    print("| end of the process group | launches | aborted at exit |")
    print("|---|---|---|")
    for arm, what in (("plain", "barrier + destroy_process_group"), ("collect", "rrepa teardown (gc.collect first)")):
        n = sum(a for a, name in zip(aborted, arms) if name == arm)
        print(f"| {what} | {args.launches} | {n} ({100 * n / args.launches:.0f} %) |")


if __name__ == "__main__":
    main()
