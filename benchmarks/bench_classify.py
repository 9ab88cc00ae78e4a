"""Cost of the training-free classifiers: one-step vs multi-step vs the exact Bayes classifier.

Prints, as a Markdown table, the median time per image of
  - one-step: one forward + one backward pass per batch, whatever K is;
  - multi-step: `--steps` of those (default 10);
  - bayes: K forward passes per image, batched as (image, class) rows;
for the `fmnist` preset (K = 10) and a small random 3 x 32 x 32 model with K = 10 and K = 1000 (the same
network apart from the class tables, so the K = 10 -> 1000 change is the classes' cost alone). The
models have random non-zero proj_out weights, so they do a trained model's arithmetic. All figures come
from one run, so the ratios are comparable; absolute times depend on the machine and its load.

With --ckpt, also classifies the first --limit test images of the checkpoint's dataset with all three
methods on the same inputs and prints how often they agree.

    python benchmarks/bench_classify.py [--threads 2] [--repeats 3] [--batch 16] [--ckpt RUN_OR_FILE]
"""

from __future__ import annotations

import argparse

import torch

from common import timed, trained_like
from rrepa.cli.classify import dataset_for
from rrepa.eval.classify import class_log_likelihoods, evaluate, multi_step_logits, one_step_scores
from rrepa.flow.config import FlowConfig
from rrepa.training.config import preset_model
from rrepa.training.run import load_run

SMALL = dict(in_channels=3, image_height=32, image_width=32, patch_size=4, width=128, num_blocks=4,
             layers_per_block=2)
CONFIGS = {
    "fmnist preset": preset_model("fmnist"),
    "32x32x3 p4, K=10": FlowConfig(**SMALL, num_classes=10),
    "32x32x3 p4, K=1000": FlowConfig(**SMALL, num_classes=1000),
}




def bench(cfg: FlowConfig, batch: int, repeats: int, steps: int, bayes_rows: int) -> dict:
    model = trained_like(cfg, class_embed_std=0.5)
    x = torch.rand(batch, cfg.in_channels, cfg.image_height, cfg.image_width) * 2 - 1
    one = timed(lambda: one_step_scores(model, x), repeats) / batch
    multi = timed(lambda: multi_step_logits(model, x, steps), max(1, repeats // 2)) / batch
    if cfg.num_classes >= 100:
        # K forward rows per image: 2 images already fill K * 2 / bayes_rows passes, so the time per image
        # is that of a full batch; one timed call, no warm-up (its first pass warms up).
        xb = x[:2]
        bayes = timed(lambda: class_log_likelihoods(model, xb, bayes_rows), 1, warmup=False) / len(xb)
    else:
        bayes = timed(lambda: class_log_likelihoods(model, x, bayes_rows), max(1, repeats // 2)) / batch
    return {"K": cfg.num_classes, "one": one, "multi": multi, "bayes": bayes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="images per batch")
    ap.add_argument("--steps", type=int, default=10, help="multi-step: ascent steps")
    ap.add_argument("--bayes-rows", type=int, default=256, help="(image, class) rows per Bayes forward pass")
    ap.add_argument("--ckpt", help="also measure the agreement of the classifiers on this checkpoint")
    ap.add_argument("--limit", type=int, default=500, help="test images for the agreement")
    ap.add_argument("--data-dir", help="dataset location for --ckpt (default: the run's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, multi-step {args.steps} steps, "
          f"median of {args.repeats} (multi-step and Bayes: {max(1, args.repeats // 2)})\n")
    print("| model | K | one-step ms/img | multi-step ms/img | Bayes ms/img | Bayes / one-step | multi / one |")
    print("|---|---|---|---|---|---|---|")
    for name, cfg in CONFIGS.items():
        r = bench(cfg, args.batch, args.repeats, args.steps, args.bayes_rows)
        print(f"| {name} | {r['K']} | {1e3 * r['one']:.2f} | {1e3 * r['multi']:.2f} | {1e3 * r['bayes']:.2f} | "
              f"{r['bayes'] / r['one']:.1f}x | {r['multi'] / r['one']:.1f}x |", flush=True)

    if args.ckpt:
        model, info = load_run(args.ckpt)
        dataset = dataset_for(model, info, "test", args.data_dir, None)
        res = evaluate(model, dataset, ["one-step", "multi-step", "bayes"], limit=args.limit,
                       batch_size=args.batch, steps=args.steps, max_rows=args.bayes_rows, progress=False)
        print(f"\n{info['file']}: {res['images']} test images, noise train\n")
        print("| method | top-1 % | s/img |")
        print("|---|---|---|")
        for m, r in res["methods"].items():
            print(f"| {m} | {100 * r['top1']:.2f} | {r['seconds_per_image']:.4f} |")
        print()
        for pair, frac in res["agreement"].items():
            print(f"agreement {pair}: {100 * frac:.2f}%")


if __name__ == "__main__":
    main()
