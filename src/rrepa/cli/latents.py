"""`rrepa latents encode`: encode a dataset once with a VAE into a memory-mapped latent cache (rrepa.data.latents)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rrepa.cli.options import add_data_dir, add_device
from rrepa.data.datasets import DATASET_NAMES, DataConfig
from rrepa.data.latents import DTYPES, SHARD_SIZE, LatentCache, image_dataset
from rrepa.distributed import resolve_device
from rrepa.fmnist.vae import load_vae

VAE_DTYPES = ("float32", "bfloat16")  # rrepa.data.vae.VAE computes in these (bf16: autocast)


def data_config(data: str, data_dir: str | None, image_size: int | None) -> DataConfig:
    """--data NAME_OR_PATH (+ --data-dir, --image-size) -> the DataConfig of rrepa.data: a dataset name (fmnist;
    folder / npz with --data-dir), or a path: an .npz file or a folder of them (npz), else an image folder."""
    if data in DATASET_NAMES:
        name, path = data, data_dir
    else:
        if data_dir:
            raise ValueError(f"--data {data} is a path; --data-dir goes with a dataset name "
                             f"({', '.join(DATASET_NAMES)})")
        p = Path(data)
        if not p.exists():
            raise ValueError(f"--data {data}: no such file or folder (or give a dataset name: "
                             f"{', '.join(DATASET_NAMES)})")
        npz = p.suffix == ".npz" or (p.is_dir() and any(p.glob("*.npz")))
        name, path = ("npz" if npz else "folder"), str(p)
    if image_size is None:
        if name != "fmnist":
            raise ValueError(f"--image-size is required for a {name} dataset (e.g. 256 for SD-VAE on ImageNet)")
        image_size = 28
    return DataConfig(name=name, path=path, image_size=image_size)


def cmd_encode(args: argparse.Namespace) -> None:
    """Encode --data's --split with --vae into the cache --out (resumed when it is half done)."""
    device = resolve_device(args.device)
    cfg = data_config(args.data, args.data_dir, args.image_size)
    dataset = image_dataset(cfg, args.split)  # before the VAE: a bad --data fails fast
    vae = load_vae(args.vae, device, args.vae_dtype)
    # DIR/<split>: the layout `rrepa train --set data.latent_cache=DIR` reads, so that training reuses the cache.
    out = Path(args.out) / args.split
    cache = LatentCache.build_or_open(out, vae, dataset, split=args.split, flip=args.flip, sample=args.sample,
                                      seed=args.seed, dtype=args.dtype, batch_size=args.batch_size,
                                      shard_size=args.shard_size, num_workers=args.num_workers, device=device,
                                      rebuild=args.rebuild)
    c, h, w = cache.latent_shape
    flips = " (and the latents of their mirrors)" if cache.flips else ""
    print(f"wrote {cache.path}: {len(cache)} latents{flips} of shape {c} x {h} x {w}, stored as {cache.dtype} "
          f"(round trip |z_stored - z| / std: max {cache.roundtrip['max']:.1e}, rms {cache.roundtrip['rms']:.1e}), "
          f"posterior {cache.manifest['mode']}s of {cache.manifest['vae']['name']}; train on it with --set "
          f"data.latent_cache={args.out}" + (" --set data.hflip=true" if cache.flips else ""))


def register(sub: argparse._SubParsersAction) -> None:
    """Register `rrepa latents encode` on the top-level sub-parsers."""
    p = sub.add_parser("latents", help="VAE latent caches (encode a dataset once for latent flows)")
    lsub = p.add_subparsers(dest="latents_command", required=True, metavar="ACTION")
    e = lsub.add_parser("encode", help="encode a dataset with a VAE into a memory-mapped latent cache",
                        description="Encode every image of a dataset split once with a VAE into DIR/<split>: shards "
                                    "of "
                                    "latents and labels and a manifest. A killed run resumes at its first incomplete "
                                    "shard; a cache of another VAE, data, size or mode is refused unless --rebuild.")
    e.add_argument("--vae", required=True, metavar="PATH_OR_ID",
                   help="the VAE: a diffusers folder, a hub id, or fmnist-vae (the shipped one)")
    e.add_argument("--vae-dtype", choices=VAE_DTYPES, default="float32", help="the VAE's compute dtype")
    e.add_argument("--data", required=True, metavar="NAME_OR_PATH",
                   help="fmnist (with optional --data-dir), folder / npz with --data-dir, or a path: an ImageNet-"
                        "layout image folder, an .npz file or a folder of them")
    add_data_dir(e, help="where the named dataset is (as `rrepa train --data-dir`)")
    e.add_argument("--split", choices=("train", "test"), default="train")
    e.add_argument("--out", required=True, metavar="DIR",
                   help="the cache root, as data.latent_cache: the split's cache goes into DIR/<split> (new, or a "
                        "cache to finish), where `rrepa train --set data.latent_cache=DIR` finds it")
    e.add_argument("--image-size", type=int, help="image side in pixels (default 28 for fmnist, which is resized "
                                                  "to another size; required for folder / npz)")
    e.add_argument("--flip", action="store_true", help="also store the latents of the horizontally flipped images")
    e.add_argument("--sample", action="store_true", help="store one posterior sample per image (default: its mean)")
    e.add_argument("--seed", type=int, default=0, help="seed of --sample's draws")
    e.add_argument("--dtype", choices=DTYPES, default="float16", help="storage dtype (float16 halves the disk)")
    e.add_argument("--batch-size", type=int, default=64, help="images per VAE call")
    e.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="images per shard (the unit of resumption)")
    e.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes reading the images")
    add_device(e)
    e.add_argument("--rebuild", action="store_true", help="re-encode a cache that does not match (or any)")
    e.set_defaults(func=cmd_encode)
