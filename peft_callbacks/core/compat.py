"""Compatibility with framework features that assume a fully trainable model (plain PyTorch, no Lightning).

Reentrant activation checkpointing (``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)``, which
transformers uses when a user passes ``gradient_checkpointing_kwargs={"use_reentrant": True}``) computes no gradient
for a checkpointed block when none of its *inputs* requires grad: with a frozen embedding layer in front, the LoRA
factors inside the blocks silently stay untouched. HF PEFT answers this with
``model.enable_input_require_grads()`` when checkpointing is already on at wrapping time; transformers does it itself
for text models only. :func:`enable_input_grads_for_checkpointing` covers every transformers model (vision ones too)
and checkpointing switched on before or after the surgery, and costs nothing while checkpointing is off.

Example::

    >>> import torch, transformers
    >>> config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
    ...                                 num_attention_heads=2, intermediate_size=37)
    >>> vit = transformers.ViTModel(config)
    >>> _ = vit.requires_grad_(False)
    >>> enable_input_grads_for_checkpointing(vit)
    ['embeddings.patch_embeddings']
    >>> pixels = torch.randn(1, 3, 32, 32)
    >>> vit.embeddings.patch_embeddings(pixels).requires_grad  # checkpointing is off: nothing changes
    False
    >>> vit.gradient_checkpointing_enable({"use_reentrant": True})
    >>> vit.embeddings.patch_embeddings(pixels).requires_grad
    True
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from peft_callbacks._validation import check_module
from peft_callbacks.core.models import is_transformers_model

__all__ = ["disable_input_grads_for_checkpointing", "enable_input_grads_for_checkpointing"]

log = logging.getLogger(__name__)

_HOOK_ATTR = "_peft_input_grads_hook"


class _InputsRequireGrad:
    """Forward hook on an input-embedding layer: its output requires grad while activation checkpointing is on.

    A callable object rather than a closure, so hooked models still pickle and deep-copy.
    """

    def __init__(self, checkpointable: list[nn.Module], always: bool = False) -> None:
        self.checkpointable = checkpointable
        self.always = always

    def checkpointing(self) -> bool:
        return self.always or any(getattr(m, "gradient_checkpointing", False) is True for m in self.checkpointable)

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        if (
            isinstance(output, torch.Tensor)
            and output.is_floating_point()
            and not output.requires_grad
            and torch.is_grad_enabled()
            and self.checkpointing()
        ):
            output.requires_grad_(True)


def _input_embeddings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the input embeddings of every transformers model inside ``model`` (each once)."""
    found: dict[int, tuple[str, nn.Module]] = {}
    paths = {id(m): name for name, m in model.named_modules()}
    for sub in model.modules():
        if not is_transformers_model(sub):
            continue
        try:
            embeddings = sub.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(embeddings, nn.Module) and id(embeddings) in paths:
            found.setdefault(id(embeddings), (paths[id(embeddings)], embeddings))
    return list(found.values())


def _is_reversible(module: nn.Module) -> bool:
    """A reversible residual layer (Reformer's): its blocks run inside a custom autograd function whose backward
    recomputes them, and autograd only calls it when the function's input requires grad."""
    return callable(getattr(type(module), "backward_pass", None))


def enable_input_grads_for_checkpointing(model: nn.Module) -> list[str]:
    """Let gradients reach adapters inside reentrant-checkpointed blocks of a partly frozen transformers model.

    A forward hook on each input-embedding layer (found through transformers' ``get_input_embeddings()``) marks its
    output as requiring grad, but only while gradients are enabled and activation checkpointing is switched on
    (``gradient_checkpointing_enable()``, before or after this call), and always in models with reversible residual
    layers (Reformer), which hide their blocks from autograd the same way. Calling it again changes nothing. Models
    that are not transformers models are left alone (timm checkpoints non-reentrantly by default).

    Args:
        model: any ``nn.Module``; transformers models inside it are handled.

    Returns:
        The paths of the embedding layers that carry the hook (empty when there is nothing to do).
    """
    check_module("model", model)
    checkpointable = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    reversible = any(_is_reversible(m) for m in model.modules())
    hooked = []
    for path, embeddings in _input_embeddings(model):
        if not hasattr(embeddings, _HOOK_ATTR):
            handle = embeddings.register_forward_hook(_InputsRequireGrad(checkpointable, always=reversible))
            setattr(embeddings, _HOOK_ATTR, handle)
        hooked.append(path)
    if hooked:
        log.debug("Input embeddings %s require grad under activation checkpointing.", hooked)
    return hooked


def disable_input_grads_for_checkpointing(model: nn.Module) -> int:
    """Take the hooks of :func:`enable_input_grads_for_checkpointing` out of ``model`` again (when no surgery is left,
    so that the plain model pickles without this library); return how many were removed.

    Example::

        >>> disable_input_grads_for_checkpointing(nn.Linear(2, 2))
        0
    """
    removed = 0
    for module in check_module("model", model).modules():
        handle = module.__dict__.pop(_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            removed += 1
    return removed
