"""How the data-driven initialisations (EVA, CorDA, LoRA-GA) read a few batches: any iterable of mappings of model
inputs (transformers: ``input_ids``, ``attention_mask``, ``labels``), ``(inputs, targets)`` tuples or tensors, moved
to the model's device and run one by one.

Example::

    >>> import torch, torch.nn as nn
    >>> model = nn.Linear(3, 2)
    >>> batches = [(torch.randn(4, 3), torch.zeros(4)) for _ in range(3)]
    >>> [tuple(default_forward(model, b).shape) for b in probe_batches(batches, model, num_batches=2)]
    [(4, 2), (4, 2)]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["default_forward", "model_device", "probe_batches", "to_device", "token_mask"]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: ``model(**batch)`` for a mapping (transformers), ``model(batch[0])`` for a tuple or
    list (``(inputs, targets)``), ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first materialised parameter (CPU for a model without one)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested in mappings, tuples and lists) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def token_mask(batch: Any, use_label_mask: bool = True, label_mask_value: int = -100) -> torch.Tensor | None:
    """Which tokens count (PEFT's ``prepare_model_inputs_fn_language_modeling``): ``attention_mask``, and
    ``labels != label_mask_value``; ``None`` (all rows) for batches without them."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch and "attention_mask" not in batch:
        return None
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"]).bool() if mask is None else mask.bool()
    labels = batch.get("labels")
    if use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != label_mask_value)
    return mask


def probe_batches(dataloader: Iterable, model: nn.Module, *, num_batches: int | None = None) -> Iterator[Any]:
    """The first ``num_batches`` batches of ``dataloader`` (all of them for ``None``), on ``model``'s device."""
    device = model_device(model)
    for count, batch in enumerate(dataloader):
        if num_batches is not None and count >= num_batches:
            return
        yield to_device(batch, device)
