"""Speed of the flow core: one training step and sampling with the KV cache.

For the `fmnist` preset and a tiny 32 x 32 x 3 model (patch 4 and patch 2, 4 blocks x 2 layers,
width 128, batch 32), prints the median time of
  - a training step: forward + backward + AdamW on the per-dimension NLL, batch 32;
  - sampling 16 images by inverting the flow with the KV cache (no denoising), with and without
    guidance, and the same without the cache (every step recomputes the whole prefix: the speed-up
    of the cache; measured once, and only for N <= 100 tokens unless --full, as it takes minutes).
All figures come from one run on this machine, so the ratios are comparable; absolute times
depend on the machine and its load.

    python benchmarks/bench_flow.py [--threads 2] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse

import torch

from common import timed, trained_like
from rrepa.flow.config import FlowConfig
from rrepa.training.config import preset_model

CONFIGS = {
    "fmnist": preset_model("fmnist"),
    "32x32x3 p4": FlowConfig(in_channels=3, image_height=32, image_width=32, patch_size=4, width=128,
                             num_blocks=4, layers_per_block=2, num_classes=10),
    "32x32x3 p2": FlowConfig(in_channels=3, image_height=32, image_width=32, patch_size=2, width=128,
                             num_blocks=4, layers_per_block=2, num_classes=10),
}




def bench(name: str, cfg: FlowConfig, repeats: int, batch: int, n_samples: int, full: bool) -> dict:
    model = trained_like(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
    x = torch.rand(batch, cfg.in_channels, cfg.image_height, cfg.image_width) * 2 - 1
    y = torch.randint(0, cfg.num_classes, (batch,))

    def train_step():
        loss = model.nll(x, y, label_drop=0.1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    z = torch.randn(n_samples, cfg.in_channels, cfg.image_height, cfg.image_width)
    ys = torch.arange(n_samples) % cfg.num_classes
    t_train = timed(train_step, repeats)
    t_kv = timed(lambda: model.reverse(z, ys, kv_cache=True), repeats)
    t_kv_cfg = timed(lambda: model.reverse(z, ys, guidance=1.0, kv_cache=True), max(1, repeats // 2))
    t_prefix = None
    if full or cfg.num_tokens <= 100:
        t_prefix = timed(lambda: model.reverse(z, ys, kv_cache=False), 1, warmup=False)
    return dict(name=name, params=model.num_params(), tokens=cfg.num_tokens, train=t_train, kv=t_kv,
                kv_cfg=t_kv_cfg, prefix=t_prefix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="one repeat, for a smoke test")
    ap.add_argument("--full", action="store_true", help="also time the prefix-recompute reverse for N > 100")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.samples} samples, median of {repeats}\n")
    print("| config | params | tokens N | train step (s) | sample, KV cache (s) | sample, KV cache + guidance (s) "
          "| sample, prefix recompute (s) | KV-cache speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg in CONFIGS.items():
        r = bench(name, cfg, repeats, args.batch, args.samples, args.full)
        prefix = "—" if r["prefix"] is None else f"{r['prefix']:.3f}"
        speedup = "—" if r["prefix"] is None else f"{r['prefix'] / r['kv']:.1f}x"
        print(f"| {r['name']} | {r['params'] / 1e6:.2f} M | {r['tokens']} | {r['train']:.3f} | {r['kv']:.3f} | "
              f"{r['kv_cfg']:.3f} | {prefix} | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
