"""peft_callbacks: parameter-efficient fine-tuning for PyTorch Lightning, as model surgery done by callbacks.

Add one callback to an unchanged LightningModule that wraps a timm or Hugging Face model::

    trainer = Trainer(callbacks=[LoRACallback(rank=8)])

The surgery itself (``inject_lora``, ``merge_lora``, ``count_parameters``, …) is plain PyTorch and works without a
Trainer.
"""

from peft_callbacks.callbacks.lora import LoRACallback
from peft_callbacks.core.models import find_models
from peft_callbacks.core.params import ParameterCount, count_parameters, freeze_batchnorm_stats
from peft_callbacks.lora.dora import DoRAConv, DoRAConv1D, DoRALayer, DoRALinear
from peft_callbacks.lora.inject import inject_lora, lora_disabled, lora_layers, merge_lora, unload_lora
from peft_callbacks.lora.layers import LoRAConv, LoRAConv1D, LoRALayer, LoRALinear
from peft_callbacks.lora.lora_plus import loraplus_param_groups
from peft_callbacks.lora.lora_pro import LoRAProAdamW, apply_lora_pro

__version__ = "0.1.0"

__all__ = [
    "DoRAConv",
    "DoRAConv1D",
    "DoRALayer",
    "DoRALinear",
    "LoRACallback",
    "LoRAConv",
    "LoRAConv1D",
    "LoRALayer",
    "LoRALinear",
    "LoRAProAdamW",
    "ParameterCount",
    "apply_lora_pro",
    "count_parameters",
    "find_models",
    "freeze_batchnorm_stats",
    "inject_lora",
    "lora_disabled",
    "lora_layers",
    "loraplus_param_groups",
    "merge_lora",
    "unload_lora",
]
