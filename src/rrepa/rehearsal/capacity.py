"""The GPU capacity plan of a preset, from what its rehearsal (rrepa.rehearsal.rehearse) measured: memory per GPU at the
paper's batch (weights, gradients, AdamW state, EMA, the frozen networks, and activations per sample measured at
two batch sizes and extrapolated), whether that fits, with and without activation checkpointing, and the GPU-hours
of the paper's schedule from the FLOPs of a step at a stated utilisation.

The model, per GPU, at micro-batch B (images per process per forward pass):

    memory(B) = base + static + a * B
    static    = flow and projector weights (fp32) + their gradients (fp32) + AdamW's two moments (fp32) + EMA
                weights (fp32) + the frozen encoder (+ the VAE of a latent run, which training keeps for its grids)
    a         = activation bytes per sample: the larger of the slope of the probe's peak memory between its two
                batch sizes and the slope of the bytes autograd saved for the backward (measure.SavedTensors;
                on the CPU the peak RSS is coarse: the allocator keeps freed memory)
    base      = what the process holds besides tensors: on the CPU its resident set before the probe (libraries,
                data); on a GPU 0 (max_memory_allocated counts tensors), with `reserve` of the card kept free for
                the CUDA context and the allocator's fragmentation

Activation checkpointing of every transformer layer would keep each layer's input (N x width fp32 per sample and
layer pass) plus one layer's activations at a time: a_ckpt = passes * N * width * 4 + a / passes, with `passes`
the layer passes of a step (the flow's layers, plus the pseudo-reverse's parallel passes of the aligned blocks and
their feature passes). That is an estimate unless the rehearsal itself trained with the switch
(`--set train.activation_checkpointing=true`); optim.grad_accum is the other remedy, at the same memory per pass.

GPU time = FLOPs per image (probe: flow forward + backward with the alignment, plus the encoder's forward) x
batch x steps / (GPUs x peak FLOP/s x utilisation). The peak is the card's dense bf16 figure (H100 SXM: 989
TFLOP/s); 40 % utilisation is typical of well-fed transformer training, and the plan says which it assumed.
"""

from __future__ import annotations

import math

from rrepa.flow.config import FlowConfig
from rrepa.rehearsal.measure import human_bytes, human_count
from rrepa.training.config import resolve

GIB = 2**30
H100_BF16_TFLOPS = 989.0


def _probes(report: dict) -> tuple[dict, dict]:
    probes = sorted((s for s in report["stages"] if s["stage"].startswith("probe")), key=lambda s: s["batch"])
    if len(probes) < 2:
        raise ValueError(f"the rehearsal of {report['preset']} has no probe at two batch sizes (was the probe stage "
                         f"skipped?); rehearse it again without --skip probe")
    return probes[0], probes[-1]


def layer_passes(model: FlowConfig, positions: list, strategy: str, reverse: str) -> int:
    """Transformer layer passes of one training step's forward: every block's layers, plus for R-REPA's
    pseudo-reverse one parallel pass of each block from the first aligned one to the last and a feature pass
    up to each aligned layer (docs/DESIGN.md section 2)."""
    passes = sum(model.layers(t) for t in range(1, model.num_blocks + 1))
    if positions and strategy == "reverse" and reverse == "pseudo":
        first = min(t for t, _ in positions)
        passes += sum(model.layers(t) for t in range(first, model.num_blocks + 1)) + sum(l for _, l in positions)
    elif positions and strategy == "detach":
        passes += sum(l for _, l in positions)
    return passes


def plan(report: dict, gpus: int = 8, gpu_memory_gb: float = 80.0, tflops: float = H100_BF16_TFLOPS,
         utilisation: float = 0.4, reserve: float = 0.1) -> dict:
    """The capacity plan (a JSON-ready dict) of the preset a rehearsal report measured; see the module docstring."""
    if gpus < 1 or gpu_memory_gb <= 0 or tflops <= 0 or not 0 < utilisation <= 1 or not 0 <= reserve < 1:
        raise ValueError(f"need gpus >= 1, gpu memory > 0, TFLOP/s > 0, 0 < utilisation <= 1 and 0 <= reserve < 1; "
                         f"got {gpus}, {gpu_memory_gb}, {tflops}, {utilisation}, {reserve}")
    f = report["facts"]
    lo, hi = _probes(report)
    db = hi["batch"] - lo["batch"]
    slope_peak = (hi["peak_bytes"] - lo["peak_bytes"]) / db
    slope_saved = (hi["saved_bytes"] - lo["saved_bytes"]) / db
    act = max(slope_peak, slope_saved)
    flops = (hi["flops"] - lo["flops"]) / db + f.get("encoder_flops_per_image", 0)
    vae = next((s.get("params", 0) * 4 for s in report["stages"] if s["stage"] == "vae"), 0)
    static = {"weights": f["weights_bytes"], "gradients": f["grad_bytes"], "adamw": f["adam_bytes"],
              "ema": f["ema_bytes"], "encoder": f["encoder_bytes"], "vae": vae}
    static_total = sum(static.values())
    gpu_measured = "cuda" in hi["memory"]
    base = 0 if gpu_measured else (f.get("rss_before_probe") or 0)

    preset = resolve(report["preset"])  # the paper's recipe: batch, steps
    batch, steps = preset.optim.batch_size, preset.train.steps
    cfg = report["config"]
    model = FlowConfig.from_dict(cfg["model"])
    a = cfg["align"]
    passes = layer_passes(model, a["positions"] if a["enabled"] else [], a["strategy"], a["reverse"])
    act_ckpt = passes * model.num_tokens * model.width * 4 + act / passes
    usable = gpu_memory_gb * 1e9 * (1 - reserve)

    def fit(per_sample: float) -> dict:
        micro = batch // gpus
        need = static_total + per_sample * micro
        accum = next((k for k in range(1, micro + 1) if micro % k == 0 and static_total + per_sample * micro / k
                      <= usable), None)
        return {"micro_batch": micro, "bytes": need, "fits": need <= usable, "grad_accum": accum,
                "largest_micro_batch": max(0, int((usable - static_total) // per_sample)) if per_sample else micro}

    seconds = flops * batch * steps / (gpus * tflops * 1e12 * utilisation)
    rehearsal_batch = f.get("train_batch")
    check = None
    checkpointed = bool(cfg["train"].get("activation_checkpointing"))  # how the rehearsal's training stage ran
    if rehearsal_batch and f.get("train_peak_bytes"):
        predicted = base + static_total + (act_ckpt if checkpointed else act) * rehearsal_batch
        check = {"batch": rehearsal_batch, "checkpointed": checkpointed, "predicted": predicted,
                 "measured": f["train_peak_bytes"],
                 "ratio": f["train_peak_bytes"] / predicted, "memory": f.get("train_memory")}
    if batch % gpus:
        raise ValueError(f"the preset's batch {batch} does not split over {gpus} GPUs; pick a divisor of {batch}")
    return {"preset": report["preset"], "measured_on": report["device"], "scale": report["scale"],
            "precision": f.get("precision"), "gpus": gpus, "gpu_memory_gb": gpu_memory_gb, "reserve": reserve,
            "batch": batch, "steps": steps, "static": static, "static_total": static_total,
            "activations_per_sample": act, "activations_per_sample_peak": slope_peak,
            "activations_per_sample_saved": slope_saved, "layer_passes": passes,
            "activations_per_sample_checkpointed": act_ckpt, "plain": fit(act), "checkpointed": fit(act_ckpt),
            "flops_per_image": flops, "tflops": tflops, "utilisation": utilisation,
            "wall_hours": seconds / 3600, "gpu_hours": seconds * gpus / 3600, "check": check}


def format_plan(p: dict) -> str:
    """The plan as Markdown."""
    g = p["gpus"]
    lines = [f"## Capacity plan: {p['preset']} on {g} x {p['gpu_memory_gb']:g} GB",
             "", f"From the rehearsal on {p['measured_on']} ({p['scale']} scale, {p['precision']}). The paper's "
             f"recipe: global batch {p['batch']} ({p['batch'] // g} per GPU), {p['steps']:,} steps.", "",
             "| per GPU | bytes |", "|---|---|"]
    lines += [f"| {k} | {human_bytes(v)} |" for k, v in p["static"].items() if v]
    lines += [f"| static in all | {human_bytes(p['static_total'])} |",
              f"| activations per image (peak slope {human_bytes(p['activations_per_sample_peak'])}, saved tensors "
              f"{human_bytes(p['activations_per_sample_saved'])}) | {human_bytes(p['activations_per_sample'])} |",
              f"| activations per image with checkpointing ({p['layer_passes']} layer passes; estimate) | "
              f"{human_bytes(p['activations_per_sample_checkpointed'])} |", ""]
    usable = p["gpu_memory_gb"] * (1 - p["reserve"])
    for name, key in (("without activation checkpointing", "plain"),
                      ("with activation checkpointing (train.activation_checkpointing=true)", "checkpointed")):
        r = p[key]
        verdict = "fits" if r["fits"] else (f"does not fit; optim.grad_accum={r['grad_accum']} does "
                                            f"({r['micro_batch'] // r['grad_accum']} per pass)" if r["grad_accum"]
                                            else "does not fit even one image per pass")
        lines.append(f"- {name}: {r['micro_batch']} images per GPU need {human_bytes(r['bytes'])} of {usable:.0f} GB "
                     f"usable ({p['reserve']:.0%} kept free): {verdict}; at most {r['largest_micro_batch']} images "
                     f"per pass.")
    lines.append(f"- compute: {human_count(p['flops_per_image'], 'FLOP')} per image and step; at "
                 f"{p['utilisation']:.0%} of {p['tflops']:g} TFLOP/s per GPU, {p['steps']:,} steps take "
                 f"{p['wall_hours']:,.0f} h on {g} GPUs ({p['gpu_hours']:,.0f} GPU-hours, "
                 f"{p['wall_hours'] / 24:,.1f} days).")
    c = p["check"]
    if c:
        lines.append(f"- check: at the rehearsal's batch {c['batch']}"
                     f"{' with activation checkpointing' if c.get('checkpointed') else ''} the model predicts "
                     f"{human_bytes(c['predicted'])}, the training stage peaked at {human_bytes(c['measured'])} "
                     f"({c['memory']}): "
                     f"{c['ratio']:.2f}x the prediction.")
    if "cuda" not in str(p["measured_on"]).lower() and not math.isnan(p["activations_per_sample"]):
        lines.append("- measured on a CPU: activation bytes follow the CPU's precision and kernels (attention stays "
                     "float32 there); rehearse on the GPU for its own figures.")
    return "\n".join(lines)
