"""Where a callback finds the base task: its data (a loader, or a method named in YAML) and its original head.

Shared by :class:`~peft_callbacks.callbacks.forgetting.ForgettingMonitor`, the mitigation callbacks
(:mod:`peft_callbacks.callbacks.mitigation`, :mod:`peft_callbacks.callbacks.regularization`) and
:class:`~peft_callbacks.callbacks.finish.ForgettingAwareFinish`, so that each takes the base task the same way:

* ``dataloader``: a ``DataLoader`` (any iterable of batches), a ``LightningDataModule`` (its val, else test loader),
  a callable returning a loader, or the name of a LightningModule / DataModule method or attribute that returns one
  (what YAML can say);
* ``base_head``: the original head as a module, the whole original model, or a path to a saved state dict.

:class:`BaseTaskOptions` declares how the base task is reached through the model (``base_head``, ``forward_fn``,
``module``) once, for the callbacks that take those three as they are.

Example::

    >>> check_dataloader("base_dataloader")
    'base_dataloader'
    >>> check_base_head(None) is None
    True
    >>> BaseTaskOptions(module="model").module
    'model'
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, RandomSampler

from peft_callbacks._validation import check_optional_str

BaseLoader = DataLoader | pl.LightningDataModule | Callable[[], Iterable] | str


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseTaskOptions:
    """How a forgetting callback reaches the base task through the model being fine-tuned.

    Attributes:
        base_head: the original head when fine-tuning replaced it (a module, the whole original model, or a path to
            a saved state dict), as for ``ForgettingMonitor``: the current head is then the new task's own, and is
            not regularised. ``None``: the base task goes through the current head (one head for both tasks).
        forward_fn: ``forward_fn(pl_module, batch) -> logits`` for models or batches the defaults cannot read.
        module: dotted path of the model inside the LightningModule when it holds several.
    """

    base_head: nn.Module | str | None = None
    forward_fn: Callable[[Any, Any], Any] | None = None
    module: str | None = None

    def __post_init__(self) -> None:
        check_base_head(self.base_head)
        if self.forward_fn is not None and not callable(self.forward_fn):
            raise TypeError(f"`forward_fn` must be a callable(pl_module, batch) or None, got {self.forward_fn!r}.")
        check_optional_str("module", self.module)


def check_dataloader(value: Any, argument: str = "dataloader") -> Any:
    """Return ``value`` if it can name or be a base-task loader (see module docstring); raise otherwise."""
    if isinstance(value, str):
        return check_optional_str(argument, value)
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError(f"`{argument}` is an empty list: the base-task set needs at least one batch.")
    is_loader = isinstance(value, (Iterable, pl.LightningDataModule)) and not isinstance(
        value, (dict, set, torch.Tensor)
    )
    if is_loader or callable(value):
        return value
    raise TypeError(
        f"`{argument}` must be a DataLoader, a LightningDataModule, a callable returning a loader, or the name of a "
        f"LightningModule/DataModule method or attribute; got {type(value).__name__} {value!r}."
    )


def check_base_head(value: Any) -> nn.Module | str | None:
    """Return ``value`` if it is ``None``, a module, or the path of an existing file."""
    if value is None or isinstance(value, nn.Module):
        return value
    if isinstance(value, str):
        if not os.path.isfile(value):
            raise ValueError(f"`base_head`={value!r} is not a file; pass a saved state dict (.pt/.ckpt/.safetensors).")
        return value
    raise TypeError(f"`base_head` must be an nn.Module, a path to a state dict or None, got {type(value).__name__}.")


def check_sources(value: Any) -> Any:
    """Return ``value`` if it is a base-task loader (see :func:`check_dataloader`) or a non-empty dict of them keyed
    by task name."""
    if not isinstance(value, dict):
        return check_dataloader(value)
    if not value:
        raise ValueError("`dataloader` is an empty dict; give at least one task: {name: loader or method name}.")
    for name, source in value.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"`dataloader` task names must be non-empty strings without '/', got {name!r}.")
        check_dataloader(source, argument=f"dataloader[{name!r}]")
    return dict(value)


def check_heads(value: Any, tasks: list[str] | None) -> Any:
    """Return ``value`` if it is a base head (see :func:`check_base_head`) or, with several ``tasks``, a dict of
    them keyed by task name."""
    if not isinstance(value, dict):
        return check_base_head(value)
    if tasks is None:
        raise TypeError("`base_head` is a dict, which needs `dataloader` to be a dict of tasks with the same names.")
    unknown = [k for k in value if k not in tasks]
    if not value or unknown:
        raise ValueError(f"`base_head` keys must be task names of `dataloader` ({tasks}); got {list(value)}.")
    return {name: check_base_head(head) for name, head in value.items()}


def named_source(name: str, pl_module: pl.LightningModule, datamodule: Any, argument: str = "dataloader") -> Any:
    """The loader a method or attribute called ``name`` of the LightningModule or the DataModule returns."""
    for owner in (pl_module, datamodule):
        if owner is not None and hasattr(owner, name):
            value = getattr(owner, name)
            return value() if callable(value) and not isinstance(value, Iterable) else value
    owners = type(pl_module).__name__ + (f" or {type(datamodule).__name__}" if datamodule is not None else "")
    raise ValueError(f"`{argument}`={name!r} names no method or attribute of {owners}.")


def datamodule_loader(datamodule: pl.LightningDataModule, trainer: pl.Trainer, argument: str = "dataloader") -> Any:
    """The val (else test) loader of a DataModule that is not the trainer's own (set up for that stage)."""
    for stage, hook in (("validate", "val_dataloader"), ("test", "test_dataloader")):
        if is_overridden(hook, datamodule):
            if datamodule is not trainer.datamodule:
                datamodule.setup(stage)
            return getattr(datamodule, hook)()
    raise ValueError(
        f"`{argument}` is a {type(datamodule).__name__} with neither `val_dataloader` nor `test_dataloader`."
    )


def resolve_loader(
    source: Any,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    *,
    owner: str,
    argument: str = "dataloader",
    no_shuffle_reason: str | None = None,
) -> Iterable:
    """Turn a ``dataloader`` argument into an iterable of batches, at fit time.

    Args:
        source: what the user passed (see module docstring).
        trainer: the running trainer (its DataModule is searched for names).
        pl_module: the LightningModule (searched for names first).
        owner: the callback's name, for messages.
        argument: the argument's name, for messages.
        no_shuffle_reason: when set, a loader with a ``RandomSampler`` is refused and this says why.

    Raises:
        TypeError: the source does not resolve to an iterable of batches.
        ValueError: a name that nothing has, or a shuffling loader where order matters.
    """
    if isinstance(source, str):
        source = named_source(source, pl_module, trainer.datamodule, argument)
    if isinstance(source, pl.LightningDataModule):
        source = datamodule_loader(source, trainer, argument)
    elif callable(source) and not isinstance(source, Iterable):
        source = source()
    if not isinstance(source, Iterable) or isinstance(source, (str, torch.Tensor)):
        raise TypeError(
            f"`{argument}` of {owner} resolved to {type(source).__name__}, not an iterable of batches (a DataLoader)."
        )
    if no_shuffle_reason and isinstance(getattr(source, "sampler", None), RandomSampler):
        raise ValueError(
            f"The base-task `{argument}` of {owner} shuffles; {no_shuffle_reason}, so build it with shuffle=False."
        )
    return source
