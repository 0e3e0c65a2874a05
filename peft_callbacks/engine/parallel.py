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

from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.sharding import inside_fsdp_unit, is_dtensor
from peft_callbacks.core.tensor_parallel import distribute_adapters, tensor_parallel_split
from peft_callbacks.engine.layers import AdaptedLayer, Adapter
from peft_callbacks.engine.method import get_method

__all__ = ["is_tensor_parallel", "split_new_adapters"]


def split_new_adapters(model: nn.Module, before: set[int], title: str = "") -> int:
    """Split every adapter added since ``before`` (ids of the modules that existed) as its base layer is split by
    tensor parallelism; return how many were split.

    Raises:
        ValueError: naming the layer and the method, when an adapter cannot follow its base's split, or when a
            method that inserts modules of another kind (bottleneck adapters, prompts, parameter LoRA; ``title``)
            goes into a tensor-parallel model.
    """
    layers, others = [], []
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            new = [a for a in module.adapters.values() if id(a) not in before]
            if new:
                layers.append((path, module.base_layer, new))
        elif id(module) not in before and isinstance(module, PEFTModule) and not isinstance(module, Adapter):
            others.append(path)
    if others and is_tensor_parallel(model):
        raise ValueError(
            f"{title or 'This method'} cannot go into {type(model).__name__}, which is split by tensor parallelism: "
            f"its modules ({', '.join(others[:3])}{', …' if len(others) > 3 else ''}) would train on each rank's "
            f"slice of the activations with nothing to combine their gradients. Methods that follow a "
            f"tensor-parallel split: LoRA, DoRA and IA3; or use FSDP2 alone (tensor_parallel_size=1)."
        )
    return distribute_adapters(
        layers, lambda path: inside_fsdp_unit(model, path), lambda adapter: get_method(adapter.method).title
    )


def is_tensor_parallel(model: nn.Module) -> bool:
    """Does tensor parallelism split any parameter of ``model`` (beyond FSDP2's sharding)?

    Example::

        >>> is_tensor_parallel(nn.Linear(2, 2))
        False
    """
    for path, module in model.named_modules():
        param = next((p for p in module.parameters(recurse=False) if is_dtensor(p)), None)
        if param is not None:
            try:
                split = tensor_parallel_split(param, sharded_by_fsdp=inside_fsdp_unit(model, path))
            except ValueError:
                return True  # a layout of its own: not FSDP2's
            if split is not None:
                return True
    return False
