"""What CorDA and LoRA-GA share: the layers they start (linear ones, each rank within what its weight allows), and
the injection of residual LoRA adapters whose starting factors were computed from data beforehand.

Both read data through the frozen base model *before* any adapter is added, then inject
:class:`~peft_callbacks.methods.lora.init.ResidualLoRAAdapter` layers and hand each its ``A₀``, ``B₀``
(:meth:`~peft_callbacks.methods.lora.init.ResidualLoRAAdapter.start_from`); the base weights are never written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn as nn

from peft_callbacks._validation import check_module
from peft_callbacks.core.heads import find_head
from peft_callbacks.core.kinds import base_weight, layer_kind
from peft_callbacks.engine import get_method, inject, transaction
from peft_callbacks.engine.patterns import layer_settings, select_layers
from peft_callbacks.methods.lora.config import LoRAConfig
from peft_callbacks.methods.lora.init import ResidualLoRAAdapter

__all__ = ["DATA_KINDS", "data_targets", "inject_started", "weight_rows"]

DATA_KINDS = ("linear", "hf_conv1d")  # HF PEFT's CorDA and LoRA-GA: nn.Linear and transformers' Conv1D


def weight_rows(layer: nn.Module) -> torch.Tensor:
    """The base weight of a linear layer as ``(out, in)`` float32 (``Conv1D`` stores it ``(in, out)``)."""
    weight = base_weight(layer).detach()
    return (weight.T if layer_kind(layer) == "hf_conv1d" else weight).float()


def data_targets(
    model: nn.Module, config: LoRAConfig, adapter_name: str, max_rank: Callable[[int, int], int], limit: str
) -> tuple[list[str], dict[str, int]]:
    """The layers ``config`` selects for a data-driven init (``config.init``), and each one's rank.

    Args:
        max_rank: the largest rank a layer of weight ``(out, in)`` allows.
        limit: that bound in words, for the error.

    Raises:
        TypeError: ``model`` or ``config`` of the wrong type.
        ValueError: an adapter of this name already there, a target that is not a linear layer, or a rank beyond
            ``max_rank``.
    """
    check_module("model", model)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"`config` must be a LoRAConfig, got {type(config).__name__}.")
    init = config.init
    method = get_method("lora")
    if method.modules(model, adapter_name):
        raise ValueError(f"{type(model).__name__} already has LoRA adapter {adapter_name!r}; unload or merge it first.")
    plain = dataclasses.replace(config, init="default")
    targets = select_layers(
        method.select(model, plain, find_head(model)), config.layers_to_transform, config.layers_pattern
    )
    others = [p for p in targets if layer_kind(model.get_submodule(p)) not in DATA_KINDS]
    if others:
        kinds = sorted({str(layer_kind(model.get_submodule(p))) for p in others})
        raise ValueError(
            f"`init`={init!r} is defined for nn.Linear and transformers' Conv1D layers (as in HF PEFT); "
            f"{type(model).__name__} has {len(others)} other target(s) ({', '.join(kinds)}): {others[:5]}. Leave them "
            f"out of `target_modules` (or add them to `exclude_modules`)."
        )
    resolved = method.resolve(model, config, targets)
    ranks = {p: layer_settings(resolved, p).rank for p in targets}
    for path, rank in ranks.items():
        out, fan_in = weight_rows(model.get_submodule(path)).shape
        if rank > max_rank(out, fan_in):
            raise ValueError(
                f"`rank`={rank} is too large for `init`={init!r} on layer {path!r} of weight ({out}, {fan_in}): "
                f"{limit}, here at most {max_rank(out, fan_in)}. Lower `rank` (or set it for this layer with "
                f"`rank_pattern`)."
            )
    return targets, ranks


def inject_started(
    model: nn.Module,
    config: LoRAConfig,
    targets: list[str],
    factors: Callable[[str, ResidualLoRAAdapter], tuple[torch.Tensor, torch.Tensor]],
    adapter_name: str,
) -> nn.Module:
    """Inject residual LoRA on ``targets`` and start each adapter from ``factors(path, adapter)`` = ``(A₀, B₀)``;
    all or nothing (a failure leaves ``model`` as it was)."""
    with transaction(model):
        inject(model, config, adapter_name=adapter_name, targets=targets)
        for path in targets:
            adapter = model.get_submodule(path).adapters[adapter_name]
            lora_A, lora_B = factors(path, adapter)
            adapter.start_from(lora_A.to(adapter.lora_A.weight.device), lora_B.to(adapter.lora_B.weight.device))
    return model
