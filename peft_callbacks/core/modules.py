"""The base class of every module this library inserts into a model.

Surgery finds its own modules with ``isinstance(m, PEFTModule)``, never by name, so a user's module called
``lora_head`` or ``adapter`` is never mistaken for one of ours, and target resolution never adapts the inside of a
module we inserted.
"""

from __future__ import annotations

import torch.nn as nn

from peft_callbacks._validation import check_module


class PEFTModule(nn.Module):
    """Marker base class for LoRA layers, adapters and prompts inserted by ``peft_callbacks``."""


def peft_modules(model: nn.Module, kind: type[PEFTModule] = PEFTModule) -> dict[str, PEFTModule]:
    """``{path: module}`` of every inserted module of type ``kind`` inside ``model``, outermost first."""
    check_module("model", model)
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}
