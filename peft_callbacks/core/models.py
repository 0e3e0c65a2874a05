"""Find the pretrained networks inside a user's module, and tell which family's contract each one follows.

A LightningModule usually holds its network as an attribute (``self.model = timm.create_model(...)``,
``self.encoder = AutoModel.from_pretrained(...)``). :func:`find_models` returns the outermost timm and Hugging Face
models inside it, so surgery can use each family's own contract (``get_classifier()``, ``get_output_embeddings()``).
A module that holds neither is treated as one generic model.

Example::

    >>> import timm, torch.nn as nn
    >>> class Task(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.backbone = timm.create_model("test_vit", pretrained=False, num_classes=3)
    ...         self.loss = nn.CrossEntropyLoss()
    >>> [(path, family_of(m)) for path, m in find_models(Task())]
    [('backbone', 'timm')]
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import torch.nn as nn

from peft_callbacks._validation import check_module

log = logging.getLogger(__name__)

Family = Literal["timm", "transformers", "generic"]


def is_transformers_model(module: nn.Module) -> bool:
    """Is ``module`` a Hugging Face ``PreTrainedModel``? (Never imports transformers itself.)"""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return modeling_utils is not None and isinstance(module, modeling_utils.PreTrainedModel)


def is_timm_model(module: nn.Module) -> bool:
    """Does ``module`` follow timm's model contract (``get_classifier``, ``reset_classifier``, ``forward_features``)?"""
    return all(
        callable(getattr(module, name, None)) for name in ("get_classifier", "reset_classifier", "forward_features")
    )


def defines_forward(module: nn.Module) -> bool:
    """Does ``module`` have a working ``forward`` (not ``nn.Module``'s or ``LightningModule``'s placeholder)?

    Example::

        >>> defines_forward(nn.Linear(2, 2)), defines_forward(nn.Module())
        (True, False)
    """
    forward = getattr(type(module), "forward", None)
    if forward is None or forward is nn.Module.forward:
        return False
    return not getattr(forward, "__module__", "").startswith(("lightning.", "pytorch_lightning."))


def family_of(module: nn.Module) -> Family:
    """Which family's contract ``module`` follows: ``"timm"``, ``"transformers"`` or ``"generic"``."""
    if is_transformers_model(module):
        return "transformers"
    if is_timm_model(module):
        return "timm"
    return "generic"


def get_submodule(root: nn.Module, path: str, argument: str = "module") -> nn.Module:
    """``root.get_submodule(path)`` with an error that lists the names that do exist."""
    if path == "":
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in root.named_children()]
        raise ValueError(
            f"`{argument}`={path!r} is not a submodule of {type(root).__name__}; its top-level submodules are: "
            f"{', '.join(children) or '(none)'}."
        ) from None


def find_models(root: nn.Module, module: str | None = None) -> list[tuple[str, nn.Module]]:
    """Return ``(path, model)`` for each outermost timm or transformers model inside ``root``.

    Args:
        root: the module to search, typically a LightningModule.
        module: optional dotted path of a submodule to restrict the search to (``"model"``, ``"encoder.backbone"``).

    Returns:
        A list of ``(path relative to root, model)``. When no timm or transformers model is found, the searched
        module itself is returned as a single generic model (and a log line says so).
    """
    if module is not None and not isinstance(module, str):
        raise TypeError(f"`module` must be a dotted submodule path (str) or None, got {type(module).__name__}.")
    check_module("root", root)
    start_path = module or ""
    start = get_submodule(root, start_path)
    found: list[tuple[str, nn.Module]] = []
    _collect(start, start_path, found)
    if not found:
        log.info(
            "No timm or transformers model found in %s%s; treating it as one generic model.",
            type(start).__name__,
            f" (at {start_path!r})" if start_path else "",
        )
        found = [(start_path, start)]
    return found


def _collect(module: nn.Module, path: str, found: list[tuple[str, nn.Module]]) -> None:
    if family_of(module) != "generic":
        found.append((path, module))
        return  # outermost only: a timm model's submodules are its own business
    for name, child in module.named_children():
        _collect(child, f"{path}.{name}" if path else name, found)


def join_path(prefix: str, name: str) -> str:
    """Join two dotted module paths, either of which may be empty."""
    return f"{prefix}.{name}" if prefix and name else prefix or name
