"""LoRA and its variants (rsLoRA, DoRA, LoRA+, LoRA-Pro) as a method of the engine (plain PyTorch)."""

from peft_callbacks.methods.lora.dora import DoRAAdapter, DoRAConv, DoRAConv1D, DoRALinear
from peft_callbacks.methods.lora.layers import LoRAAdapter, LoRAConv, LoRAConv1D, LoRALinear
from peft_callbacks.methods.lora.method import (
    LoRAConfig,
    inject_lora,
    lora_disabled,
    lora_layers,
    merge_lora,
    unload_lora,
)
from peft_callbacks.methods.lora.plus import lora_B_parameters, loraplus_param_groups, split_loraplus_groups
from peft_callbacks.methods.lora.pro import (
    LoRAProAdamW,
    apply_lora_pro,
    equivalent_gradient,
    lora_pro_gradients,
    solve_sylvester,
)
from peft_callbacks.methods.lora.weighted import add_weighted_adapter

__all__ = [
    "DoRAAdapter",
    "DoRAConv",
    "DoRAConv1D",
    "DoRALinear",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRAConv",
    "LoRAConv1D",
    "LoRALinear",
    "LoRAProAdamW",
    "add_weighted_adapter",
    "apply_lora_pro",
    "equivalent_gradient",
    "inject_lora",
    "lora_B_parameters",
    "lora_disabled",
    "lora_layers",
    "lora_pro_gradients",
    "loraplus_param_groups",
    "merge_lora",
    "solve_sylvester",
    "split_loraplus_groups",
    "unload_lora",
]
