"""Training under CPU contention: s/step of the fmnist preset's training step alone and beside busy processes.

    python benchmarks/bench_contention.py                       # 2 competing busy processes, ~2-3 minutes
    python benchmarks/bench_contention.py --busy 1 --seconds 5

Each setting (intra-op threads x OpenMP waiting) runs in a fresh process, because OMP_WAIT_POLICY only
takes effect when set before torch is imported. The step is the training loop's: noise augmentation, NLL,
backward, gradient clipping and AdamW on a batch of the preset's size (random images: the cost does not depend
on the pixels). Every setting is timed alone, then with --busy pure-Python spin loops that this script starts
and kills itself. The table gives s/step and two ratios measured in this one run: loaded / alone for the same
setting, and loaded / the fastest setting alone (what a user sees when the machine gets busy). "rrepa default"
is a process started as the `rrepa` command starts (rrepa.cli sets its OpenMP defaults before torch is
imported), the row the defaults are judged by. Run it on an otherwise idle machine: other load is part of every
measurement, so each one reports how many cores other processes used meanwhile (0 for a clean one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from cpu import busy_seconds

SETTINGS = [  # (label, intra-op threads (0 = torch's default, all cores), environment; None = as `rrepa` starts)
    ("torch default: all cores, OpenMP default wait", 0, {}),
    ("all cores, OMP_WAIT_POLICY=PASSIVE", 0, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("all cores, GOMP_SPINCOUNT=10000", 0, {"GOMP_SPINCOUNT": "10000"}),
    ("1 thread", 1, {}),
    ("rrepa default", 0, None),
]


def child(args: argparse.Namespace) -> None:
    """One setting, in this process: time training steps and print {"s_per_step": ..., "threads": ...}."""
    if args.as_rrepa:
        import rrepa.cli  # noqa: F401 - as the `rrepa` command starts: its defaults are set before torch is imported
    import torch

    from rrepa.flow.tarflow import TARFlow
    from rrepa.training.config import resolve

    if int(args.threads) > 0:
        torch.set_num_threads(int(args.threads))
    cfg = resolve("fmnist")
    m = cfg.model
    torch.manual_seed(0)
    model = TARFlow(m)
    model.validate_inputs = False
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)
    b = cfg.optim.batch_size
    x = torch.rand(b, m.in_channels, m.image_height, m.image_width) * 2 - 1
    y = torch.randint(0, m.num_classes, (b,))

    def step() -> None:
        loss = model.nll(x + m.sigma * torch.randn_like(x), y, label_drop=cfg.train.label_drop).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, thread pool start
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < args.seconds and len(times) < 200):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"s_per_step": statistics.median(times), "steps": len(times),
                      "threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


def measure(threads: int, env_extra: dict | None, busy: int, seconds: float) -> dict:
    """One child run beside `busy` spinners; "others": cores other processes used meanwhile (should be 0)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")}
    env.update(env_extra or {})
    cmd = [sys.executable, __file__, "--child", "--threads", str(threads), "--seconds", str(seconds)]
    if env_extra is None:
        cmd.append("--as-rrepa")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    t0, (all0, ours0) = time.time(), busy_seconds()
    try:
        if busy:
            time.sleep(1.0)  # the spinners are running before the job starts
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    (all1, ours1), wall = busy_seconds(), time.time() - t0
    if done.returncode:
        sys.exit(f"setting threads={threads} env={env_extra} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]),
            "others": max(0.0, (all1 - all0) - (ours1 - ours0)) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=2, help="competing busy processes")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per measurement (>= 2 steps)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", default="0", help=argparse.SUPPRESS)
    parser.add_argument("--as-rrepa", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", type=int, nargs="+", help="only these settings (indices into SETTINGS)")
    args = parser.parse_args()
    if args.child:
        return child(args)
    t0, (all0, ours0) = time.time(), busy_seconds()
    rows = []
    for label, threads, env_extra in [SETTINGS[i] for i in args.only] if args.only else SETTINGS:
        alone = measure(threads, env_extra, 0, args.seconds)
        loaded = measure(threads, env_extra, args.busy, args.seconds)
        rows.append((label, alone, loaded))
        print(f"{label}: {alone['s_per_step']:.3f} s/step alone, {loaded['s_per_step']:.3f} loaded "
              f"(other load {alone['others']:.2f} / {loaded['others']:.2f} cores)", file=sys.stderr)
    (all1, ours1), wall = busy_seconds(), time.time() - t0
    others = max(0.0, (all1 - all0) - (ours1 - ours0))
    best = min(r[1]["s_per_step"] for r in rows)
    print(f"fmnist preset training step (batch 128), {os.cpu_count()} cores, alone and beside {args.busy} busy "
          f"process(es); median s/step over ~{args.seconds:g} s each. Other processes used {others / wall:.2f} "
          f"cores on average during the {wall:.0f} s run (0 = a clean measurement)\n")
    print(f"| setting | threads | s/step alone | s/step with {args.busy} busy | loaded / alone | "
          f"loaded / fastest alone | other load (cores) |")
    print("|---|---|---|---|---|---|---|")
    for label, alone, loaded in rows:
        a, b = alone["s_per_step"], loaded["s_per_step"]
        print(f"| {label} | {alone['threads']} | {a:.3f} | {b:.3f} | {b / a:.2f}x | {b / best:.2f}x | "
              f"{alone['others']:.2f} / {loaded['others']:.2f} |")


if __name__ == "__main__":
    main()
