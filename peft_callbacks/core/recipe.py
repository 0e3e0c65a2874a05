"""Surgery recipes: every surgery records what it did, so it can be replayed on a fresh base model.

An adapter file is a recipe plus tensors: ``load_adapter`` replays the recorded surgeries on a new copy of the base
model (same method, same settings, the same exact module paths) and then loads the saved weights. The record lives
on the model it was applied to (in ``model.__dict__``, so it survives ``copy.deepcopy`` and pickling but never enters
``state_dict()``). Replaying is :func:`peft_callbacks.engine.replay`.

Example::

    >>> import torch.nn as nn
    >>> from peft_callbacks import inject_lora
    >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
    >>> [(r["method"], r["config"]["targets"], r["adapter_name"]) for r in surgery_records(net)]
    [('lora', ['0'], 'default')]
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

__all__ = ["clear_surgery", "drop_targets", "record_surgery", "recorded_models", "surgery_records"]

_ATTR = "_peft_callbacks_recipe"


def record_surgery(model: nn.Module, method: str, config: dict[str, Any], adapter_name: str = "default") -> None:
    """Note on ``model`` that surgery ``method`` was applied with ``config`` (JSON-serialisable values only)."""
    record = {"method": method, "config": copy.deepcopy(config), "adapter_name": adapter_name}
    model.__dict__.setdefault(_ATTR, []).append(record)


def surgery_records(model: nn.Module) -> list[dict[str, Any]]:
    """The surgeries recorded on ``model`` itself, oldest first (copies)."""
    return copy.deepcopy(model.__dict__.get(_ATTR, []))


def recorded_models(root: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of every module inside ``root`` (itself included) that carries surgery records."""
    return {name: m for name, m in root.named_modules() if m.__dict__.get(_ATTR)}


def clear_surgery(root: nn.Module, method: str, adapter_name: str | None = None) -> None:
    """Forget the records of ``method`` (of one adapter, or all) on ``root`` and every module inside it."""
    for m in root.modules():
        records = m.__dict__.get(_ATTR)
        if records:
            records[:] = [
                r
                for r in records
                if not (r["method"] == method and adapter_name in (None, r.get("adapter_name", "default")))
            ]
            if not records:
                del m.__dict__[_ATTR]


def drop_targets(root: nn.Module, adapter_name: str, paths: list[str]) -> None:
    """Take ``paths`` (relative to ``root``) out of the targets of the records of adapter ``adapter_name`` inside
    ``root``, and list them under the record's ``"dropped"`` (so a resumed run can tell them from new targets).

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> record_surgery(net, "lora", {"rank": 2, "targets": ["0", "1"]})
        >>> drop_targets(net, "default", ["1"])
        >>> [(r["config"]["targets"], r["dropped"]) for r in surgery_records(net)]
        [(['0'], ['1'])]
    """
    for prefix, model in recorded_models(root).items():
        inside = {p[len(prefix) + 1 :] if prefix else p for p in paths if not prefix or p.startswith(prefix + ".")}
        for record in model.__dict__[_ATTR]:
            targets = record.get("config", {}).get("targets")
            if record.get("adapter_name", "default") != adapter_name or not isinstance(targets, list):
                continue
            gone = [t for t in targets if t in inside]
            if gone:
                record["config"]["targets"] = [t for t in targets if t not in inside]
                record["dropped"] = sorted({*record.get("dropped", []), *gone})
