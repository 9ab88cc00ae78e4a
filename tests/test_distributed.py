"""rrepa.distributed: the end of a process group."""

import gc
import weakref

import pytest
import torch
import torch.distributed as dist

from rrepa import distributed


class _Cycle:
    """An object that can only be freed by the cycle collector (it refers to itself)."""

    def __init__(self):
        self.me = self


@pytest.mark.parametrize("wait", [True, False])
def test_teardown_frees_cyclic_garbage_while_the_group_is_alive(tmp_path, wait):
    """Objects left in reference cycles by a run (the collectives leave some) must die before the process group
    does: in interpreter finalization, after it, gloo intermittently aborts the process. The automatic collector
    is off here, so only teardown's own collection can free the cycle."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    alive_at_death = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        weakref.finalize(_Cycle(), lambda: alive_at_death.append(dist.is_initialized()))
        distributed.teardown(wait=wait)
    finally:
        if was_enabled:
            gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
    assert alive_at_death == [True]  # freed, and while the group still existed
    assert not dist.is_initialized()


@pytest.mark.parametrize(("world_size", "rank", "device", "raised"), [
    (2, 0, "cpu", True),  # rank 0 alone: the waiting rank's cores too
    (2, 1, "cpu", False),  # the waiting rank keeps its share
    (1, 0, "cpu", False),  # a single process has every core already
    (2, 0, "meta", False),  # not a CPU run (GPUs): threads are not its budget
])
def test_all_cores_lends_rank_0_the_machine_and_gives_it_back(monkeypatch, world_size, rank, device, raised):
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 6)
    share = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        d = distributed.Dist(rank=rank, local_rank=rank, world_size=world_size, device=torch.device(device))
        with distributed.all_cores(d):
            inside = torch.get_num_threads()
        after = torch.get_num_threads()
        with pytest.raises(RuntimeError), distributed.all_cores(d):  # an error inside gives the cores back too
            raise RuntimeError("evaluation failed")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(share)
    assert inside == (6 if raised else 3)
    assert after == 3


def _main_first_worker(rank: int, store: str, folder: str) -> None:
    import time
    from pathlib import Path

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        d = distributed.Dist(rank=rank, local_rank=rank, world_size=2)
        with distributed.main_first(d):
            if rank == 0:
                time.sleep(0.5)  # a slow build: rank 1 must not get here before it is done
                (Path(folder) / "cache").write_text("built")
            else:
                (Path(folder) / "seen").write_text((Path(folder) / "cache").read_text())
    finally:
        dist.destroy_process_group()


def test_main_first_runs_rank_0s_block_before_the_others(tmp_path):
    """A cache built by rank 0 inside main_first is complete when rank 1's block opens it."""
    torch.multiprocessing.spawn(_main_first_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    assert (tmp_path / "seen").read_text() == "built"
