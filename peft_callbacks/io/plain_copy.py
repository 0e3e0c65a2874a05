"""A model object without anything of ours in it, for the hyper-parameters Lightning pickles into a checkpoint.

A module that calls ``self.save_hyperparameters()`` with a model among its ``__init__`` arguments makes Lightning
pickle that model object into every checkpoint (``checkpoint["hyper_parameters"]``), and after surgery it is the
adapted model, full of our classes: a process without peft_callbacks could not unpickle it. :func:`plain_copy` makes
the model as a plain model instead: a structural copy (every tensor shared, none copied) with each adapted layer
replaced by its base layer holding the merged weight, every other inserted module and hook of ours taken out.
Shared tensors keep the checkpoint small: ``torch.save`` writes each storage once, and the merged weights are the
very tensors of the checkpoint's ``state_dict``.

Example::

    >>> import pickle, torch.nn as nn
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> tuned = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
    >>> plain = plain_copy(tuned)
    >>> type(plain[0]).__name__, plain[1].weight is tuned[1].weight, b"peft_callbacks" in pickle.dumps(plain)
    ('Linear', True, False)
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks.engine.hooks import _DICTS
from peft_callbacks.engine.layers import AdaptedLayer
from peft_callbacks.engine.method import replace_module
from peft_callbacks.engine.surgery import unload

__all__ = ["carries_ours", "plain_copy", "plain_hyperparameters"]

_PACKAGE = "peft_callbacks"


def _ours(obj: Any) -> bool:
    """Is ``obj`` (a hook, a marker) a function, method or object defined in this package?"""
    target = getattr(obj, "func", obj)  # functools.partial
    target = getattr(target, "__func__", target)  # bound methods
    module = getattr(target, "__module__", None) if callable(target) and hasattr(target, "__code__") else None
    module = module or type(target).__module__
    return isinstance(module, str) and (module == _PACKAGE or module.startswith(_PACKAGE + "."))


def carries_ours(model: nn.Module) -> bool:
    """Does ``model`` hold a module, a hook or a marker of this package?

    Example::

        >>> carries_ours(nn.Linear(2, 2))
        False
    """
    for m in model.modules():
        if _ours(m) or any(k.startswith("_peft") for k in m.__dict__):
            return True
        if any(_ours(h) for name in _DICTS for h in getattr(m, name).values()):
            return True
    return False


def _strip_hooks_and_markers(model: nn.Module) -> None:
    for m in model.modules():
        for main, extra in _DICTS.items():
            hooks = getattr(m, main)
            for key in [k for k, hook in hooks.items() if _ours(hook)]:
                del hooks[key]
                for name in extra:
                    getattr(m, name).pop(key, None)
        for key in [k for k in m.__dict__ if k.startswith("_peft")]:
            del m.__dict__[key]


def plain_copy(
    model: nn.Module, merged: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None, *, fold: bool = True
) -> nn.Module:
    """``model`` as a plain model: adapted layers folded, other inserted modules and our hooks taken out.

    Args:
        model: a model that may carry surgery; left unchanged.
        merged: ``{adapted layer path: (weight, bias)}`` to put into the copy's base layers (e.g. the merged tensors
            of a checkpoint's ``state_dict``); layers not listed are folded here (float32, cast once).
        fold: fold the adapters of adapted layers into the copy's weights; ``False`` keeps the base weights (the
            model before surgery, e.g. for a checkpoint that stores the adapted layout).

    Returns:
        A copy sharing every tensor with ``model`` except the merged weights.
    """
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    plain = copy.deepcopy(model, memo)
    merged = dict(merged or {})
    for path, layer in [(p, m) for p, m in plain.named_modules(remove_duplicate=False) if isinstance(m, AdaptedLayer)]:
        if fold and path not in merged:
            names = [] if layer.disabled else [n for n in layer.active_adapters if n not in layer.merged_adapters]
            if all(layer.adapters[n].mergeable for n in names):
                with torch.no_grad():
                    weight = layer.merged_weight(names).to(layer.base_layer.weight.dtype)
                    bias = layer.merged_bias(names)
                merged[path] = (weight, None if bias is None else bias.to(layer.base_layer.bias.dtype))
        base = layer.base_layer
        weight, bias = merged.get(path, (None, None))
        if weight is not None:
            base._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
        if bias is not None and base._parameters.get("bias") is not None:
            base._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
        if path:
            replace_module(plain, path, base)
    unload(plain)  # prompts, bottleneck adapters and their hooks
    _strip_hooks_and_markers(plain)
    return plain


def plain_hyperparameters(
    model: nn.Module, checkpoint: dict[str, Any], *, fold: bool = True, key: str = "hyper_parameters"
) -> list[str]:
    """Replace every model object among ``checkpoint[key]``'s values that carries anything of ours by its
    :func:`plain_copy` (the checkpoint's merged ``state_dict`` tensors reused); return the names replaced.

    ``model`` is the module the checkpoint's ``state_dict`` belongs to; the values themselves are left unchanged.
    ``fold`` as for :func:`plain_copy` (``False`` when the checkpoint keeps the adapted layout).
    """
    hparams = checkpoint.get(key)
    if not isinstance(hparams, dict):
        return []
    state = checkpoint.get("state_dict", {})
    paths = {id(m): p for p, m in model.named_modules()}
    replaced = []
    for name, value in list(hparams.items()):
        if not isinstance(value, nn.Module) or not carries_ours(value):
            continue
        prefix = paths.get(id(value))
        merged = {}
        if prefix is not None:
            lead = f"{prefix}." if prefix else ""
            for path, layer in value.named_modules(remove_duplicate=False):
                weight = state.get(f"{lead}{path}.weight")
                folded = f"{lead}{path}.base_layer.weight" not in state
                if isinstance(layer, AdaptedLayer) and folded and weight is not None:
                    merged[path] = (weight, state.get(f"{lead}{path}.bias"))
        hparams[name] = plain_copy(value, merged, fold=fold)
        replaced.append(name)
    return replaced
