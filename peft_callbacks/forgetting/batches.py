"""Read base-task batches: split inputs from labels, move them to a device, call a model, take its logits.

Accepted batch formats (what ``DataLoader`` over a ``TensorDataset`` or a Hugging Face collator yields):

* ``(inputs, labels)`` or ``[inputs, labels, ...]``: ``inputs`` a tensor (``model(inputs)``) or a dict
  (``model(**inputs)``);
* ``(inputs,)`` or a bare tensor: no labels (label-free drift only, or next-token labels for language models);
* a dict such as ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``: ``labels``/``label`` are the labels,
  the other entries the model's keyword arguments (entries the model's ``forward`` does not accept are dropped).

Anything else raises ``TypeError``; pass ``forward_fn`` to the monitor for other formats.

Example::

    >>> import torch
    >>> inputs, labels = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
    >>> inputs.shape, labels.tolist()
    (torch.Size([2, 3]), [0, 1])
    >>> inputs, labels = split_batch({"input_ids": torch.ones(2, 4, dtype=torch.long), "label": torch.tensor([1, 0])})
    >>> sorted(inputs), labels.tolist()
    (['input_ids'], [1, 0])
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

LABEL_KEYS = ("labels", "label")
IGNORE_INDEX = -100


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"Tensor{tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"{type(batch).__name__} with keys {sorted(map(str, batch))}"
    if isinstance(batch, (list, tuple)):
        return f"{type(batch).__name__} of ({', '.join(type(b).__name__ for b in batch)})"
    return type(batch).__name__


def _unreadable(batch: Any) -> TypeError:
    return TypeError(
        f"ForgettingMonitor cannot read a base-task batch of type {_describe(batch)}. Batches must be a tensor, "
        f"(inputs, labels) with inputs a tensor or a dict of tensors, or a dict of tensors with an optional "
        f"'labels'/'label' entry; pass `forward_fn=lambda pl_module, batch: logits` for anything else."
    )


def split_batch(batch: Any) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor | None]:
    """Return ``(inputs, labels)`` of one base-task batch; ``labels`` is ``None`` when the batch has none.

    Raises:
        TypeError: the batch has none of the formats listed in the module docstring.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS and isinstance(v, torch.Tensor)}
        if not inputs or (labels is not None and not isinstance(labels, torch.Tensor)):
            raise _unreadable(batch)
        return inputs, labels
    if isinstance(batch, (list, tuple)) and batch:
        inputs = batch[0]
        labels = batch[1] if len(batch) > 1 else None
        inputs_ok = isinstance(inputs, torch.Tensor) or (
            isinstance(inputs, Mapping) and inputs and all(isinstance(v, torch.Tensor) for v in inputs.values())
        )
        if inputs_ok and (labels is None or isinstance(labels, torch.Tensor)):
            return (dict(inputs) if isinstance(inputs, Mapping) else inputs), labels
    raise _unreadable(batch)


def move_to_device(data: Any, device: torch.device) -> Any:
    """``data`` with every tensor inside (dicts, lists, tuples) moved to ``device``.

    Example::

        >>> move_to_device({"x": [torch.zeros(1)]}, torch.device("meta"))["x"][0].device
        device(type='meta')
    """
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, Mapping):
        return {k: move_to_device(v, device) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(move_to_device(v, device) for v in data)
    return data


def _accepted_kwargs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return inputs
    return {k: v for k, v in inputs.items() if k in params}


def logits_of(output: Any) -> torch.Tensor:
    """The logits inside a model's output: a tensor, ``output.logits``, ``output["logits"]`` or ``output[0]``.

    Raises:
        TypeError: no tensor could be found.

    Example::

        >>> from types import SimpleNamespace
        >>> logits_of(SimpleNamespace(logits=torch.ones(2, 3))).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (list, tuple)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"Cannot find logits in a model output of type {type(output).__name__}; expected a tensor, an object "
            f"with `.logits`, or a tuple whose first element is the logits. Pass `forward_fn` to return logits."
        )
    return logits


def call_model(model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """Run ``model`` on ``inputs`` (``model(x)`` or ``model(**kwargs)``) and return its logits.

    Keyword inputs the model's ``forward`` does not accept (e.g. an ``idx`` column) are dropped.

    Example::

        >>> call_model(nn.Linear(3, 2), torch.zeros(4, 3)).shape
        torch.Size([4, 2])
    """
    if isinstance(inputs, dict):
        return logits_of(model(**_accepted_kwargs(model, inputs)))
    return logits_of(model(inputs))


def language_model_labels(
    inputs: torch.Tensor | dict[str, torch.Tensor], labels: torch.Tensor | None
) -> torch.Tensor | None:
    """Token labels of a language-model batch: ``labels`` if given, else ``input_ids`` with padding ignored.

    Example::

        >>> batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 0]])}
        >>> language_model_labels(batch, None).tolist()
        [[5, 6, -100]]
    """
    if labels is not None or not isinstance(inputs, dict) or "input_ids" not in inputs:
        return labels
    labels = inputs["input_ids"].clone()
    mask = inputs.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    return labels
