"""The latent pipeline's costs on this machine: VAE encode / decode throughput, and a latent training step
against a pixel one (issue #12).

    python benchmarks/bench_latent.py                        # fmnist-vae; fmnist vs fmnist-latent, +/- R-REPA
    python benchmarks/bench_latent.py --vae PATH --image-size 256 --batch 16   # e.g. SD-VAE, on ImageNet sizes
    python benchmarks/bench_latent.py --skip-train --device cuda --vae random-sd --image-size 256 --batch 32

1. Throughput: the VAE (`--vae`, default the embedded fmnist-vae, trained on first use; `random-sd`: SD-VAE's
   architecture with random weights, which costs what SD-VAE costs, offline) encodes and decodes random images of
   --image-size in batches of --batch; images/s is the median over --repeats timed batches.
2. Training step: `rrepa train` runs --steps steps of each preset (pixel and latent), with and without R-REPA,
   and images/s is read from metrics.jsonl after the first log window (start-up, warm-up, and for the latent
   preset the first-use VAE training and latent encoding, excluded). The configurations are run in --rounds
   interleaved rounds (A B C D A B C D ...) and the median of the rounds is reported, so that load which comes
   and goes on a shared machine falls on all of them alike; the ratios are of numbers measured in this one run.
The idle cores measured before each configuration are printed: other load distorts absolute numbers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from common import timed, train_images_per_s
from cpu import idle_cores
from rrepa.data.vae import VAE, autoencoder_kl
from rrepa.fmnist.vae import load_vae

CONFIGS = [  # (label, preset, overrides)
    ("pixel", "fmnist", []),
    ("pixel + R-REPA", "fmnist", ["align.enabled=true"]),
    ("latent", "fmnist-latent", []),
    ("latent + R-REPA", "fmnist-latent", ["align.enabled=true"]),
]


def random_sd_vae(device: str, dtype: str) -> VAE:
    """Stable Diffusion's VAE architecture (as stabilityai/sd-vae-ft-ema's config.json gives it), random weights."""
    torch.manual_seed(0)
    model = autoencoder_kl()(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                             layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256,
                             scaling_factor=0.18215)
    return VAE(model, name="random-sd", device=device, dtype=dtype)


def throughput(args: argparse.Namespace) -> None:
    vae = (random_sd_vae(args.device, args.dtype) if args.vae == "random-sd" else
           load_vae(args.vae, device=args.device, dtype=args.dtype))
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch, vae.in_channels, args.image_size, args.image_size, generator=g) * 2 - 1)
    x = x.to(args.device)
    z = vae.encode(x)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def enc():
        vae.encode(x)
        sync()

    def dec():
        vae.decode(z, batch_size=args.batch)
        sync()

    t_enc, t_dec = timed(enc, args.repeats), timed(dec, args.repeats)
    print(f"\nVAE {args.vae} ({vae.factor}x down, {vae.latent_channels} latent channels), {args.image_size} px "
          f"-> latents {tuple(z.shape[1:])}, batch {args.batch}, {args.device}, {args.dtype}, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("| pass | images/s | ms / batch |")
    print("|---|---|---|")
    print(f"| encode (posterior mean) | {args.batch / t_enc:.0f} | {1e3 * t_enc:.1f} |")
    print(f"| decode | {args.batch / t_dec:.0f} | {1e3 * t_dec:.1f} |")


def training(args: argparse.Namespace) -> None:
    rates: dict[str, list[float]] = {label: [] for label, _, _ in CONFIGS}
    idle: dict[str, list[float]] = {label: [] for label, _, _ in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench-latent-") as tmp:
        for r in range(args.rounds):
            for k, (label, preset, sets) in enumerate(CONFIGS):
                free = idle_cores()
                if free is not None:
                    idle[label].append(free)
                rates[label].append(train_images_per_s(preset, Path(tmp) / f"c{k}", args.steps, args.log_every,
                                                       args.device, sets, args.threads, what=f"{label}")[0])
                print(f"  round {r + 1}/{args.rounds} {label}: {rates[label][-1]:.1f} images/s", flush=True)
    median = {label: statistics.median(v) for label, v in rates.items()}
    base = median["pixel"]
    print(f"\n{args.steps} steps per configuration, {args.rounds} interleaved rounds, {args.threads} thread(s), "
          f"{args.device}; batch as the presets set it (equal for both)\n")
    print("| configuration | preset | images/s (median) | rounds | step time vs pixel | idle cores before |")
    print("|---|---|---|---|---|---|")
    for label, preset, _ in CONFIGS:
        free = f"{statistics.mean(idle[label]):.1f}" if idle[label] else "n/a"
        print(f"| {label} | {preset} | {median[label]:.1f} | {', '.join(f'{v:.1f}' for v in rates[label])} | "
              f"{base / median[label]:.2f}x | {free} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="fmnist-vae",
                        help="a diffusers-layout folder, a hub id, fmnist-vae or random-sd")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=256, help="images per encode / decode batch")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=10, help="timed batches per pass")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (throughput and training)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per configuration")
    parser.add_argument("--log-every", type=int, default=20, help="steps per measured window (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the training configurations")
    parser.add_argument("--skip-train", action="store_true", help="only the VAE throughput")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    throughput(args)
    if not args.skip_train:
        training(args)


if __name__ == "__main__":
    main()
