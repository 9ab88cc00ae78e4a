"""What a training run shows: the running averages of its log lines (`Window`), rank 0's outputs
(`RunLog`: metrics.jsonl, TensorBoard, sample grids, the loss curve) and the summary at its end
(`final_summary`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from rrepa import distributed
from rrepa.distributed import Dist
from rrepa.flow.sample import draw, save_grid
from rrepa.flow.tarflow import TARFlow


class Window:
    """Loss, grad norm, the objective's named terms (`keys`, e.g. nll, align_loss, align_t4_l2) and the
    throughput since the last log line, averaged over the steps that were not skipped."""

    def __init__(self, device: torch.device, keys: list[str], latent: bool = False):
        self.latent = latent  # bits per latent dimension: no 8-bit offset
        self.keys = ["loss", "grad_norm", *keys]
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=device)
        self.steps = torch.zeros((), dtype=torch.float64, device=device)  # finite steps in the window
        self.seconds, self.images = 0.0, 0

    def add(self, loss: Tensor, grad_norm: Tensor, logs: dict[str, Tensor]) -> None:
        values = {"loss": loss, "grad_norm": grad_norm, **logs}
        self.sums += torch.stack([values[k].detach().double().reshape(()) for k in self.keys])
        self.steps += 1

    def tick(self, seconds: float, images: int) -> None:
        self.seconds += seconds
        self.images += images

    def flush(self, d: Dist) -> dict:
        """The averages as a log row; a collective (every process calls it)."""
        sums = distributed.all_reduce_mean(torch.cat([self.sums, self.steps[None]]), d).tolist()
        n = sums[-1]
        mean = {k: s / n if n else float("nan") for k, s in zip(self.keys, sums)}
        row = {"loss": mean["loss"], "nll": mean["nll"],
               # bits/dim of the noisy training images (nats -> bits, plus log2(128) for the 8-bit scale):
               # a running proxy; bpd.json holds the dequantized test figure. A latent run: bits per latent
               # dimension of the noisy latents (no 8-bit scale).
               "bpd": mean["nll"] / math.log(2) + (0.0 if self.latent else 7.0), "grad_norm": mean["grad_norm"],
               "images_per_s": self.images / max(self.seconds, 1e-9),
               **{k: v for k, v in mean.items() if k.startswith("align")}}  # unweighted -cos, in [-1, 1]
        self.sums.zero_()
        self.steps.zero_()
        self.seconds, self.images = 0.0, 0
        return row


class RunLog:
    """Rank 0's outputs: metrics.jsonl, TensorBoard, sample grids and the loss curve."""

    def __init__(self, run_dir: Path, step: int, to_images: Callable[[Tensor], Tensor] | None = None):
        """to_images: the run's model-space -> image map for the grids (data.latent_run.ImageSpace; None: pixels)."""
        self.run_dir = run_dir
        self.to_images = to_images
        self.metrics = run_dir / "metrics.jsonl"
        if self.metrics.exists():  # a resumed run rewrites the steps after its checkpoint
            rows = [r for r in self.metrics.read_text().splitlines() if r and json.loads(r)["step"] <= step]
            self.metrics.write_text("".join(r + "\n" for r in rows))
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard may be missing
        except ImportError:
            tqdm.write("warning: tensorboard is not installed; writing metrics.jsonl only (pip install tensorboard)")
            self.tb = None
        else:
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=step or None)

    def write(self, row: dict, prefix: str = "train") -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{prefix}/{k}", v, row["step"])

    def write_eval(self, step: int, res: dict) -> None:
        """One metrics.jsonl line {step, eval_fid, eval_is, ...} and TensorBoard scalars eval/fid, ..."""
        row = {"step": step, **{f"eval_{k}": v for k, v in res.items()
                                if v is None or isinstance(v, (int, float, str))}}
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in res.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"eval/{k}", v, step)

    def grid(self, ema: TARFlow, z: Tensor, y: Tensor | None, cols: int, guidance: float, step: int) -> None:
        """Samples of the EMA weights from the fixed noise z (rows x cols, one column per class), as images (a latent
        run's samples are denoised in latent space, then decoded)."""
        device = next(ema.parameters()).device
        x = draw(ema, z.to(device), None if y is None else y.to(device), guidance)
        x = x if self.to_images is None else self.to_images(x)
        path = self.run_dir / "samples" / f"step-{step:07d}.png"
        save_grid(x, path, cols)
        if self.tb is not None:
            with Image.open(path) as im:
                self.tb.add_image("samples", np.asarray(im), step, dataformats="HW" if x.shape[1] == 1 else "HWC")

    def loss_curve(self) -> None:
        import matplotlib  # heavy; only for this plot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in (json.loads(r) for r in self.metrics.read_text().splitlines() if r) if "bpd" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in rows], [r["bpd"] for r in rows])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (bits per latent dim of noisy latents)" if getattr(self.to_images, "latent", False)
                      else "training loss (bits/dim of noisy images)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.run_dir / "loss.png", dpi=120)
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def final_summary(run_dir: Path, step: int, grid_guidance: float | None, final_eval: dict | None, bpd: float | None,
                  latent: bool, eval_guidance: float, reference: str) -> str:
    """The lines a run ends with: where its last sample grid is, the evaluation of its last step (FID and class
    accuracy, when train.eval_every reached it), the test bits/dim (per pixel, or per latent dimension), and the
    commands that look further. grid_guidance None: the run drew no grid (train.sample_rows=0)."""
    lines = [f"  samples      {run_dir / 'samples' / f'step-{step:07d}.png'} (EMA weights, guidance "
             f"{grid_guidance:g}; one column per class)" if grid_guidance is not None
             else "  samples      none (train.sample_rows=0)"]
    if final_eval is not None:
        left_out = f", {final_eval['diverged']} diverged and left out" if final_eval.get("diverged") else ""
        lines.append(f"  FID          {final_eval['fid']:.2f} ({final_eval['num_samples']} samples{left_out} at "
                     f"guidance {eval_guidance:g} against {reference}, feature network {final_eval['feature_network']})"
                     if final_eval["fid"] is not None else f"  FID          none: {final_eval['diverged']} of "
                     f"{final_eval['diverged'] + final_eval['num_samples']} samples diverged (NaN or inf)")
        if final_eval.get("class_accuracy") is not None:
            lines.append(f"  class acc.   {100 * final_eval['class_accuracy']:.1f} % (conditional samples the "
                         f"evaluator labels as their class)")
        if final_eval.get("bayes_top1") is not None:
            lines.append(f"  classifier   one-step top-1 {100 * final_eval['one_step_top1']:.1f} %, Bayes top-1 "
                         f"{100 * final_eval['bayes_top1']:.1f} % ({final_eval['test_images']} test images)")
    if bpd is not None:
        lines.append(f"  bits/dim     {bpd:.4f} (test split, null label, "
                     f"{'per latent dimension' if latent else 'per pixel'}; bpd.json)")
    lines.append(f"  next         rrepa sample --ckpt {run_dir} · rrepa evaluate --ckpt {run_dir} · "
                 f"rrepa classify --ckpt {run_dir} (docs/getting-started.md)")
    return "\n".join(lines)
