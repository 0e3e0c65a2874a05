"""Optimizer bookkeeping for freezing schedules (plain PyTorch): take frozen parameters out, add unfrozen ones back.

Parameters are compared by identity, never by value (two zero-initialised LoRA ``B`` factors are equal tensors but
different parameters). A new param group's learning rate is a multiple of group 0's: of its current ``lr`` and, when a
scheduler set one, of its ``initial_lr``; the schedulers driving the optimizer learn about the group, so it follows
the same schedule as the rest.

Example::

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> remove_parameters(opt, list(net[0].parameters()))
    2
    >>> group = add_param_group(opt, list(net[0].parameters()), lr_scale=0.5, name="layer 0")
    >>> [(len(g["params"]), g["lr"]) for g in opt.param_groups]
    [(2, 0.1), (2, 0.05)]
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

log = logging.getLogger(__name__)

_PER_GROUP_LISTS = ("base_lrs", "lr_lambdas", "min_lrs")


def remove_parameters(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> int:
    """Take ``params`` out of every param group of ``optimizer`` (groups are kept, even if empty).

    Returns:
        How many parameter entries were removed.

    Example::

        >>> import torch, torch.nn as nn
        >>> net = nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> remove_parameters(opt, [net.bias]), len(opt.param_groups[0]["params"])
        (1, 1)
    """
    drop = {id(p) for p in params}
    removed = 0
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in drop]
        removed += len(group["params"]) - len(kept)
        group["params"] = kept
    for p in list(optimizer.state):
        if id(p) in drop:
            del optimizer.state[p]
    return removed


def add_param_group(
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    lr_scale: float = 1.0,
    *,
    name: str | None = None,
    schedulers: Iterable[object] = (),
) -> dict | None:
    """Add ``params`` (those not in ``optimizer`` yet) as a new group with ``lr = lr_scale * group 0's lr``.

    Args:
        optimizer: any ``torch.optim.Optimizer``; the group's other hyper-parameters are its defaults.
        params: the parameters to add; ones already in a group are skipped.
        lr_scale: multiplier on group 0's learning rate (current and initial).
        name: stored as the group's ``"name"`` (shown by loggers such as ``LearningRateMonitor``).
        schedulers: LR schedulers of ``optimizer``; each is told about the new group (see :func:`extend_schedulers`).

    Returns:
        The new group, or ``None`` when every parameter was already in the optimizer.

    Example::

        >>> import torch, torch.nn as nn
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(a.parameters(), lr=0.1)
        >>> add_param_group(opt, list(b.parameters()), lr_scale=0.5)["lr"]
        0.05
        >>> add_param_group(opt, list(b.parameters())) is None  # already there
        True
    """
    present = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = [p for p in params if id(p) not in present]
    if not new:
        return None
    first = optimizer.param_groups[0]
    group: dict = {"params": new, "lr": first["lr"] * lr_scale}
    if "initial_lr" in first:
        group["initial_lr"] = first["initial_lr"] * lr_scale
    if name is not None:
        group["name"] = name
    optimizer.add_param_group(group)
    extend_schedulers(optimizer, schedulers)
    return optimizer.param_groups[-1]


def extend_schedulers(optimizer: torch.optim.Optimizer, schedulers: Iterable[object]) -> None:
    """Let each scheduler of ``optimizer`` drive groups added after it was built.

    Per-group lists (``base_lrs`` from each group's ``initial_lr``, ``LambdaLR``'s ``lr_lambdas``,
    ``ReduceLROnPlateau``'s ``min_lrs``) are extended to the number of groups, repeating their last entry. Schedulers
    with other per-group state (``OneCycleLR``, ``CyclicLR``) cannot follow new groups: a warning says so, and the new
    groups keep the learning rate they were added with.

    Example::

        >>> import torch, torch.nn as nn
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(a.parameters(), lr=0.1)
        >>> scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
        >>> opt.add_param_group({"params": list(b.parameters()), "lr": 0.2})
        >>> extend_schedulers(opt, [scheduler])
        >>> len(scheduler.lr_lambdas), scheduler.base_lrs
        (2, [0.1, 0.2])
    """
    n = len(optimizer.param_groups)
    for scheduler in schedulers:
        if getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        if isinstance(scheduler, (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)):
            log.warning(
                "%s cannot schedule param groups added during training; the %d newly unfrozen group(s) keep a "
                "constant learning rate.",
                type(scheduler).__name__,
                n - len(scheduler.base_lrs),
            )
            continue
        for attr in _PER_GROUP_LISTS:
            values = getattr(scheduler, attr, None)
            if not isinstance(values, list) or not values:
                continue
            while len(values) < n:
                if attr == "base_lrs":
                    group = optimizer.param_groups[len(values)]
                    values.append(group.get("initial_lr", group["lr"]))
                else:
                    values.append(values[-1])
        if hasattr(scheduler, "_last_lr") and isinstance(scheduler._last_lr, list):
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
