"""Parameter bookkeeping: counting, freezing, and BatchNorm statistics that stay frozen.

Parameters are always handled by identity (``id(p)``), never by name or value, so tied weights are counted once and
two zero-initialised tensors are never confused.

Example::

    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    >>> freeze(model[:2])
    >>> count_parameters(model)
    ParameterCount(trainable=18, total=74)
    >>> print(count_parameters(model))
    trainable 18 / total 74 (24.32%)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from peft_callbacks._validation import check_int, check_module

_BN_HOOK_ATTR = "_peft_frozen_stats_hook"


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameter counts of a model (tied parameters counted once).

    Example::

        >>> c = ParameterCount(trainable=10, total=1000)
        >>> c.percent, c.frozen
        (1.0, 990)
    """

    trainable: int
    total: int

    def __post_init__(self) -> None:
        check_int("trainable", self.trainable, minimum=0)
        check_int("total", self.total, minimum=self.trainable)

    @property
    def frozen(self) -> int:
        """Parameters that get no gradient."""
        return self.total - self.trainable

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat dict for loggers, e.g. ``{"peft/trainable_params": 10, ...}``."""
        return {
            f"{prefix}trainable_params": float(self.trainable),
            f"{prefix}total_params": float(self.total),
            f"{prefix}trainable_percent": self.percent,
        }

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / total {self.total:,} ({self.percent:.2f}%)"


def unique_parameters(module: nn.Module) -> list[nn.Parameter]:
    """All parameters of ``module``, each once (by identity), in registration order."""
    seen: set[int] = set()
    params = []
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable (``requires_grad``) and total parameters, each shared tensor once.

    Args:
        model: any ``nn.Module``; works on ``meta`` tensors too.

    Returns:
        A :class:`ParameterCount`.
    """
    check_module("model", model)
    params = unique_parameters(model)
    return ParameterCount(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


def set_requires_grad(modules: nn.Module | Iterable[nn.Module], requires_grad: bool) -> None:
    """Set ``requires_grad`` on every parameter of one module or several."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(requires_grad)


def freeze(modules: nn.Module | Iterable[nn.Module]) -> None:
    """Stop gradients for every parameter of ``modules``."""
    set_requires_grad(modules, False)


def unfreeze(modules: nn.Module | Iterable[nn.Module]) -> None:
    """Let every parameter of ``modules`` receive gradients again."""
    set_requires_grad(modules, True)


def _enter_eval_mode(module: nn.Module, args: tuple) -> None:
    # Forward pre-hook: whatever `model.train()` did, frozen BatchNorm normalises with its running statistics and
    # never updates them. The module's own mode is put back by `_leave_eval_mode` right after the call.
    module.__dict__["_peft_was_training"] = module.training
    module.training = False


def _leave_eval_mode(module: nn.Module, args: tuple, output) -> None:
    module.training = module.__dict__.pop("_peft_was_training", module.training)


def freeze_batchnorm_stats(module: nn.Module) -> list[nn.Module]:
    """Keep every BatchNorm layer inside ``module`` in eval mode, even through ``model.train()``.

    A frozen BatchNorm should neither update its running statistics nor normalise with batch statistics; otherwise the
    "frozen" base model silently changes. Works without a Trainer: forward hooks switch the layer to eval mode for
    the duration of each call only, so ``module.training`` still reports the model's mode. Undo with
    :func:`unfreeze_batchnorm_stats`.

    Returns:
        The BatchNorm layers that are now frozen (already-frozen ones included).

    Example::

        >>> import torch, torch.nn as nn
        >>> bn = nn.BatchNorm1d(3)
        >>> _ = freeze_batchnorm_stats(bn)
        >>> _ = bn.train()(torch.randn(8, 3))
        >>> bool(bn.running_mean.abs().sum() == 0), bn.training
        (True, True)
    """
    check_module("module", module)
    frozen = []
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            if not hasattr(m, _BN_HOOK_ATTR):
                handles = (m.register_forward_pre_hook(_enter_eval_mode), m.register_forward_hook(_leave_eval_mode))
                setattr(m, _BN_HOOK_ATTR, handles)
            frozen.append(m)
    return frozen


def unfreeze_batchnorm_stats(module: nn.Module) -> None:
    """Undo :func:`freeze_batchnorm_stats` for every BatchNorm layer inside ``module``."""
    for m in module.modules():
        handles = getattr(m, _BN_HOOK_ATTR, None)
        if handles is not None:
            for handle in handles:
                handle.remove()
            delattr(m, _BN_HOOK_ATTR)


def has_frozen_batchnorm_stats(module: nn.Module) -> bool:
    """Is this BatchNorm layer's running statistics kept frozen by :func:`freeze_batchnorm_stats`?"""
    return hasattr(module, _BN_HOOK_ATTR)
