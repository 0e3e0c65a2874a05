"""LoRA+: train ``lora_B`` with a larger learning rate than ``lora_A`` (Hayou et al. 2024, "LoRA+", §3).

With one learning rate for both factors, the update of ``B·A`` is inefficient for wide layers; LoRA+ sets
``lr_B = λ · lr_A`` with ``λ`` around 16. Two ways to get it:

- :func:`loraplus_param_groups` builds the param groups for an optimizer you create yourself;
- :func:`split_loraplus_groups` changes an optimizer that already exists (whatever its type): the ``lora_B`` weights of
  each param group move to a new group with the same options and ``lr · λ``, and the learning-rate schedulers
  attached to it get a matching entry for the new group (``base_lrs``, ``lr_lambdas``, …), so schedules keep the
  ratio. ``LoRACallback(loraplus_lr_ratio=16)`` does this at ``on_fit_start``.

Parameters are matched by identity (the ``lora_B.weight`` of every LoRA layer), never by name.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> net = inject_lora(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)), rank=2)
    >>> optimizer = torch.optim.AdamW(loraplus_param_groups(net, lr=1e-3, ratio=16))
    >>> [(len(g["params"]), g["lr"]) for g in optimizer.param_groups]  # A + head, then B
    [(3, 0.001), (1, 0.016)]
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_positive_float
from peft_callbacks.methods.lora.method import lora_adapters
from peft_callbacks.methods.lora.params import ParameterLoRA

__all__ = ["lora_B_parameters", "loraplus_param_groups", "split_loraplus_groups"]

log = logging.getLogger(__name__)

MARKER = "loraplus_lr_ratio"  # key of the param groups created for B, so a second split leaves them alone
_SCALED_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # learning rates kept in param groups (OneCycleLR…)
_SCALED_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs", "base_values")  # per-group learning-rate lists
_COPIED_LISTS = ("lr_lambdas",)  # per-group lists whose entry is reused as is


def lora_B_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``lora_B`` weights of every LoRA (and DoRA) layer in ``model``, and of LoRA on parameters (one per
    adapted parameter), that require gradients."""
    weights = [a.lora_B.weight for a in lora_adapters(model).values()]
    weights += [b.weight for m in model.modules() if isinstance(m, ParameterLoRA) for b in m.lora_B.values()]
    return [w for w in weights if w.requires_grad]


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, **options: Any) -> list[dict[str, Any]]:
    """Param groups for ``torch.optim`` optimizers: every trainable parameter at ``lr``, the ``lora_B`` at ``lr·ratio``.

    Args:
        model: a model with LoRA layers.
        lr: the learning rate of everything but ``lora_B`` (> 0).
        ratio: ``λ = lr_B / lr_A`` (> 0; the paper recommends about 16).
        **options: other group options for both groups (``weight_decay=0.01``, …).

    Returns:
        ``[{"params": others, "lr": lr, …}, {"params": lora_B weights, "lr": lr·ratio, …}]``.

    Raises:
        ValueError: ``lr`` or ``ratio`` not positive, or ``model`` has no trainable ``lora_B``.
    """
    check_positive_float("lr", lr)
    check_positive_float("ratio", ratio)
    b_params = lora_B_parameters(model)
    if not b_params:
        raise ValueError(f"LoRA+ needs LoRA layers with trainable lora_B; {type(model).__name__} has none.")
    b_ids = {id(p) for p in b_params}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in b_ids]
    return [
        {"params": others, "lr": lr, **options},
        {"params": b_params, "lr": lr * ratio, MARKER: ratio, **options},
    ]


def _schedulers_of(schedulers: Iterable[Any], optimizer: torch.optim.Optimizer) -> list[Any]:
    """The schedulers driving ``optimizer``, looking inside ``SequentialLR`` / ``ChainedScheduler``."""
    found = []
    for scheduler in schedulers:
        inner = getattr(scheduler, "_schedulers", None)
        if inner:
            found.extend(_schedulers_of(inner, optimizer))
        if getattr(scheduler, "optimizer", None) is optimizer:
            found.append(scheduler)
    return found


def _extend_scheduler(scheduler: Any, sources: list[int], n_groups: int, ratio: float) -> None:
    """Append, for each new group, the entry of its source group to the scheduler's per-group lists."""
    for name in _SCALED_LISTS + _COPIED_LISTS:
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) == n_groups:
            scale = name in _SCALED_LISTS
            values.extend(values[j] * ratio if scale else values[j] for j in sources)
        elif isinstance(values, list):
            log.warning(
                "LoRA+: %s.%s has %d entries for %d param groups; left unchanged.",
                type(scheduler).__name__,
                name,
                len(values),
                n_groups,
            )


def split_loraplus_groups(
    optimizer: torch.optim.Optimizer,
    b_params: Iterable[torch.Tensor],
    ratio: float = 16.0,
    schedulers: Iterable[Any] = (),
) -> int:
    """Move the given ``lora_B`` weights of each param group of ``optimizer`` to new groups with ``lr · ratio``.

    Each new group copies its source group's options (weight decay, betas, …) and scales its learning rates
    (``lr``, ``initial_lr``, ``max_lr``, ``min_lr``). Schedulers in ``schedulers`` that drive ``optimizer`` get
    matching entries (``base_lrs``, ``_last_lr``, ``max_lrs``, ``min_lrs`` scaled; ``lr_lambdas`` copied). Groups
    made by an earlier split are left alone, so calling it twice changes nothing. Call it before the optimizer has
    state (or before loading a state saved after the split).

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        b_params: the ``lora_B`` weights (see :func:`lora_B_parameters`), matched by identity.
        ratio: ``λ = lr_B / lr_A`` (> 0).
        schedulers: learning-rate schedulers that may drive ``optimizer``.

    Returns:
        How many parameters moved.

    Example::

        >>> import torch, torch.nn as nn
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)), rank=2)
        >>> optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
        >>> split_loraplus_groups(optimizer, lora_B_parameters(net), ratio=4)
        1
        >>> [g["lr"] for g in optimizer.param_groups]
        [0.1, 0.4]
    """
    check_positive_float("ratio", ratio)
    b_ids = {id(p) for p in b_params}
    n_groups = len(optimizer.param_groups)
    sources, moved = [], 0
    for index, group in enumerate(list(optimizer.param_groups)):
        if MARKER in group:
            continue
        mine = [p for p in group["params"] if id(p) in b_ids]
        if not mine:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in b_ids]
        new = {k: v for k, v in group.items() if k != "params"}
        for key in _SCALED_GROUP_KEYS:
            if key in new and new[key] is not None:
                new[key] = new[key] * ratio
        new[MARKER] = ratio
        optimizer.add_param_group({"params": mine, **new})
        sources.append(index)
        moved += len(mine)
    if sources:
        for scheduler in _schedulers_of(schedulers, optimizer):
            _extend_scheduler(scheduler, sources, n_groups, ratio)
    return moved
