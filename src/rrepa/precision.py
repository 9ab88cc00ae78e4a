"""Numeric precision of a run: one setting, `auto | fp32 | bf16`, for every device (docs/DESIGN.md section 13).

bf16 is bfloat16 autocast: the transformers' matrix products run in bfloat16, while everything whose error would
accumulate stays float32 by construction (master weights, AdamW state, EMA, the affine transform and its
log-determinant, the NLL and bits/dim, the alignment loss, the denoising score step; attention on the CPU, whose
bfloat16 kernels are slower than its float32 ones). `auto` picks bf16 where the device computes it natively and
fp32 elsewhere:

    CUDA   torch.cuda.is_bf16_supported() (compute capability >= 8.0: Ampere, Hopper, ...)
    x86    the CPU has AVX512_BF16 or AMX tiles (torch.cpu._is_avx512_bf16_supported / _is_amx_tile_supported,
           i.e. the cpuinfo flags avx512_bf16, amx_tile); oneDNN runs bfloat16 matrix products on them
    arm64  the CPU reports the BF16 extension (`bf16` in /proc/cpuinfo's Features)

Elsewhere oneDNN emulates bfloat16 through float32 (slower than float32 itself), so `auto` stays in fp32; `bf16`
forces it anyway.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def check_precision(precision: str, what: str = "precision") -> str:
    """precision itself, or a one-line ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bfloat16 matrix products natively (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return cpu_has_native_bf16()


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX on x86; the BF16 extension on arm64. False where it cannot be told."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(check() for check in checks if check is not None)
    if machine in ("aarch64", "arm64"):
        try:
            info = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return any(line.startswith("Features") and "bf16" in line.split(":", 1)[-1].split()
                   for line in info.splitlines())
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"auto" -> "bf16" where the device computes it natively, else "fp32"; "fp32" and "bf16" as given."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def resolve_for_run(setting: str | None, info: dict | None, device: torch.device | str) -> str:
    """`setting` (auto | fp32 | bf16), else the precision the run trained in (training.run.load_run's info: its stored
    config's train.precision; fp32 where it says nothing: runs from before the setting, whose CPU runs computed
    float32, and bare weights files), resolved on `device`."""
    train = ((info or {}).get("config") or {}).get("train") or {}
    return resolve_precision(setting or train.get("precision") or "fp32", device)


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context that runs a resolved precision on `device`: bfloat16 autocast for "bf16", nothing for "fp32"."""
    if check_precision(precision) == "auto":
        raise ValueError("autocast takes a resolved precision (fp32 or bf16); resolve 'auto' with resolve_precision")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def float32(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast off inside a bf16 region: for the computations that stay float32 by design."""
    return torch.autocast(torch.device(device).type, enabled=False)


def bf16_active(device: torch.device | str) -> bool:
    """Whether bf16 autocast is on for `device`'s type here (inside precision.autocast("bf16", ...))."""
    kind = torch.device(device).type
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16


def describe(precision: str, setting: str) -> str:
    """A short note for logs, e.g. "bf16 (auto: native bfloat16)"; a setting other than auto as it is."""
    if setting == "auto":
        return f"{precision} (auto: {'native bfloat16' if precision == 'bf16' else 'no native bfloat16'})"
    return precision
