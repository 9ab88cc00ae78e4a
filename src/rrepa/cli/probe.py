"""`rrepa probe`: linear probes (rrepa.eval.probe) at every (block, layer) of a run's flow; its --ckpt, --dataset
and --noise arguments are `rrepa classify`'s (rrepa.cli.classify)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from rrepa.cli.classify import add_common_args, dataset_for, default_out_dir
from rrepa.cli.options import add_overwrite, refuse_existing
from rrepa.data.latent_run import with_vae
from rrepa.distributed import resolve_device
from rrepa.eval.linear import DEFAULT_L2_GRID
from rrepa.eval.probe import POOLS, markdown_table, probe_model, save_heatmap
from rrepa.training.run import load_run
from rrepa.utils import atomic_write


def parse_grid(text: str) -> list[float]:
    """--l2-grid "1e-4,1e-3" -> [1e-4, 1e-3]; ValueError for anything else."""
    try:
        grid = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--l2-grid takes comma-separated numbers, e.g. 1e-4,1e-3,1e-2; got {text!r}") from err
    if not grid or any(v < 0 for v in grid):
        raise ValueError(f"--l2-grid needs at least one value >= 0, got {text!r}")
    return grid


def cmd_probe(args: argparse.Namespace) -> None:
    """`rrepa probe`: linear-probe accuracy at every (block, layer)."""
    grid = parse_grid(args.l2_grid)
    out = Path(args.out) if args.out else default_out_dir(args.ckpt, "probe")
    refuse_existing(args, out / f"probe-{args.pool}.json")  # before extracting anything
    device = resolve_device(args.device)
    model, info = load_run(args.ckpt, args.weights, device, warn=tqdm.write)
    info = with_vae(info, args.vae)
    train_set = dataset_for(model, info, "train", args.data_dir, args.dataset)
    test_set = dataset_for(model, info, "test", args.data_dir, args.dataset)
    res = probe_model(model, train_set, test_set, limit_train=args.limit_train, limit_test=args.limit_test,
                      batch_size=args.batch_size, pool=args.pool, noise=args.noise, seed=args.seed, l2_grid=grid,
                      val_fraction=args.val_fraction, max_iter=args.max_iter, device=device)
    cfg = model.cfg
    rows, best = res["positions"], res["best"]
    table = markdown_table(rows, cfg.num_blocks, cfg.layers_per_block)
    print(f"linear-probe test accuracy (%), pool {args.pool}, noise {args.noise}, {res['train_images']} train / "
          f"{res['test_images']} test images; best in bold")
    print(table)
    print(f"best: block {best['block']}, layer {best['layer']}: {100 * best['test_acc']:.2f}% (l2 {best['l2']:g})")
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"probe-{args.pool}.png"
    save_heatmap(rows, cfg.num_blocks, cfg.layers_per_block, png,
                 f"linear probe ({args.pool}), best {100 * best['test_acc']:.1f}%")
    report = {"ckpt": info["file"], "step": info["step"], "weights": info["weights"], **res, "table": table,
              "heatmap_png": str(png)}
    report["best"] = {k: best[k] for k in ("block", "layer", "test_acc")}
    path = out / f"probe-{args.pool}.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    print(f"wrote {path} and {png}")


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rrepa probe`."""
    p = sub.add_parser("probe", help="linear probes on frozen features at every (block, layer)",
                       description="Linear probes (multinomial logistic regression, L2 chosen on a held-out part "
                                   "of the training split) on pooled hidden states of every (block, layer), "
                                   "extracted in one pass per batch with the null label.")
    add_common_args(p)
    p.add_argument("--pool", choices=POOLS, default="mean",
                   help="token pooling: mean (default), max, or flatten-small (2 x 2 cells, flattened)")
    p.add_argument("--limit-train", type=int, help="only the first N training images")
    p.add_argument("--limit-test", type=int, help="only the first N test images")
    p.add_argument("--batch-size", type=int, default=128, help="images per feature-extraction batch")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="part of the training images held out to choose the L2 strength")
    p.add_argument("--l2-grid", default=",".join(f"{v:g}" for v in DEFAULT_L2_GRID),
                   help="L2 strengths to choose from (comma-separated)")
    p.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations per fit")
    p.add_argument("--out", help="output folder (default <run>/probe)")
    add_overwrite(p, "probe JSON and heatmap")
    p.set_defaults(func=cmd_probe)
