"""``verify=``: a PEFT callback's merge at the end of training is checked before it replaces the adapter.

:class:`MergeCheck` says what to score on; :func:`verify_merge` makes the merged model on a copy of the
LightningModule, exactly as the callback would (``merged_dtype`` included), and compares it with the adapted model
on the new task and the base task (:func:`~peft_callbacks.forgetting.verify.check_artifact`). The callback merges
only when the check accepts; otherwise the adapter is kept (saved) and the merged model is not written.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from peft_callbacks._validation import check_choice, check_positive_int
from peft_callbacks.core.sharding import has_sharded_parameters
from peft_callbacks.forgetting.verify import VERIFY_METRICS, ArtifactCheck, check_artifact, check_tolerance
from peft_callbacks.plumbing.base_task import BaseLoader, check_base_head, check_dataloader, resolve_loader

__all__ = ["MergeCheck", "verify_merge"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MergeCheck:
    """What the merge at the end of training is checked on before it replaces the adapter.

    The merged model (in ``merged_dtype`` when one is set) is scored against the adapted model on the new task and,
    when given, the base task; a score that moves by more than ``tolerance`` refuses the merge: the adapter stays in
    the model, is saved (to ``save_adapter_to``, else ``<log_dir>/adapter``), and the merged model is not written.
    Costs one copy of the model and two passes over each set, once; use validation data, not the split you report.

    Attributes:
        new_task: the new task's validation data (a ``DataLoader``, a ``LightningDataModule``, a callable returning a
            loader, or the name of a LightningModule/DataModule method or attribute); ``None``: the trainer's
            validation loader.
        base_task: the base task's validation data, in the same forms; ``None``: the new task only.
        tolerance: the largest change of a score the merged model may show, in ``[0, 1]``: accuracy/F1 points, or
            the relative change of the loss.
        metric: ``"accuracy"``, ``"f1"`` or ``"loss"``, on both tasks.
        base_head: the original head (module, whole original model, or state-dict path) when fine-tuning replaced
            it: the base task is scored through it.
        limit_batches: score only the first N batches of each set.

    Example::

        >>> MergeCheck(tolerance=2.0)
        Traceback (most recent call last):
        ...
        ValueError: `tolerance` must be in [0, 1] (accuracy/F1 points, or the relative change of the loss), got 2.0.
    """

    new_task: BaseLoader | None = None
    base_task: BaseLoader | None = None
    tolerance: float = 0.01
    metric: Literal["accuracy", "f1", "loss"] = "accuracy"
    base_head: nn.Module | str | None = None
    limit_batches: int | None = None

    def __post_init__(self) -> None:
        if self.new_task is not None:
            check_dataloader(self.new_task, "new_task")
        if self.base_task is not None:
            check_dataloader(self.base_task, "base_task")
        check_tolerance(self.tolerance)
        check_choice("metric", self.metric, VERIFY_METRICS)
        check_base_head(self.base_head)
        if self.limit_batches is not None:
            check_positive_int("limit_batches", self.limit_batches)


def check_verify(value: object) -> MergeCheck | None:
    """Return ``value`` if it is ``None`` or a :class:`MergeCheck`; raise otherwise."""
    if value is None or isinstance(value, MergeCheck):
        return value
    raise TypeError(
        f"`verify` must be None or a MergeCheck(new_task=..., base_task=..., tolerance=...), got "
        f"{type(value).__name__} {value!r}."
    )


def verify_merge(
    check: MergeCheck,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    merge_fn: Callable[[nn.Module], None],
    name: str,
    module: str | None = None,
) -> ArtifactCheck | None:
    """Merge a copy of ``pl_module`` with ``merge_fn`` and compare it with ``pl_module`` (see the module docstring).

    The deltas are logged under ``verify/`` and a line says what was found. Returns ``None`` (with a warning) on a
    sharded model, which cannot be copied whole on one process.
    """
    if has_sharded_parameters(pl_module):
        rank_zero_warn(
            f"{name}: `verify` does not check the merge of a sharded model (FSDP, ZeRO-3); merging unchecked."
        )
        return None
    from peft_callbacks.callbacks.finish import _trainer_val_loader, module_forward

    source = check.new_task if check.new_task is not None else _trainer_val_loader(trainer)
    if source is None:
        raise ValueError(
            f"{name}(verify=MergeCheck(...)) needs the new task's validation data: the trainer has no validation "
            f"loader; pass MergeCheck(new_task=...)."
        )
    rank, world = trainer.global_rank, trainer.world_size
    owner = f"{name}(verify=...)"
    tasks = {"new_task": resolve_loader(source, trainer, pl_module, owner=owner, argument="new_task")}
    # the trainer's validation loader is already split between processes; a loader given here is split batch-wise
    shards = {"new_task": (rank, world) if check.new_task is not None else (0, 1)}
    if check.base_task is not None:
        tasks["base_task"] = resolve_loader(check.base_task, trainer, pl_module, owner=owner, argument="base_task")
        shards["base_task"] = (rank, world)
    forward = module_forward if is_overridden("forward", pl_module, pl.LightningModule) else None
    artifact = copy.deepcopy(pl_module)
    merge_fn(artifact)
    result = check_artifact(
        pl_module,
        artifact,
        tasks,
        metric=check.metric,
        tolerance=check.tolerance,
        name="merged model",
        forward_fns={"new_task": forward},
        base_heads={"base_task": check.base_head},
        module=module,
        limit_batches=check.limit_batches,
        shards=shards,
    )
    del artifact
    figures = result.figures()
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in figures.items()})
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=trainer.global_step)
    rank_zero_info(f"{name}: {result.message()}")
    return result
