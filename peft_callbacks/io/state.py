"""Split a model's ``state_dict`` into what fine-tuning trained and what it left as the frozen base.

Both adapter files and slim checkpoints keep only the *trained* part, chosen by tensor identity, never by name:

* every parameter and buffer of every :class:`~peft_callbacks.core.modules.PEFTModule` (LoRA ``lora_A``/``lora_B``,
  adapters, prompts, DoRA magnitudes, …) except the layer it wraps, which a wrapper keeps as ``base_layer``;
* every trainable parameter outside them (the task head, or base layers the user unfroze);
* the persistent buffers of modules that own a trainable parameter (BatchNorm running statistics when BatchNorm
  trains).

Everything else is the *base*. A base tensor has a *base name*: its key with the ``.base_layer`` step of each wrapper
left out, i.e. its key in the model before surgery, so a base saved before surgery and one read after it compare.

Example::

    >>> import torch.nn as nn
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
    >>> sorted(trained_state(net))  # LoRA factors of layer 0 + the head (layer 1, trained by default)
    ['0.adapters.default.lora_A.weight', '0.adapters.default.lora_B.weight', '1.bias', '1.weight']
    >>> sorted(base_state(net))  # "0.base_layer.weight" is "0.weight" of the model before surgery
    ['0.bias', '0.weight', '1.bias', '1.weight']
"""

from __future__ import annotations

import torch
import torch.nn as nn

from peft_callbacks.core.modules import PEFTModule

__all__ = [
    "BASE_LAYER",
    "base_keys",
    "base_name",
    "base_state",
    "loaded_keys",
    "peft_owned",
    "trained_state",
    "wrapper_paths",
]

BASE_LAYER = "base_layer"


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def wrapper_paths(model: nn.Module) -> set[str]:
    """Paths of the PEFT modules that wrap a base layer (kept as their ``base_layer`` attribute).

    Example::

        >>> import torch.nn as nn
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> wrapper_paths(inject_lora(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), rank=1))
        {'0'}
    """
    return {
        path
        for path, m in model.named_modules()
        if isinstance(m, PEFTModule) and isinstance(getattr(m, BASE_LAYER, None), nn.Module)
    }


def peft_owned(model: nn.Module) -> set[int]:
    """``id`` of every tensor that belongs to an inserted PEFT module itself (not to a layer it wraps).

    Example::

        >>> import torch.nn as nn
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), rank=1)
        >>> lora = net[0].adapters["default"]
        >>> peft_owned(net) == {id(lora.lora_A.weight), id(lora.lora_B.weight)}
        True
    """
    owned: set[int] = set()
    for m in model.modules():
        if isinstance(m, PEFTModule):
            base = getattr(m, BASE_LAYER, None)
            wrapped = {id(t) for t in _tensors(base)} if isinstance(base, nn.Module) else set()
            owned.update(id(t) for t in _tensors(m) if id(t) not in wrapped)
    return owned


def _trained_ids(model: nn.Module) -> set[int]:
    ids = peft_owned(model)
    for m in model.modules():
        own = [p for p in m._parameters.values() if p is not None]
        if any(p.requires_grad for p in own):
            ids.update(id(p) for p in own if p.requires_grad)
            ids.update(
                id(b) for name, b in m._buffers.items() if b is not None and name not in m._non_persistent_buffers_set
            )
    return ids


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{state_dict key: tensor}`` of the trained part of ``model`` (see the module docstring), each tensor once.

    Example::

        >>> import torch.nn as nn
        >>> frozen_bn = nn.Sequential(nn.BatchNorm1d(2).requires_grad_(False), nn.Linear(2, 2))
        >>> sorted(trained_state(frozen_bn))  # a frozen BatchNorm keeps its statistics out
        ['1.bias', '1.weight']
    """
    ids = _trained_ids(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in ids and id(tensor) not in seen:
            seen.add(id(tensor))
            out[key] = tensor.detach()
    return out


def base_name(key: str, wrappers: set[str]) -> str:
    """``key`` with the ``base_layer`` step of every wrapper in ``wrappers`` left out.

    Example::

        >>> base_name("blocks.0.qkv.base_layer.weight", {"blocks.0.qkv"})
        'blocks.0.qkv.weight'
    """
    kept: list[str] = []
    prefix = ""  # the original path of the module that holds `part`
    for part in key.split("."):
        if not (part == BASE_LAYER and prefix in wrappers):
            kept.append(part)
        prefix = f"{prefix}.{part}" if prefix else part
    return ".".join(kept)


def base_keys(model: nn.Module) -> dict[str, str]:
    """``{state_dict key: base name}`` of every tensor of ``model`` that is not PEFT-owned (trainable head included).

    Example::

        >>> import torch.nn as nn
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> base_keys(inject_lora(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), rank=1))["0.base_layer.weight"]
        '0.weight'
    """
    owned = peft_owned(model)
    wrappers = wrapper_paths(model)
    return {
        key: base_name(key, wrappers)
        for key, tensor in model.state_dict(keep_vars=True).items()
        if id(tensor) not in owned
    }


def loaded_keys(model: nn.Module) -> set[str]:
    """The ``state_dict`` keys that ``model.load_state_dict`` reads back: parameters, persistent buffers and extra
    state. Layers may write more than they read: bitsandbytes' 4-bit layers add their quantization statistics
    (``weight.absmax``, …), which loading refuses as unexpected.

    Example::

        >>> import torch.nn as nn
        >>> sorted(loaded_keys(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))))
        ['0.bias', '0.weight', '1.bias', '1.num_batches_tracked', '1.running_mean', '1.running_var', '1.weight']
    """
    keys = set()
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        keys.update(prefix + name for name, p in module._parameters.items() if p is not None)
        keys.update(
            prefix + name
            for name, b in module._buffers.items()
            if b is not None and name not in module._non_persistent_buffers_set
        )
        if type(module).get_extra_state is not nn.Module.get_extra_state:
            keys.add(prefix + "_extra_state")
    return keys


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{base name: tensor}`` of every tensor of ``model`` that is not PEFT-owned: the model as before surgery.

    Example::

        >>> import torch, torch.nn as nn
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), rank=1)
        >>> torch.equal(base_state(net)["0.weight"], net[0].base_layer.weight)
        True
    """
    state = model.state_dict(keep_vars=True)
    return {name: state[key].detach() for key, name in base_keys(model).items()}
