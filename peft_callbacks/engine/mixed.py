r"""Mixed batches: each row of a batch goes through its own adapter, in one unchanged model call.

HF PEFT takes ``model(x, adapter_names=[...])``; a model called by user code (a LightningModule, ``generate``, a
pipeline) has no such argument to pass through. Here the names are set around the call instead::

    with adapters_per_row(model, ["task_a", "task_b", "__base__", "task_a"]):
        logits = model(input_ids)                # row 0 with task_a, row 1 with task_b, row 2 the base model, …

Every adapted layer then splits its input by the first dimension, runs each group of rows with that adapter alone
(``"__base__"``: none; an adapter a layer does not hold: none there) and puts the rows back in order. Each row goes
through the base layer once, so the cost is that of one pass with a few more, smaller, matrix products. The first
dimension of each adapted layer's input must be the batch (``(B, T, d)`` or ``(B, C, H, W)``): models that fold
other dimensions into it (windowed attention, beam search) need the names repeated to match.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine.adapters import using_adapter
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2, train_head=False, adapter_name="a")
    >>> net = inject_lora(net, rank=2, train_head=False, adapter_name="b")
    >>> for p in net.parameters():
    ...     _ = nn.init.normal_(p)
    >>> x = torch.randn(3, 4)
    >>> with adapters_per_row(net, ["a", "b", "__base__"]):
    ...     mixed = net(x)
    >>> with using_adapter(net, "b"):
    ...     torch.allclose(mixed[1], net(x[1:2])[0], atol=1e-6)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_module
from peft_callbacks.engine.adapters import adapter_names, module_adapters
from peft_callbacks.engine.layers import AdaptedLayer

__all__ = ["BASE", "adapters_per_row", "mixed_forward"]

BASE = "__base__"


def mixed_forward(layer: AdaptedLayer, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
    """``layer``'s output where row ``i`` of ``x`` goes through adapter ``names[i]`` (see the module docstring)."""
    if layer.merged_adapters:
        raise ValueError(
            f"Adapters {layer.merged_adapters} are merged into this layer's weight; unmerge them (unmerge_adapter) "
            f"before running a batch with an adapter per row."
        )
    if x.shape[0] != len(names):
        raise ValueError(
            f"adapters_per_row got {len(names)} adapter names, but an adapted {type(layer.base_layer).__name__} "
            f"sees a batch of {x.shape[0]} rows (input shape {tuple(x.shape)}); give one name per row of that batch."
        )
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name if name in layer.adapters else BASE, []).append(row)
    if len(groups) == 1:
        name = next(iter(groups))
        return layer.forward_with(x, [] if name == BASE else [name], *args, **kwargs)
    outputs, order = [], []
    for name, rows in groups.items():
        index = torch.tensor(rows, device=x.device)
        outputs.append(layer.forward_with(x.index_select(0, index), [] if name == BASE else [name], *args, **kwargs))
        order.extend(rows)
    inverse = torch.empty(len(order), dtype=torch.long, device=x.device)
    inverse[torch.tensor(order, device=x.device)] = torch.arange(len(order), device=x.device)
    return torch.cat(outputs).index_select(0, inverse)  # (B, …) rows back in the batch's order


@contextlib.contextmanager
def adapters_per_row(model: nn.Module, adapter_names_per_row: list[str]) -> Iterator[nn.Module]:
    """Inside the ``with`` block, row ``i`` of every batch ``model`` sees goes through adapter
    ``adapter_names_per_row[i]`` (``"__base__"``: no adapter). See the module docstring.

    Args:
        model: a model holding named adapters of weight-layer methods (LoRA, IA3, DoRA, …).
        adapter_names_per_row: one adapter name (or ``"__base__"``) per row of the batch.

    Raises:
        ValueError: an unknown name, or one that belongs to an adapter inserted beside the model's layers
            (bottleneck adapters, prompts), which apply to every row.
    """
    check_module("model", model)
    names = adapter_names_per_row
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"`adapter_names_per_row` must be a non-empty list of adapter names, got {names!r}.")
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    in_layers = {n for layer in layers for n in layer.adapters}
    unknown = sorted({n for n in names if n != BASE and n not in in_layers})
    if unknown:
        beside = [n for n in unknown if n in module_adapters(model)]
        reason = f" ({beside} apply to every row: bottleneck adapters or prompts)" if beside else ""
        raise ValueError(
            f"`adapter_names_per_row` names {unknown}, which no adapted layer of {type(model).__name__} holds"
            f"{reason}; adapters: {adapter_names(model)}, or {BASE!r} for the base model."
        )
    previous = [(layer, layer.__dict__.get("row_adapters")) for layer in layers]
    for layer in layers:
        layer.__dict__["row_adapters"] = list(names)
    try:
        yield model
    finally:
        for layer, was in previous:
            if was is None:
                layer.__dict__.pop("row_adapters", None)
            else:
                layer.__dict__["row_adapters"] = was
