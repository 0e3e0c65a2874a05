"""When the surgery callbacks check a distributed run (:mod:`peft_callbacks.core.distributed_checks`): after the
first optimizer step, that every trainable tensor got a finite gradient on every rank; before writing the adapter or
the merged model, that the gathered tensors are whole and the same on every rank. A failure stops every rank with a
:class:`~peft_callbacks.core.distributed_checks.DistributedCheckError` naming the tensors and the ranks, before a
run trains on with a silent adapter or a save writes a broken file.

One surgery callback per trainer runs the checks (the first in ``trainer.callbacks``), so a trainer with LoRA and a
freezing callback pays for them once. One process runs none; FSDP1 and DeepSpeed keep gradients in flat buffers, so
the gradient check skips them. Set ``callback.check_distributed = False`` to switch both off.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from peft_callbacks.core.distributed_checks import (
    DistributedCheckError,
    gradient_problems,
    saved_tensor_problems,
)
from peft_callbacks.core.sharding import full_tensor
from peft_callbacks.io.state import trained_state
from peft_callbacks.plumbing.strategies import strategy_kind

__all__ = ["check_first_step", "check_saved_tensors", "runs_checks"]

_LISTED = 6


def runs_checks(trainer: pl.Trainer, callback: Callback, kind: type) -> bool:
    """Is ``callback`` the one (the first of type ``kind`` in the trainer) that checks this distributed run?"""
    if trainer.world_size <= 1 or not getattr(callback, "check_distributed", True):
        return False
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None) is callback


def _listing(problems: list[str]) -> str:
    shown = "; ".join(problems[:_LISTED])
    return shown + (f"; … ({len(problems)} in all)" if len(problems) > _LISTED else "")


def check_first_step(trainer: pl.Trainer, pl_module: nn.Module, name: str) -> None:
    """After the first backward (``on_before_optimizer_step``): every trainable tensor has a finite gradient on every
    rank; DDP with ``find_unused_parameters=True`` may leave a tensor without one on every rank.

    Raises:
        DistributedCheckError: naming each tensor and the ranks without a (finite) gradient.
    """
    if strategy_kind(trainer) in ("fsdp", "deepspeed"):
        return  # gradients live in flat buffers, not in each tensor's `.grad`
    strategy = trainer.strategy
    unused = isinstance(strategy, DDPStrategy) and bool(strategy._ddp_kwargs.get("find_unused_parameters"))
    scaled = getattr(trainer.precision_plugin, "scaler", None) is not None  # a gradient scaler skips NaN/Inf steps
    trainable = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
    problems = gradient_problems(trainable, allow_missing=unused, check_finite=not scaled)
    if problems:
        raise DistributedCheckError(
            f"{name}: after the first optimizer step, {len(problems)} trainable tensor(s) lack a finite gradient on "
            f"some rank: {_listing(problems)}. Usual causes: the model runs that layer without gradient on those "
            f"ranks (torch.no_grad, a frozen block, a detached input), or takes another branch there; a NaN/Inf from "
            f"the loss. Leave the layer out (`exclude_modules`) or let the gradient reach it."
        )


def check_saved_tensors(trainer: pl.Trainer, pl_module: nn.Module, name: str) -> None:
    """Before a save: every trained tensor, gathered on every rank, is not empty, has no rank's share all zeros,
    and is the same on every rank. Every rank joins one gather per tensor (small: the trained tensors only).

    Raises:
        DistributedCheckError: naming each tensor and the ranks concerned; nothing has been written.
    """
    gathered = {key: (full_tensor(tensor), tensor) for key, tensor in trained_state(pl_module).items()}
    problems = saved_tensor_problems(gathered)
    if problems:
        raise DistributedCheckError(
            f"{name}: refusing to save, {len(problems)} problem(s) with the gathered tensors: {_listing(problems)}. "
            f"Usual causes: a gather that not every rank joined (only rank 0's share arrives), a shard zeroed or "
            f"never loaded on one rank. Nothing was written."
        )
