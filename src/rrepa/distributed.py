"""torchrun support: process group set-up and the global data order.

Under `torchrun --nproc_per_node N` the environment names this process (RANK, LOCAL_RANK, WORLD_SIZE);
without it the run is a single process and nothing here touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rrepa.utils import generator


@dataclass(frozen=True)
class Dist:
    rank: int = 0  # global rank of this process
    local_rank: int = 0  # rank on this machine (selects the GPU)
    world_size: int = 1  # processes in the job
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, samples and writes checkpoints."""
        return self.rank == 0


def resolve_device(device: str) -> torch.device:
    """A single-process device from a --device flag: auto (CUDA when available), cpu, cuda or cuda:N."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but CUDA is not available on this machine; use --device "
                         f"cpu (or auto)")
    return torch.device(device)


def setup(device: str = "auto") -> Dist:
    """Start the process group when launched by torchrun (NCCL on GPU, gloo on CPU) and pick the device."""
    if device != "auto":
        resolve_device(device)  # one line for an unknown device or CUDA without a GPU, before any CUDA call
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    elif world > 1:
        # Processes on one machine share its cores; oversubscribing them slows every process down.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, local_rank, world, dev)


def teardown(wait: bool = True) -> None:
    """End the process group; wait=True first lets every process finish (a normal exit)."""
    if dist.is_initialized():
        # Objects of the run caught in reference cycles (the collectives, all_gather_object above all, leave some)
        # would otherwise die in interpreter finalization, after the group, where gloo intermittently aborts the
        # process ("terminate called without an active exception"). benchmarks/bench_ddp_exit.py counts those
        # aborts: 4 of 50 torchrun launches without this collection, 0 of 50 with it (torch 2.14, loaded 2-core
        # machine); tests/test_distributed.py checks that the cycles die while the group is alive.
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[Dist]:
    """setup(); on a normal exit wait for every process, on an error leave at once (the other processes
    may never reach the barrier)."""
    d = setup(device)
    try:
        yield d
    except BaseException:
        teardown(wait=False)
        raise
    teardown()


@contextlib.contextmanager
def all_cores(d: Dist) -> Iterator[None]:
    """Rank 0's solo work (evaluation, sample grids) on every core of the machine, then its share again.

    Under CPU DDP each process has cores // local processes threads (setup). While rank 0 evaluates or draws
    a grid, the others block in their next collective, and gloo waits without spinning (measured: a waiting
    rank used no CPU during a 60 s evaluation), so their cores would idle. Nothing changes on GPU or in a
    single process."""
    if d.world_size == 1 or d.device.type != "cpu" or not d.is_main:
        yield
        return
    share = torch.get_num_threads()
    torch.set_num_threads(max(share, os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(share)


@contextlib.contextmanager
def main_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first, on every core (all_cores), while the others wait; then the others run it. For
    a cache that rank 0 builds (with its progress bar) and the others then open. An error in rank 0's block
    propagates without releasing the others: torchrun ends them when rank 0 exits."""
    if d.world_size == 1:
        yield
        return
    if not d.is_main:
        dist.barrier()
        yield
        return
    with all_cores(d):
        yield
    dist.barrier()


def all_reduce_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean over processes of a tensor (identity in a single process)."""
    if d.world_size > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= d.world_size
    return values


def any_true(flag: bool, d: Dist) -> bool:
    """True when flag is True on any process (every process gets the same answer)."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: object, d: Dist) -> list[object]:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if d.world_size == 1:
        return [obj]
    out: list[object] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's micro-batches of one epoch, cut from a seeded permutation of the whole dataset.

    Epoch e shuffles all n indices with the seed (seed, e) and cuts them into global batches of
    batch_size (the incomplete last one is dropped). Global batch b is split into world_size * grad_accum
    equal micro-batches; micro-step a of rank r gets chunk a * world_size + r. The order depends only on
    (seed, epoch), so 1 process and N processes see the same global batches, and a run resumed at
    (epoch, batch) continues the same order. Call set_epoch before iterating.
    """

    def __init__(self, n: int, batch_size: int, seed: int, d: Dist, grad_accum: int = 1):
        if n < batch_size:
            raise ValueError(f"the dataset has {n} images, fewer than one batch of {batch_size}; "
                             f"lower optim.batch_size")
        self.n, self.batch_size, self.seed, self.grad_accum = n, batch_size, seed, grad_accum
        self.rank, self.world_size = d.rank, d.world_size
        self.micro = batch_size // (d.world_size * grad_accum)
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch`, beginning at its global batch `start` (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        g = generator(self.seed, self.epoch)
        perm = torch.randperm(self.n, generator=g)
        for b in range(self.start, self.batches_per_epoch):
            batch = perm[b * self.batch_size:(b + 1) * self.batch_size]
            for a in range(self.grad_accum):
                chunk = a * self.world_size + self.rank
                yield batch[chunk * self.micro:(chunk + 1) * self.micro].tolist()
