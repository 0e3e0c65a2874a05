"""AdaLoRA: SVD-form low-rank updates whose ranks are allocated across layers during training (plain PyTorch)."""

from peft_callbacks.methods.adalora.allocator import RankAllocator, adalora_adapters, orthogonal_regularization
from peft_callbacks.methods.adalora.method import AdaLoRA, AdaLoRAConfig, check_schedule

__all__ = [
    "AdaLoRA",
    "AdaLoRAConfig",
    "RankAllocator",
    "adalora_adapters",
    "check_schedule",
    "orthogonal_regularization",
]
