"""A callback for the tests that start processes with Lightning's ``ddp_spawn``.

Lightning leaves the gloo process group alive when a spawned process returns, and the process then exits with the
group's threads still running: now and then the C++ runtime aborts it at exit ("terminate called without an active
exception", SIGABRT), after the fit itself succeeded, and the test fails. :class:`ReleaseProcessGroup` waits for every
process at the end of the run and destroys the group, so each process exits with nothing of gloo left running.
"""

from __future__ import annotations

import torch.distributed as dist
from lightning.pytorch.callbacks import Callback


class ReleaseProcessGroup(Callback):
    """At ``teardown`` (after the strategy's own teardown, the last collective of a run): barrier, then destroy the
    process group. Pass it in ``callbacks`` of every ``ddp_spawn`` trainer of the suite."""

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
