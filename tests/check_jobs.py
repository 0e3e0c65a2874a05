"""Faults the run-time check of a distributed run must catch (``tests/test_distributed_checks.py``), each built on
purpose in a LoRA fit under FSDP2 on two CPU processes:

* ``frozen_unit``: the model runs its first decoder layer without gradient (a frozen unit), so the adapters inside
  it never get one, on any rank;
* ``rank0_gather``: when the adapter is saved, rank 0's gather keeps only its own share (the rest zeros), as a
  gather that the other ranks never fed would;
* ``zero_shard``: rank 1's shard of one adapter tensor is zeroed before the save.

Each rank writes the error it stopped with to ``error_rank<r>.txt`` (empty: nothing was caught).
"""

from __future__ import annotations

import torch
from fsdp2_jobs import LanguageModel, _folder, make_trainer, token_data
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import DTensor, Shard

from peft_callbacks import LoRACallback
from peft_callbacks.core.distributed_checks import DistributedCheckError

ZEROED = "model.model.layers.1.self_attn.q_proj.adapters.default.lora_B.weight"


class FrozenFirstLayer(LanguageModel):
    """Its first decoder layer runs under ``torch.no_grad()``, as a frozen feature extractor would."""

    def configure_model(self) -> None:
        super().configure_model()
        layer = self.model.model.layers[0]
        layer.forward = torch.no_grad()(layer.forward)


class GatherOnlyOwnShare(Callback):
    """From ``on_train_end`` on, rank 0's ``full_tensor`` keeps its own rows and zeros the others'."""

    def on_train_end(self, trainer, pl_module):
        original = DTensor.full_tensor

        def own_share_only(tensor, *args, **kwargs):
            full = original(tensor, *args, **kwargs)
            if trainer.global_rank == 0 and tensor.placements == (Shard(0),) and full.shape[0] > 1:
                full = full.clone()
                full[tensor.to_local().shape[0] :] = 0
            return full

        DTensor.full_tensor = own_share_only
        self.restore = lambda: setattr(DTensor, "full_tensor", original)  # called by fit_fault, whatever happens


class ZeroOneShard(Callback):
    """At ``on_train_end``, rank 1 zeroes its shard of :data:`ZEROED`."""

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 1:
            with torch.no_grad():
                dict(pl_module.named_parameters())[ZEROED].to_local().zero_()


def fit_fault(fault: str, out: str, devices: int) -> None:
    folder = _folder(out, f"fault_{fault}", devices)
    module = FrozenFirstLayer() if fault == "frozen_unit" else LanguageModel()
    before = {"rank0_gather": [GatherOnlyOwnShare()], "zero_shard": [ZeroOneShard()]}.get(fault, [])
    lora = LoRACallback(rank=8, merge_on_train_end=False, save_adapter_to=str(folder / "adapter"))
    trainer = make_trainer(devices, [*before, lora], folder, max_steps=2)
    try:
        trainer.fit(module, token_data(devices))
        message = ""
    except DistributedCheckError as err:
        message = str(err)
    finally:
        for callback in before:
            getattr(callback, "restore", lambda: None)()
    (folder / f"error_rank{trainer.global_rank}.txt").write_text(message)


FAULTS = ("frozen_unit", "rank0_gather", "zero_shard")
SCENARIOS = {f"fault_{fault}": lambda out, devices, fault=fault: fit_fault(fault, out, devices) for fault in FAULTS}
SPAWNED = {2: list(SCENARIOS)}
