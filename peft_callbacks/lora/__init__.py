"""LoRA: layers and surgery (plain PyTorch)."""

from peft_callbacks.lora.inject import inject_lora, lora_disabled, lora_layers, merge_lora, unload_lora
from peft_callbacks.lora.layers import LoRAConv, LoRAConv1D, LoRALayer, LoRALinear

__all__ = [
    "LoRAConv",
    "LoRAConv1D",
    "LoRALayer",
    "LoRALinear",
    "inject_lora",
    "lora_disabled",
    "lora_layers",
    "merge_lora",
    "unload_lora",
]
