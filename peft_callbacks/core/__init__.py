"""Shared surgery infrastructure (plain PyTorch): model discovery, heads, target patterns, parameter bookkeeping."""

from peft_callbacks.core.heads import HeadInfo, find_head
from peft_callbacks.core.models import family_of, find_models
from peft_callbacks.core.modules import PEFTModule, peft_modules
from peft_callbacks.core.params import (
    ParameterCount,
    count_parameters,
    freeze,
    freeze_batchnorm_stats,
    unfreeze,
    unfreeze_batchnorm_stats,
)
from peft_callbacks.core.targets import resolve_targets

__all__ = [
    "HeadInfo",
    "PEFTModule",
    "ParameterCount",
    "count_parameters",
    "family_of",
    "find_head",
    "find_models",
    "freeze",
    "freeze_batchnorm_stats",
    "peft_modules",
    "resolve_targets",
    "unfreeze",
    "unfreeze_batchnorm_stats",
]
