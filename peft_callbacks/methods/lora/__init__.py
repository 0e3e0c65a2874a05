"""LoRA and its variants (rsLoRA, DoRA, PiSSA/OLoRA, LoRA on parameters, LoRA+, LoRA-Pro; on embeddings and
``nn.MultiheadAttention``; trainable tokens) as a method of the engine (plain PyTorch)."""

from peft_callbacks.methods.lora.config import LoRAConfig
from peft_callbacks.methods.lora.dora import DoRAAdapter, DoRAConv, DoRAConv1D, DoRALinear
from peft_callbacks.methods.lora.embedding import LoRAEmbedding
from peft_callbacks.methods.lora.init import (
    ResidualLoRAAdapter,
    ResidualLoRAConv,
    ResidualLoRAConv1D,
    ResidualLoRALinear,
    principal_factors,
)
from peft_callbacks.methods.lora.layers import LoRAAdapter, LoRAConv, LoRAConv1D, LoRALinear
from peft_callbacks.methods.lora.method import (
    inject_lora,
    lora_disabled,
    lora_layers,
    merge_lora,
    unload_lora,
)
from peft_callbacks.methods.lora.mha import LoRAMultiheadAttention
from peft_callbacks.methods.lora.params import ParameterLoRA
from peft_callbacks.methods.lora.plus import lora_B_parameters, loraplus_param_groups, split_loraplus_groups
from peft_callbacks.methods.lora.pro import (
    LoRAProAdamW,
    apply_lora_pro,
    equivalent_gradient,
    lora_pro_gradients,
    solve_sylvester,
)
from peft_callbacks.methods.lora.tokens import TrainableTokens
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
    "LoRAEmbedding",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LoRAProAdamW",
    "ParameterLoRA",
    "ResidualLoRAAdapter",
    "ResidualLoRAConv",
    "ResidualLoRAConv1D",
    "ResidualLoRALinear",
    "TrainableTokens",
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
    "principal_factors",
    "solve_sylvester",
    "split_loraplus_groups",
    "unload_lora",
]
