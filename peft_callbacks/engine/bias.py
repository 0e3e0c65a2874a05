"""Which bias vectors of the base model train with an adapter: HF PEFT's ``bias="none" | "all" | "lora_only"``.

* ``"none"``: none (the default).
* ``"all"``: every parameter of the model named ``bias`` (PEFT's rule: the key is ``bias`` or ends with ``.bias``).
* ``"lora_only"`` (PEFT's ``"<method>_only"``): the biases of the layers this adapter wraps.

The biases stay where they are; they are trained, saved with the adapter (:mod:`peft_callbacks.io.state` keeps every
trainable tensor) and exported under PEFT's keys (``<path>.base_layer.bias`` for a wrapped layer). Merging leaves them
as they are: they already are the model's own biases.

Example::

    >>> import torch.nn as nn
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), rank=2,
    ...                   target_modules=["0"], train_head=False, bias="lora_only")
    >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
    ['0.adapters.default.lora_A.weight', '0.adapters.default.lora_B.weight', '0.base_layer.bias']
"""

from __future__ import annotations

import torch
import torch.nn as nn

from peft_callbacks.core.modules import PEFTModule

__all__ = ["BIAS_CHOICES", "bias_rule", "trained_biases"]

BIAS_CHOICES = ("none", "all", "lora_only")


def bias_rule(config: object) -> str:
    """The config's ``bias`` setting (``"none"`` for methods that have none)."""
    return getattr(config, "bias", "none")


def trained_biases(model: nn.Module, rule: str, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{key: parameter}`` of the base biases ``rule`` trains; ``layers`` are the adapter's wrapped layers
    (``{path: AdaptedLayer}``). Tensors of PEFT modules (a LoRA ``lora_B.bias``) are the adapter's own, not listed."""
    if rule == "none":
        return {}
    if rule == "lora_only":
        found = {f"{path}.base_layer.bias": getattr(layer.base_layer, "bias", None) for path, layer in layers.items()}
        return {key: p for key, p in found.items() if isinstance(p, nn.Parameter)}
    owned = {id(p) for m in model.modules() if isinstance(m, PEFTModule) for p in _own_tensors(m)}
    return {
        key: p for key, p in model.named_parameters() if (key == "bias" or key.endswith(".bias")) and id(p) not in owned
    }


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors of a PEFT module, the base layer it wraps left out."""
    base = getattr(module, "base_layer", None)
    skip = {id(p) for p in base.parameters()} if isinstance(base, nn.Module) else set()
    return [p for p in module.parameters() if id(p) not in skip]
