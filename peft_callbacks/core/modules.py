"""The base class of every module this library inserts into a model.

Surgery finds its own modules with ``isinstance(m, PEFTModule)``, never by name, so a user's module called
``lora_head`` or ``adapter`` is never mistaken for one of ours, and target resolution never adapts the inside of a
module we inserted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.nn as nn

from peft_callbacks._validation import check_module


class PEFTModule(nn.Module):
    """Marker base class for LoRA layers, adapters and prompts inserted by ``peft_callbacks``."""


def peft_modules(model: nn.Module, kind: type[PEFTModule] = PEFTModule) -> dict[str, PEFTModule]:
    """``{path: module}`` of every inserted module of type ``kind`` inside ``model``, outermost first."""
    check_module("model", model)
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def modules_at(model: nn.Module, paths: Iterable[str], error: Callable[[list[str]], Exception]) -> dict[str, nn.Module]:
    """``{path: module}`` of every module of ``model``, once each of ``paths`` (recorded earlier, not patterns) is
    known to be one of them.

    Raises:
        Exception: ``error(missing)``, built from the paths ``model`` does not have (the caller words it).

    Example::

        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> sorted(modules_at(model, ["0"], ValueError))
        ['', '0']
        >>> modules_at(model, ["0", "1"], lambda missing: KeyError(f"no module at {missing}"))
        Traceback (most recent call last):
        ...
        KeyError: "no module at ['1']"
    """
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise error(missing)
    return modules
