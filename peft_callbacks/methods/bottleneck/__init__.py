"""Bottleneck adapters (Houlsby / Pfeiffer): module, insertion points and surgery (plain PyTorch)."""

from peft_callbacks.adapters.bottleneck import BottleneckAdapter
from peft_callbacks.adapters.inject import adapter_layers, inject_adapters, remove_adapters
from peft_callbacks.adapters.points import find_insertion_points

__all__ = ["BottleneckAdapter", "adapter_layers", "find_insertion_points", "inject_adapters", "remove_adapters"]
