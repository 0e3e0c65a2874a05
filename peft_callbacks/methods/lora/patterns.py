"""LoRA's per-layer settings (``rank_pattern``, ``alpha_pattern``) resolved to the exact layers they set.

At injection the keys (PEFT's regex semantics, :mod:`peft_callbacks.engine.patterns`) become the exact paths of the
adapted layers whose rank or alpha differs from the config's: that is what recipes, adapter files and the
``adapter_config.json`` of an export hold, and what PEFT reads back with the same result.

Example::

    >>> import torch.nn as nn
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    >>> resolve_lora_patterns(net, LoRAConfig(rank=8, rank_pattern={"1": 2}), ["0", "1"]).rank_pattern
    {'1': 2}
"""

from __future__ import annotations

import torch.nn as nn

from peft_callbacks.engine.patterns import resolve_patterns
from peft_callbacks.methods.lora.config import LoRAConfig

__all__ = ["resolve_lora_patterns"]


def resolve_lora_patterns(model: nn.Module, config: LoRAConfig, targets: list[str]) -> LoRAConfig:
    """``config`` with ``rank_pattern`` / ``alpha_pattern`` keyed by the exact ``targets`` they set.

    Raises:
        ValueError: a key that matches none of ``targets`` (naming the field, the key and some targets).
    """
    if not config.rank_pattern and not config.alpha_pattern:
        return config
    resolved = resolve_patterns(
        {"rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern},
        targets,
        {"rank_pattern": config.rank, "alpha_pattern": config.alpha},
    )
    return config.replace(**resolved)
