"""What a stage of work costs: wall time, peak memory, FLOPs and the bytes autograd keeps for the backward.

Peak memory is the device's own figure. On CUDA: ``torch.cuda.max_memory_allocated`` since the stage began (the
tensors, not the allocator's cache). On the CPU: the process's peak resident set (``VmHWM`` in
``/proc/self/status``), which Linux resets when "5" is written to ``/proc/self/clear_refs``, so each stage gets its
own peak; where that file cannot be written (not Linux), ``resource.getrusage``'s ru_maxrss, the peak since the
process began, which only ever grows (``Measure.memory`` says which). Child processes (torchrun workers) are
measured by ``children_peak_rss``: the largest peak RSS of a finished child.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and attention, forward
and backward; elementwise work is not counted). ``saved_bytes`` counts the distinct tensors autograd saves for the
backward pass, parameters excluded: the activation memory of a training step, which grows with the batch.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status (VmHWM, VmRSS) in bytes, None where there is no such line."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _maxrss(who: int = resource.RUSAGE_SELF) -> int:
    """ru_maxrss in bytes (kilobytes on Linux, bytes on macOS)."""
    rss = resource.getrusage(who).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def current_rss() -> int | None:
    """The process's resident set now, in bytes (VmRSS), None where /proc has no such line."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS; False where the kernel offers no way to."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """The process's peak RSS in bytes since the last reset_peak_rss (since its start where resets fail)."""
    hwm = _status_bytes("VmHWM")  # the peak resident set
    return hwm if hwm is not None else _maxrss()


def children_peak_rss() -> int:
    """The largest peak RSS in bytes of a finished child process (e.g. one torchrun worker)."""
    return _maxrss(resource.RUSAGE_CHILDREN)


@dataclass
class Measure:
    """One stage's record: seconds, peak bytes and what kind of peak (``memory``), plus free-form facts."""

    name: str
    seconds: float = 0.0
    peak_bytes: int | None = None
    memory: str = ""
    rss_bytes: int | None = None  # the process's peak RSS too, on CUDA where peak_bytes is the device's
    info: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"stage": self.name, "seconds": round(self.seconds, 3), "peak_bytes": self.peak_bytes,
                "memory": self.memory, "rss_bytes": self.rss_bytes, **self.info}


@contextlib.contextmanager
def measure(name: str, device: torch.device | str = "cpu") -> Iterator[Measure]:
    """Time the block and take its peak memory (see the module docstring) into the yielded Measure."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    m = Measure(name)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    exact = reset_peak_rss()
    t0 = time.perf_counter()
    yield m
    if cuda:
        torch.cuda.synchronize(device)
    m.seconds = time.perf_counter() - t0
    m.rss_bytes = peak_rss()
    if cuda:
        m.peak_bytes, m.memory = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        m.peak_bytes, m.memory = m.rss_bytes, "peak RSS" if exact else "peak RSS since the process began"


def num_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def tensor_bytes(module: nn.Module | None) -> int:
    """Bytes of the module's parameters and buffers."""
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def path_bytes(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


class SavedTensors:
    """Counts the bytes autograd saves for the backward while active: each distinct storage once, the
    parameters (``exclude``) not at all. Use as a context manager around a forward pass."""

    def __init__(self, exclude: list[nn.Parameter] | tuple = ()):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.seen: set[int] = set()
        self.bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. sparse): not counted
            return t
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedTensors:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _cpu_attention(q, k, v, *args, out_val=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape)


def _cpu_attention_backward(grad, q, k, v, *args, out_val=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape)


_cpu_attention._get_raw = _cpu_attention_backward._get_raw = True  # called with the tensors, not their shapes
# FlopCounterMode counts CUDA's attention kernels but not the CPU's (torch 2.14): the same formulas for it, so a
# step counts the same FLOPs on either device (causal masking is not discounted, as for CUDA).
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


@contextlib.contextmanager
def count_flops() -> Iterator[FlopCounterMode]:
    """FlopCounterMode without its printed table, CPU attention counted too; read .get_total_flops() after."""
    mode = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    with mode:
        yield mode


def human_bytes(n: int | float | None) -> str:
    """1536 -> '1.5 KiB'; None -> 'n/a'."""
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: int | float | None, unit: str = "") -> str:
    """1.2e9 -> '1.20 G'; None -> 'n/a'."""
    if n is None:
        return "n/a"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:g} {unit}".strip()
