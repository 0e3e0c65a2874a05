"""Dry runs: replay a recipe on a ``meta``-device shadow of a model to learn what it would create, allocating nothing.

A recipe read from a file is untrusted: a rank of 2**31 would reach an allocation before anything compared it with
the stored tensors. :func:`expected_shapes` replays the recipe on a shadow of the model (the same modules, every
tensor on ``meta``, no data copied) and returns the shape of every tensor the surgery would add, so a file can be
checked against its own tensors first.

Example::

    >>> import torch.nn as nn
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> records = [{"method": "lora", "config": {**LoRAConfig(rank=2**31).to_dict(), "targets": ["0"]}}]
    >>> expected_shapes(nn.Sequential(nn.Linear(4, 4)), records)["0.adapters.default.lora_A.weight"]
    (2147483648, 4)
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks.core import kinds
from peft_callbacks.core.modules import PEFTModule

__all__ = ["expected_shapes", "meta_shadow"]


def meta_shadow(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are all on ``meta`` (no tensor data is copied)."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    shadow = copy.deepcopy(model, memo)
    for original, copied in zip(model.modules(), shadow.modules()):
        if original in kinds._PROBED:  # what a probe found on real weights holds for the shadow too
            kinds._PROBED[copied] = kinds._PROBED[original]
        elif kinds._overrides_forward(original):
            kinds._PROBED[copied] = not kinds.is_custom_layer(original)
    return shadow


def expected_shapes(model: nn.Module, records: list[dict[str, Any]]) -> dict[str, tuple[int, ...]]:
    """``{state_dict key: shape}`` of every tensor that replaying ``records`` on ``model`` would add.

    Raises:
        TypeError/ValueError: a malformed record, as :func:`~peft_callbacks.engine.replay` would raise.
    """
    from peft_callbacks.engine.surgery import replay

    shadow = meta_shadow(model)
    before = {id(t) for m in shadow.modules() if isinstance(m, PEFTModule) for t in m.parameters()}
    with torch.device("meta"):
        replay(shadow, records)
    owned = {
        id(t)
        for m in shadow.modules()
        if isinstance(m, PEFTModule)
        for t in itertools.chain(m.parameters(), m.buffers())
        if id(t) not in before
    }
    base = {id(t) for m in shadow.modules() if hasattr(m, "base_layer") for t in m.base_layer.parameters()}
    return {
        key: tuple(t.shape)
        for key, t in shadow.state_dict(keep_vars=True).items()
        if id(t) in owned and id(t) not in base
    }
