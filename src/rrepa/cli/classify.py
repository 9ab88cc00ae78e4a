"""`rrepa classify` (the training-free classifiers of rrepa.eval.classify on a dataset split), and what it
shares with `rrepa probe`: the --ckpt / --dataset / --data-dir / --noise arguments, opening the model they name
and its dataset, the default output folder.

Checkpoints (`rrepa.training.run.load_run`): a `.safetensors` file written by `save_weights`; a run folder holding
`ema.safetensors` / `model.safetensors` (picked by `weights`, "ema" or "raw"), unless the folder's newest
`ckpt-*.pt` is newer than that export, in which case the checkpoint is used; a run folder with only `ckpt-*.pt`
files, or one `ckpt-*.pt` file (through `rrepa.training.run.load_run`). The dataset settings come from the run's
`config.yaml` when there is one beside the weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from rrepa.cli.options import (
    add_data_dir,
    add_device,
    add_overwrite,
    add_precision,
    add_vae,
    precision_scope,
    refuse_existing,
)
from rrepa.data.datasets import build_dataset
from rrepa.data.latent_run import data_config, eval_dataset, is_latent, load_run_vae, with_vae
from rrepa.distributed import resolve_device
from rrepa.eval.classify import (
    DEFAULT_NOISE,
    DEFAULT_STEP_SIZE,
    DEFAULT_STEPS,
    METHODS,
    NOISE_MODES,
    evaluate,
    num_classes,
    save_confusion_png,
)
from rrepa.flow.tarflow import TARFlow
from rrepa.training.run import load_run
from rrepa.utils import atomic_write

# --------------------------------------------------------------------------------------------
# The model and data that --ckpt, --dataset and --data-dir name
# --------------------------------------------------------------------------------------------


def dataset_for(model: TARFlow, info: dict, split: str, data_dir: str | None, dataset_name: str | None):
    """The split of the dataset the model was trained on (for a latent run, that split's latents): the run's data
    config, else Fashion-MNIST for a 1 x 28 x 28 model; --dataset / --data-dir override."""
    data = dict(info.get("data") or {})
    if dataset_name:
        data["name"] = dataset_name
    if "name" not in data:
        cfg = model.cfg
        if (cfg.in_channels, cfg.image_height, cfg.image_width) == (1, 28, 28):
            data["name"] = "fmnist"
        else:
            raise ValueError("the checkpoint carries no dataset settings; give --dataset fmnist|folder|npz "
                             "and --data-dir")
    if data_dir:
        data["path"] = data_dir
    if data["name"] != "fmnist":
        data.setdefault("image_size", model.cfg.image_height)
    data["hflip"] = False
    cfg = data_config(data)
    if is_latent(cfg):  # the split's latents (cached), as the model was trained on
        return eval_dataset(cfg, split, load_run_vae(cfg, log=tqdm.write), log=tqdm.write)
    return build_dataset(cfg, split)


def default_out_dir(ckpt: str, stem: str) -> Path:
    """<run folder>/stem: beside the weights when --ckpt names a file."""
    path = Path(ckpt)
    return (path if path.is_dir() else path.parent) / stem


# --------------------------------------------------------------------------------------------
# rrepa classify
# --------------------------------------------------------------------------------------------


def cmd_classify(args: argparse.Namespace) -> None:
    """`rrepa classify`: accuracy of the training-free classifiers on a dataset split."""
    methods = list(METHODS) if args.method == "all" else [args.method]
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    out = Path(args.out) if args.out else default_out_dir(args.ckpt, f"classify-{args.split}")
    refuse_existing(args, out / "classify.json")  # before classifying anything
    device = resolve_device(args.device)
    model, info = load_run(args.ckpt, args.weights, device, warn=tqdm.write)
    info = with_vae(info, args.vae)
    K = num_classes(model)  # before loading any data: an unconditional model fails here
    dataset = dataset_for(model, info, args.split, args.data_dir, args.dataset)
    scope, precision = precision_scope(args, device, info)
    with scope:
        result = evaluate(model, dataset, methods, noise=args.noise, limit=args.limit, batch_size=args.batch_size,
                          seed=args.seed, steps=args.steps, step_size=args.step_size, max_rows=args.bayes_rows)
    out.mkdir(parents=True, exist_ok=True)
    report = {"ckpt": info["file"], "step": info["step"], "weights": info["weights"], "split": args.split,
              "noise": args.noise, "sigma": model.cfg.sigma, "seed": args.seed, "dtype": precision,
              "images": result["images"],
              "num_classes": K, "multi_step": {"steps": args.steps, "step_size": args.step_size},
              "agreement": result["agreement"], "methods": {}}
    for m, r in result["methods"].items():
        report["methods"][m] = {k: v for k, v in r.items() if k != "confusion"}
        png = out / f"confusion-{m}.png"
        save_confusion_png(r["confusion"], png, f"{m}: top-1 {100 * r['top1']:.2f}% ({result['images']} images)")
        report["methods"][m]["confusion_png"] = str(png)
        if K <= 100:
            report["methods"][m]["confusion"] = r["confusion"].tolist()
        line = f"{m:>10}: top-1 {100 * r['top1']:6.2f}%"
        if "top5" in r:
            line += f"  top-5 {100 * r['top5']:6.2f}%"
        print(line + f"  ({1000 * r['seconds_per_image']:.2f} ms/image, {result['images']} images, "
                     f"noise {args.noise}, {precision})")
    for pair, frac in result["agreement"].items():
        print(f"agreement {pair}: {100 * frac:.2f}%")
    path = out / "classify.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    print(f"wrote {path} and {len(methods)} confusion matrix PNG(s) in {out}")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """--ckpt, --weights, --noise, --seed, --data-dir, --dataset, --device (shared with `rrepa probe`)."""
    p.add_argument("--ckpt", required=True,
                   help="a .safetensors file, a run folder (its ema/model.safetensors or newest ckpt-*.pt) "
                        "or a ckpt-*.pt file")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="EMA or raw weights of a run folder / checkpoint (default ema)")
    p.add_argument("--noise", choices=NOISE_MODES, default=DEFAULT_NOISE,
                   help="classify x + sigma*eps with the model's training noise (train, default: the inputs "
                        "the model was trained on) or the clean image (clean)")
    p.add_argument("--seed", type=int, default=0, help="seed of the input noise")
    add_data_dir(p, help="dataset location (default: the run's data.path)")
    p.add_argument("--dataset", choices=("fmnist", "folder", "npz"),
                   help="dataset kind (default: the run's data.name; fmnist for a 1 x 28 x 28 model)")
    add_device(p)
    add_vae(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rrepa classify`."""
    p = sub.add_parser("classify", help="training-free classification with a class-conditional flow",
                       description="Training-free classification (R-REPA): one-step (one forward + backward "
                                   "pass, argmax of dL/dlambda at the mean embedding), multi-step (gradient "
                                   "ascent on the class logits) or the exact Bayes classifier argmax_k "
                                   "log p(x | k) (K forward passes).")
    add_common_args(p)
    add_precision(p)
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--method", choices=(*METHODS, "all"), default="one-step",
                   help="classifier (default one-step; all runs the three on the same inputs)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="multi-step: ascent steps")
    p.add_argument("--step-size", type=float, default=DEFAULT_STEP_SIZE,
                   help="multi-step: logit change of the top class per step")
    p.add_argument("--limit", type=int, help="only the first N images of the split")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--bayes-rows", type=int, help="bayes: (image, class) rows per forward pass "
                                                  "(default 4 x batch size)")
    p.add_argument("--out", help="output folder (default <run>/classify-<split>)")
    add_overwrite(p, "classify.json and confusion PNGs")
    p.set_defaults(func=cmd_classify)
