"""peft_callbacks: parameter-efficient fine-tuning for PyTorch Lightning, as model surgery done by callbacks.

Add one callback to an unchanged LightningModule that wraps a timm or Hugging Face model::

    trainer = Trainer(callbacks=[LoRACallback(rank=8)])

The surgery itself (``inject_lora``, ``merge_lora``, ``count_parameters``, …) is plain PyTorch and works without a
Trainer.
"""

from peft_callbacks.adapters import BottleneckAdapter, adapter_layers, inject_adapters, remove_adapters
from peft_callbacks.callbacks.adapters import AdapterCallback
from peft_callbacks.callbacks.forgetting import ForgettingMonitor
from peft_callbacks.callbacks.freezing import FreezeBackbone, HeadOnly, HeadThenFull, LayerwiseUnfreezing
from peft_callbacks.callbacks.lora import LoRACallback
from peft_callbacks.callbacks.prompts import PromptTuningCallback, VisualPromptCallback
from peft_callbacks.callbacks.slim import SlimCheckpoint
from peft_callbacks.core.models import find_models
from peft_callbacks.core.params import ParameterCount, count_parameters, freeze_batchnorm_stats
from peft_callbacks.freezing import LayerFreezer, describe_layers, freeze_layers, split_layers
from peft_callbacks.io import AdapterFileError, export_peft, import_peft, load_adapter, save_adapter
from peft_callbacks.lora.dora import DoRAConv, DoRAConv1D, DoRALayer, DoRALinear
from peft_callbacks.lora.inject import inject_lora, lora_disabled, lora_layers, merge_lora, unload_lora
from peft_callbacks.lora.layers import LoRAConv, LoRAConv1D, LoRALayer, LoRALinear
from peft_callbacks.lora.lora_plus import loraplus_param_groups
from peft_callbacks.lora.lora_pro import LoRAProAdamW, apply_lora_pro
from peft_callbacks.prompts import (
    SoftPrompt,
    VisualPrompts,
    inject_prompt_tuning,
    inject_visual_prompts,
    remove_prompt_tuning,
    remove_visual_prompts,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterCallback",
    "AdapterFileError",
    "BottleneckAdapter",
    "DoRAConv",
    "DoRAConv1D",
    "DoRALayer",
    "DoRALinear",
    "ForgettingMonitor",
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
    "LoRAProAdamW",
    "ParameterCount",
    "PromptTuningCallback",
    "SlimCheckpoint",
    "SoftPrompt",
    "VisualPromptCallback",
    "VisualPrompts",
    "adapter_layers",
    "apply_lora_pro",
    "count_parameters",
    "describe_layers",
    "export_peft",
    "find_models",
    "freeze_batchnorm_stats",
    "freeze_layers",
    "import_peft",
    "inject_adapters",
    "inject_lora",
    "inject_prompt_tuning",
    "inject_visual_prompts",
    "load_adapter",
    "lora_disabled",
    "lora_layers",
    "loraplus_param_groups",
    "merge_lora",
    "remove_adapters",
    "remove_prompt_tuning",
    "remove_visual_prompts",
    "save_adapter",
    "split_layers",
    "unload_lora",
]
