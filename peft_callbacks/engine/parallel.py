"""New adapters on a tensor-parallel model: split as their base layers are (see
:mod:`peft_callbacks.core.tensor_parallel`). Called by :func:`~peft_callbacks.engine.inject` right after a method
inserted its modules, before FSDP2 gives them units of their own.

Example::

    >>> import torch.nn as nn
    >>> split_new_adapters(nn.Sequential(nn.Linear(2, 2)), set())  # no split layer: nothing to do
    0
"""

from __future__ import annotations

import torch.nn as nn

from peft_callbacks.core.sharding import inside_fsdp_unit
from peft_callbacks.core.tensor_parallel import distribute_adapters
from peft_callbacks.engine.layers import AdaptedLayer
from peft_callbacks.engine.method import get_method

__all__ = ["split_new_adapters"]


def split_new_adapters(model: nn.Module, before: set[int]) -> int:
    """Split every adapter added since ``before`` (ids of the modules that existed) as its base layer is split by
    tensor parallelism; return how many were split.

    Raises:
        ValueError: naming the layer and the method, when an adapter cannot follow its base's split.
    """
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            new = [a for a in module.adapters.values() if id(a) not in before]
            if new:
                layers.append((path, module.base_layer, new))
    return distribute_adapters(
        layers, lambda path: inside_fsdp_unit(model, path), lambda adapter: get_method(adapter.method).title
    )
