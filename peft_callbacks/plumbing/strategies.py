"""What the callbacks need to know about Lightning's sharding strategies: which one runs, the set-ups known to break
(refused before the first step, each with what to change), and gathering a sharded model when training ends.

==========================  =====================================================================================
strategy                    how the surgery meets it
==========================  =====================================================================================
``ModelParallelStrategy``   the user shards in ``configure_model``; surgery runs after it and the new modules get
                            FSDP2 units of their own (:func:`~peft_callbacks.core.sharding.shard_new_modules`)
``FSDPStrategy``            the strategy wraps the model after ``configure_model``: surgery sees a plain model;
                            at the end the full parameters are summoned (``summon_full_params``)
``DeepSpeedStrategy``       ZeRO-2 keeps parameters whole; ZeRO-3 partitions them at ``deepspeed.initialize``,
                            after surgery; merging and saving gather them (``GatheredParameters``)
==========================  =====================================================================================

Example::

    >>> import lightning as L
    >>> strategy_kind(L.Trainer(accelerator="cpu", devices=1, logger=False))
    'single'
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch.nn as nn
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from peft_callbacks.core.sharding import is_dtensor, is_zero3
from peft_callbacks.plumbing import seam

__all__ = [
    "check_sharded_setup",
    "full_weights",
    "is_sharding",
    "outside_zero_init",
    "refuse_unbuilt_base",
    "run_before_checkpoint_load",
    "set_checkpoint_loader",
    "strategy_kind",
]

StrategyKind = Literal["single", "ddp", "fsdp2", "fsdp", "deepspeed"]


def strategy_kind(trainer: pl.Trainer) -> StrategyKind:
    """``"fsdp2"`` (``ModelParallelStrategy``), ``"fsdp"``, ``"deepspeed"``, ``"ddp"`` or ``"single"``.

    Example::

        >>> from types import SimpleNamespace
        >>> strategy_kind(SimpleNamespace(strategy=ModelParallelStrategy()))
        'fsdp2'
    """
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    if isinstance(strategy, DeepSpeedStrategy):
        return "deepspeed"
    return "ddp" if isinstance(strategy, DDPStrategy) else "single"


def is_sharding(trainer: pl.Trainer) -> bool:
    """Does the strategy split parameters across processes (FSDP2, FSDP, DeepSpeed)?

    Example::

        >>> import lightning as L
        >>> is_sharding(L.Trainer(accelerator="cpu", devices=1, logger=False))
        False
    """
    return strategy_kind(trainer) in ("fsdp2", "fsdp", "deepspeed")


def refuse_unbuilt_base(trainer: pl.Trainer, model: nn.Module, name: str) -> None:
    """Refuse surgery on a base that sharding left without values: ZeRO-3 partitions or ``meta`` tensors.

    Raises:
        ValueError: saying how to build the model instead.

    Example::

        >>> import lightning as L
        >>> refuse_unbuilt_base(L.Trainer(accelerator="cpu", devices=1, logger=False), nn.Linear(2, 2), "LoRACallback")
    """
    params = list(model.parameters())
    if any(is_zero3(p) for p in params):
        raise ValueError(
            f"{name}: {type(model).__name__} was built inside `configure_model` under DeepSpeed ZeRO-3, so its "
            f"weights are already partitioned (shape [0]) and new layers cannot be initialised from them. Build the "
            f"model in `__init__` (DeepSpeed then partitions it, new layers included, when training starts), or "
            f"use ModelParallelStrategy (FSDP2)."
        )
    if is_sharding(trainer) and any(p.device.type == "meta" for p in params):
        raise ValueError(
            f"{name}: the weights of {type(model).__name__} are on the meta device after `configure_model`. "
            f"Lightning fills them later by calling `reset_parameters()` on every layer, which would also "
            f"re-initialise the new tensors (LoRA's B would not start at zero). Build the model on a real device "
            f"(CPU is fine: `fully_shard` moves each rank's shard), or load its weights before fit."
        )


def check_sharded_setup(trainer: pl.Trainer, pl_module: nn.Module, name: str) -> None:
    """Refuse, right after surgery, what the strategy would reject cryptically at its first step.

    * FSDP1 (``FSDPStrategy``): a unit whose tensors have several dtypes (FSDP flattens a unit into one tensor);
      with ``use_orig_params=False``, a unit that mixes frozen and trainable tensors.
    * FSDP2 (``ModelParallelStrategy``): a unit whose trainable tensors have several dtypes.

    Raises:
        ValueError: naming the unit, what it mixes and what to change.

    Example::

        >>> from types import SimpleNamespace
        >>> mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).requires_grad_(False))
        >>> check_sharded_setup(SimpleNamespace(strategy=FSDPStrategy(use_orig_params=False)), mixed, "LoRACallback")
        Traceback (most recent call last):
        ...
        ValueError: LoRACallback: the FSDP unit '<root>' mixes frozen and trainable tensors, ...
    """
    kind = strategy_kind(trainer)
    if kind == "fsdp":
        _check_fsdp1(trainer.strategy, pl_module, name)
    elif kind == "fsdp2":
        _check_fsdp2(pl_module, name)


def _owned(units: list[tuple[str, nn.Module]]) -> list[tuple[str, list[nn.Parameter]]]:
    """Each unit's own parameters: those not inside a nested unit (FSDP shards bottom-up)."""
    claimed: set[int] = set()
    owned = []
    for path, unit in sorted(units, key=lambda pu: -pu[0].count(".") if pu[0] else 1):
        params = [p for p in unit.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in params)
        owned.append((path, params))
    return owned


def _dtypes(params: list[nn.Parameter]) -> list[str]:
    return sorted({str(p.dtype).removeprefix("torch.") for p in params})


def _check_fsdp2(pl_module: nn.Module, name: str) -> None:
    from torch.distributed.fsdp import FSDPModule

    units = [(path, m) for path, m in pl_module.named_modules() if isinstance(m, FSDPModule)]
    for path, params in _owned(units):
        dtypes = _dtypes([p for p in params if p.requires_grad and is_dtensor(p)])
        if len(dtypes) > 1:
            raise ValueError(
                f"{name}: the FSDP2 unit {path or '<root>'!r} trains tensors of several dtypes ({', '.join(dtypes)}); "
                f"FSDP2 reduces one dtype per unit. Cast the model to one dtype before fit, or use "
                f"`fully_shard(..., mp_policy=MixedPrecisionPolicy(...))` for mixed precision."
            )


def _fsdp1_units(pl_module: nn.Module, policy: object) -> list[tuple[str, nn.Module]] | None:
    """The modules ``auto_wrap_policy`` will wrap (the root always), or ``None`` if the policy cannot be read."""
    from torch.distributed.fsdp.wrap import _Policy

    if policy is None:
        wrapped: set[int] = set()
    elif isinstance(policy, _Policy):
        wrapped = {id(m) for m in policy._run_policy(pl_module, set(), {})}
    elif callable(policy):
        wrapped = _run_callable_policy(pl_module, policy)
    else:
        return None
    return [(path, m) for path, m in pl_module.named_modules() if id(m) in wrapped or m is pl_module]


def _run_callable_policy(root: nn.Module, policy: Callable[..., bool]) -> set[int]:
    """Which modules an old-style callable policy (``size_based_auto_wrap_policy``) wraps, as FSDP recurses."""
    wrapped: set[int] = set()

    def visit(module: nn.Module) -> int:  # parameters below `module` not wrapped yet
        remaining = sum(p.numel() for p in module.parameters(recurse=False))
        for child in module.children():
            remaining += visit(child)
        if module is not root and policy(module=module, recurse=False, nonwrapped_numel=remaining):
            wrapped.add(id(module))
            return 0
        return remaining

    visit(root)
    return wrapped


def _check_fsdp1(strategy: FSDPStrategy, pl_module: nn.Module, name: str) -> None:
    units = _fsdp1_units(pl_module, strategy.kwargs.get("auto_wrap_policy"))
    if units is None:
        return
    orig_params = strategy.kwargs.get("use_orig_params", True)
    for path, params in _owned(units):
        where = f"the FSDP unit {path or '<root>'!r}"
        dtypes = _dtypes(params)
        if len(dtypes) > 1:
            raise ValueError(
                f"{name}: {where} holds tensors of several dtypes ({', '.join(dtypes)}), and FSDPStrategy flattens a "
                f"unit into one tensor of one dtype. Cast the model to one dtype before fit (new tensors take their "
                f"base layer's dtype), or let `precision=` / FSDPStrategy(mixed_precision=...) manage dtypes."
            )
        trainable = {p.requires_grad for p in params}
        if not orig_params and len(trainable) > 1:
            raise ValueError(
                f"{name}: {where} mixes frozen and trainable tensors, which FSDPStrategy(use_orig_params=False) "
                f"refuses (one FlatParameter needs one requires_grad). Use FSDPStrategy(use_orig_params=True) "
                f"(Lightning's default), or ModelParallelStrategy (FSDP2), where frozen tensors cost no gradient "
                f"memory."
            )


@contextlib.contextmanager
def outside_zero_init(trainer: pl.Trainer) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3, Lightning runs ``configure_model`` (and so the surgery) inside ``deepspeed.zero.Init``,
    which would partition each new layer as it is built, before it is initialised. Inside this block new modules are
    plain; ``deepspeed.initialize`` partitions them with the rest of the model when training starts.

    Example::

        >>> import lightning as L
        >>> with outside_zero_init(L.Trainer(accelerator="cpu", devices=1, logger=False)):
        ...     pass
    """
    if strategy_kind(trainer) != "deepspeed":
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()


def full_weights(trainer: pl.Trainer) -> contextlib.AbstractContextManager:
    """Under ``FSDPStrategy`` (FSDP1), the full parameters of the whole model inside the block, written back after
    (``summon_full_params``; every rank holds the whole model meanwhile). Other strategies gather where needed, layer
    by layer, so for them this is a context that does nothing.

    Example::

        >>> import lightning as L
        >>> full_weights(L.Trainer(accelerator="cpu", devices=1, logger=False))  # doctest: +ELLIPSIS
        <contextlib.nullcontext object at ...>
    """
    if strategy_kind(trainer) != "fsdp":
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=True)


# -- checkpoint loading --------------------------------------------------------------------------------------------
# FSDP, DeepSpeed and FSDP2 (`restore_checkpoint_after_setup`) load the model's and optimizers' states inside
# `strategy.load_checkpoint`, after `on_fit_start` and before any callback sees the checkpoint. What must happen
# before (param groups that match the saved ones) or instead (a slim checkpoint) is attached to that call through the
# seam (plumbing/seam.py); the owner's `seam.undo` takes it away again.
_LOADER = "checkpoint loader"


def run_before_checkpoint_load(strategy: pl.strategies.Strategy, action: Callable[[Any], None], *, owner: Any) -> None:
    """Call ``action(checkpoint_path)`` right before ``strategy.load_checkpoint`` runs (every time, until ``owner``'s
    :func:`~peft_callbacks.plumbing.seam.undo`).

    Example::

        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> from peft_callbacks.plumbing import seam
        >>> class Owner:
        ...     pass
        >>> strategy, seen, owner = SingleDeviceStrategy("cpu"), [], Owner()
        >>> run_before_checkpoint_load(strategy, seen.append, owner=owner)
        >>> set_checkpoint_loader(strategy, lambda path, weights_only: {"loaded": path}, owner=owner)
        >>> strategy.load_checkpoint("a.ckpt"), seen
        ({'loaded': 'a.ckpt'}, ['a.ckpt'])
        >>> seam.undo(owner)
        >>> "load_checkpoint" in vars(strategy)
        False
    """

    def before(checkpoint_path: Any, *args: Any, **kwargs: Any) -> None:
        action(checkpoint_path)

    seam.wrap_method(strategy, "load_checkpoint", owner=owner, before=before)


def set_checkpoint_loader(
    strategy: pl.strategies.Strategy, loader: Callable[[Any, bool | None], dict[str, Any] | None], *, owner: Any
) -> None:
    """Let ``loader(checkpoint_path, weights_only)`` load checkpoints it recognises (returning what
    ``load_checkpoint`` returns); for others it returns ``None`` and the strategy loads as usual. One loader per
    strategy: a second one asked for joins the first.

    Example::

        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> class Owner:
        ...     pass
        >>> strategy = SingleDeviceStrategy("cpu")
        >>> set_checkpoint_loader(strategy, lambda path, weights_only: {"slim": True}, owner=Owner())
        >>> strategy.load_checkpoint("slim.ckpt")
        {'slim': True}
    """

    def instead(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any] | None:
        return loader(checkpoint_path, weights_only)

    seam.wrap_method(strategy, "load_checkpoint", owner=owner, key=_LOADER, instead=instead)
