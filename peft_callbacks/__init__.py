"""peft_callbacks: parameter-efficient fine-tuning for PyTorch Lightning, as model surgery done by callbacks.

Add one callback to an unchanged LightningModule that wraps a timm or Hugging Face model::

    trainer = Trainer(callbacks=[LoRACallback(rank=8)])

The surgery itself (``inject_lora``, ``merge_lora``, ``count_parameters``, …) is plain PyTorch and works without a
Trainer.
"""

from peft_callbacks.callbacks.freezing import FreezeBackbone, HeadOnly, HeadThenFull, LayerwiseUnfreezing
from peft_callbacks.callbacks.lora import LoRACallback
from peft_callbacks.core.models import find_models
from peft_callbacks.core.params import ParameterCount, count_parameters, freeze_batchnorm_stats
from peft_callbacks.freezing import LayerFreezer, describe_layers, freeze_layers, split_layers
from peft_callbacks.lora.inject import inject_lora, lora_disabled, lora_layers, merge_lora, unload_lora
from peft_callbacks.lora.layers import LoRAConv, LoRAConv1D, LoRALayer, LoRALinear

__version__ = "0.1.0"

__all__ = [
    "FreezeBackbone",
    "HeadOnly",
    "HeadThenFull",
    "LayerFreezer",
    "LayerwiseUnfreezing",
    "LoRACallback",
    "LoRAConv",
    "LoRAConv1D",
    "LoRALayer",
    "LoRALinear",
    "ParameterCount",
    "count_parameters",
    "describe_layers",
    "find_models",
    "freeze_batchnorm_stats",
    "freeze_layers",
    "inject_lora",
    "lora_disabled",
    "lora_layers",
    "merge_lora",
    "split_layers",
    "unload_lora",
]
