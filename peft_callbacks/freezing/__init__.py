"""Freezing as surgery (plain PyTorch): a model's ordered layers, and freezing/unfreezing them."""

from peft_callbacks.freezing.freeze import LayerFreezer, freeze_layers, resolve_freeze
from peft_callbacks.freezing.layers import Layer, describe_layers, split_layers
from peft_callbacks.freezing.optim import add_param_group, extend_schedulers, remove_parameters

__all__ = [
    "Layer",
    "LayerFreezer",
    "add_param_group",
    "describe_layers",
    "extend_schedulers",
    "freeze_layers",
    "remove_parameters",
    "resolve_freeze",
    "split_layers",
]
