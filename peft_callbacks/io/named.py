"""One named adapter out of several, for adapter files: its tensors, its records, and its keys under another name.

Example::

    >>> import torch.nn as nn
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2, adapter_name="a")
    >>> net = inject_lora(net, rank=2, target_modules=["0"], train_head=False, adapter_name="b")
    >>> sorted(adapter_state(net, "b"))  # adapter b, and what trains outside the adapters (none here)
    ['0.adapters.b.lora_A.weight', '0.adapters.b.lora_B.weight']
    >>> from peft_callbacks.core.recipe import surgery_records
    >>> records = [r for r in surgery_records(net) if r["adapter_name"] == "b"]
    >>> renamed_keys(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), records, "c")["0.adapters.b.lora_A.weight"]
    '0.adapters.c.lora_A.weight'
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from peft_callbacks.engine.adapters import module_adapters
from peft_callbacks.engine.layers import DEFAULT_ADAPTER, AdaptedLayer
from peft_callbacks.engine.shadow import expected_shapes, meta_shadow
from peft_callbacks.engine.surgery import unload
from peft_callbacks.io.state import peft_owned, trained_state

__all__ = ["adapter_state", "record_names", "renamed_keys"]


def record_names(records: list[dict[str, Any]]) -> list[str]:
    """The adapter names of recorded surgeries, each once, in order.

    Example::

        >>> record_names([{"method": "lora", "adapter_name": "a"}, {"method": "ia3"}])
        ['a', 'default']
    """
    return list(dict.fromkeys(r.get("adapter_name", DEFAULT_ADAPTER) for r in records))


def adapter_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` of adapter ``adapter_name`` and of what trains outside every adapter (the task head)."""
    own: set[int] = set()
    for layer in (m for m in model.modules() if isinstance(m, AdaptedLayer)):
        if adapter_name in layer.adapters:
            own.update(
                id(t) for t in [*layer.adapters[adapter_name].parameters(), *layer.adapters[adapter_name].buffers()]
            )
    for module in module_adapters(model).get(adapter_name, []):
        own.update(id(t) for t in [*module.parameters(), *module.buffers()])
    owned = peft_owned(model)
    state = model.state_dict(keep_vars=True)
    return {k: t for k, t in trained_state(model).items() if id(state[k]) not in owned or id(state[k]) in own}


def renamed_keys(base: nn.Module, records: list[dict[str, Any]], adapter_name: str) -> dict[str, str]:
    """``{key under the recorded name: key under adapter_name}`` of every tensor that replaying ``records`` (one
    adapter) on ``base`` creates; found by replaying both on ``meta`` shadows of ``base`` without its adapters."""
    shadow = meta_shadow(base)
    unload(shadow)
    renamed = [{**r, "adapter_name": adapter_name} for r in records]
    return dict(zip(expected_shapes(shadow, records), expected_shapes(shadow, renamed)))
