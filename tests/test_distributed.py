"""rrepa.distributed: the end of a process group."""

import gc
import weakref

import pytest
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
