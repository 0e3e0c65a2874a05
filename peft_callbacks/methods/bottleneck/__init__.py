"""Bottleneck adapters (Houlsby / Pfeiffer): module, insertion points and method (plain PyTorch)."""

from peft_callbacks.methods.bottleneck.layers import BottleneckAdapter
from peft_callbacks.methods.bottleneck.method import (
    BottleneckConfig,
    adapter_layers,
    inject_adapters,
    is_norm_layer,
    remove_adapters,
)
from peft_callbacks.methods.bottleneck.points import find_insertion_points

__all__ = [
    "BottleneckAdapter",
    "BottleneckConfig",
    "adapter_layers",
    "find_insertion_points",
    "inject_adapters",
    "is_norm_layer",
    "remove_adapters",
]
