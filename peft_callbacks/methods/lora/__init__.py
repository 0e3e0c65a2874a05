"""LoRA: layers and surgery (plain PyTorch)."""

from peft_callbacks.lora.dora import DoRAConv, DoRAConv1D, DoRALayer, DoRALinear
from peft_callbacks.lora.inject import inject_lora, lora_disabled, lora_layers, merge_lora, unload_lora
from peft_callbacks.lora.layers import LoRAConv, LoRAConv1D, LoRALayer, LoRALinear
from peft_callbacks.lora.lora_plus import lora_B_parameters, loraplus_param_groups, split_loraplus_groups
from peft_callbacks.lora.lora_pro import (
    LoRAProAdamW,
    apply_lora_pro,
    equivalent_gradient,
    lora_pro_gradients,
    solve_sylvester,
)

__all__ = [
    "DoRAConv",
    "DoRAConv1D",
    "DoRALayer",
    "DoRALinear",
    "LoRAConv",
    "LoRAProAdamW",
    "LoRAConv1D",
    "LoRALayer",
    "LoRALinear",
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
