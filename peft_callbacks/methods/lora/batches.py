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

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

__all__ = ["default_forward", "model_device", "probe_batches", "read_layer_inputs", "to_device", "token_mask"]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: ``model(**batch)`` for a mapping (transformers), ``model(batch[0])`` for a tuple or
    list (``(inputs, targets)``), ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(
            f"a batch of `dataloader` must be a mapping of model inputs, an (inputs, targets) tuple or a tensor; got "
            f"{type(batch).__name__} {str(batch)[:60]!r}. For other layouts pass `forward_fn(model, batch)`."
        )
    return model(inputs)


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


def read_layer_inputs(
    model: nn.Module,
    dataloader: Iterable,
    targets: list[str],
    record: Callable[[str, torch.Tensor, torch.Tensor | None], None],
    *,
    what: str,
    num_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    mask_fn: Callable[[Any], torch.Tensor | None] = token_mask,
) -> dict[str, str]:
    """Run the first ``num_batches`` batches through ``model`` (in eval mode, restored after) and hand each target
    layer's input to ``record(path, x, mask)``, ``mask`` being ``mask_fn(batch)`` (which tokens count, or ``None``).

    Layers fed the very same tensor (q, k, v of one attention block) are read once: ``record`` sees only the first of
    them, and the returned ``{path: first}`` says which one each target shares.

    Args:
        what: the initialisation, for the errors (``"EVA"``, ``"CorDA"``).

    Raises:
        ValueError: no batch, or a target that never ran.

    Example::

        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        >>> rows = {}
        >>> def record(path, x, mask):
        ...     rows[path] = x.shape
        >>> groups = read_layer_inputs(model, [torch.randn(5, 3)], ["0", "1"], record, what="a probe")
        >>> groups, rows["1"]
        ({'0': '0', '1': '1'}, torch.Size([5, 4]))
    """
    groups: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    state: dict[str, Any] = {"mask": None, "alive": []}

    def hook(path: str) -> Callable:
        def read(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            if path not in groups:  # the first batch: layers fed the very same tensor share one reading
                groups[path] = seen.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), path)
                state["alive"].append(x)  # held through the batch: a freed input's address could be reused
            if groups[path] == path:
                record(path, x.detach(), state["mask"])

        return read

    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p), with_kwargs=True) for p in targets]
    training, count = model.training, 0
    model.eval()
    try:
        for batch in probe_batches(dataloader, model, num_batches=num_batches):
            state["mask"] = mask_fn(batch)
            forward_fn(model, batch)
            state["alive"].clear()
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    if count == 0:
        raise ValueError(f"`dataloader` gave no batch: {what} needs a few batches of inputs to initialise LoRA.")
    silent = [p for p in targets if p not in groups]
    if silent:
        raise ValueError(f"{what}: layers {silent[:5]} never ran on the batches; exclude them from the targets.")
    log.info(
        "%s: %d batch(es), %d distinct layer input(s) over %d layer(s)",
        what,
        count,
        len(set(groups.values())),
        len(targets),
    )
    return groups
