"""`rrepa experiment run | probe | report`: grids of arms x seeds of runs (resumable) and their report."""

from __future__ import annotations

import argparse
import signal
import sys

from rrepa.experiments.probes import probe_grid, probe_references
from rrepa.experiments.report import write_report
from rrepa.experiments.runner import run_grid


def cmd_run(args: argparse.Namespace) -> None:
    """Train every unfinished cell of a grid, then write its report."""
    # SIGTERM (kill, a cluster's scheduler) stops the grid as Ctrl-C does: the cells save checkpoints and no other
    # starts. SIGINT is set too: a runner started in the background (`cmd &`) inherits it ignored, and `kill -INT`
    # on its process group then stopped the running cells and let it start the next ones.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    try:
        not_done = run_grid(args.grid, args.out, runs=args.runs, jobs=args.jobs, threads=args.threads,
                            only=args.only.split(",") if args.only else None, probe=not args.no_probe)
    except KeyboardInterrupt:
        sys.exit(130)
    if not_done:  # failed or interrupted cells: the runner's log names them; no report of a grid left unfinished
        sys.exit(1)
    if not args.no_report:
        print(f"wrote {write_report(args.out)}")


def cmd_probe(args: argparse.Namespace) -> None:
    probe_grid(args.folder, runs=args.runs, limit_train=args.limit_train, limit_test=args.limit_test)
    probe_references(args.folder, limit_train=args.limit_train, limit_test=args.limit_test)


def cmd_report(args: argparse.Namespace) -> None:
    print(f"wrote {write_report(args.folder, baseline=args.baseline)}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="experiment grids: arms x seeds of runs, resumable; and their report")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("run", help="train every unfinished cell of a grid (finished ones are skipped, killed "
                                       "ones resume) and log every evaluation to OUT/evals.jsonl",
                           description="A grid YAML names preset, seeds, common `set` overrides and arms (lists of "
                                       "overrides); see rrepa.experiments.runner and results/*/grid.yaml.")
    q.add_argument("grid", help="the grid YAML file")
    q.add_argument("--out", required=True, help="results folder (evals.jsonl, configs/, README.md, plots)")
    q.add_argument("--runs", help="where the cells' run folders go (default OUT/runs; checkpoints are large)")
    q.add_argument("--jobs", type=int, default=2, help="cells trained at once")
    q.add_argument("--threads", type=int, default=1, help="intra-op threads per cell")
    q.add_argument("--only", help="only these arms, comma-separated")
    q.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    q.add_argument("--no-probe", action="store_true",
                   help="do not probe each cell as it finishes (`rrepa experiment probe` does it later)")
    q.set_defaults(func=cmd_run)
    q = actions.add_parser("probe", help="linear probes of every finished cell (once each) into FOLDER/probes.jsonl, "
                                         "and of the raw pixels and the alignment targets on the same images into "
                                         "FOLDER/reference_probes.jsonl")
    q.add_argument("folder", help="the results folder of `rrepa experiment run`")
    q.add_argument("--runs", help="the cells' run folders (default FOLDER/runs)")
    q.add_argument("--limit-train", type=int, default=10_000, help="fit on the first N training images")
    q.add_argument("--limit-test", type=int, default=2000,
                   help="test on the first N test images (those of the in-training one-step and Bayes top-1)")
    q.set_defaults(func=cmd_probe)
    q = actions.add_parser("report", help="write FOLDER/README.md and plots from FOLDER/evals.jsonl")
    q.add_argument("folder", help="the results folder of `rrepa experiment run`")
    q.add_argument("--baseline", default="baseline", help="the arm the others are compared with")
    q.set_defaults(func=cmd_report)
