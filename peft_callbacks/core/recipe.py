"""Surgery recipes: every surgery function records what it did, so it can be replayed on a fresh base model.

An adapter file is a recipe plus tensors: ``load_adapter`` replays the recorded surgeries on a new copy of the base
model (same targets, same hyper-parameters) and then loads the saved weights. Each method registers a replay
function under its name; the record lives on the model it was applied to (in ``model.__dict__``, so it survives
``copy.deepcopy`` and pickling but never enters ``state_dict()``).

Example::

    >>> import torch.nn as nn
    >>> from peft_callbacks.lora import inject_lora
    >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
    >>> [(r["method"], r["config"]["targets"]) for r in surgery_records(net)]
    [('lora', ['0'])]
    >>> fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> _ = replay_surgery(fresh, surgery_records(net))
    >>> type(fresh[0]).__name__
    'LoRALinear'
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch.nn as nn

_ATTR = "_peft_callbacks_recipe"
_REPLAY: dict[str, Callable[..., Any]] = {}


def register_surgery(method: str, replay: Callable[..., Any]) -> None:
    """Register ``replay(model, **config)`` as the way to redo surgery ``method`` from its recorded config."""
    _REPLAY[method] = replay


def record_surgery(model: nn.Module, method: str, config: dict[str, Any]) -> None:
    """Note on ``model`` that surgery ``method`` was applied with ``config`` (JSON-serialisable values only)."""
    model.__dict__.setdefault(_ATTR, []).append({"method": method, "config": copy.deepcopy(config)})


def surgery_records(model: nn.Module) -> list[dict[str, Any]]:
    """The surgeries recorded on ``model`` itself, oldest first (copies)."""
    return copy.deepcopy(model.__dict__.get(_ATTR, []))


def recorded_models(root: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of every module inside ``root`` (itself included) that carries surgery records."""
    return {name: m for name, m in root.named_modules() if m.__dict__.get(_ATTR)}


def clear_surgery(root: nn.Module, method: str) -> None:
    """Forget the records of ``method`` on ``root`` and every module inside it (after a merge or an unload)."""
    for m in root.modules():
        records = m.__dict__.get(_ATTR)
        if records:
            records[:] = [r for r in records if r["method"] != method]
            if not records:
                del m.__dict__[_ATTR]


def replay_surgery(model: nn.Module, records: list[dict[str, Any]]) -> nn.Module:
    """Apply recorded surgeries to ``model`` in order.

    Raises:
        ValueError: a record names a method that no surgery function registered.
    """
    for record in records:
        method = record.get("method")
        if method not in _REPLAY:
            raise ValueError(
                f"Unknown surgery method {method!r} in the recipe; known methods: {', '.join(sorted(_REPLAY))}."
            )
        _REPLAY[method](model, **record.get("config", {}))
    return model
