"""A fingerprint of a base model, so a fine-tune is never loaded onto a different base without being told.

The fingerprint holds the architecture (the model's class), the name and shape of every base tensor (its key before
surgery, see :mod:`peft_callbacks.io.state`) and a SHA-256 of a few *frozen* base tensors: those that fine-tuning does
not change, read through the LoRA wrappers (``base_layer``), preferring the weights that the adapters were trained
against. Only the first ``2**20`` values of a tensor are hashed, which tells two pretrained checkpoints apart at a
small cost even for large models.

A quantized (bitsandbytes) weight is fingerprinted by what the layer computes with: its logical ``(out, in)`` shape
and the hash of its dequantized values, recorded with its format (``"nf4"``, ``"fp4"``, ``"int8"``) as dtype. The
same checkpoint quantized again hashes the same, whatever layout bitsandbytes keeps the bits in; a 16-bit base, or
one quantized in another format, is told apart (the message shows both formats).

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> _ = torch.manual_seed(0)
    >>> tuned = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
    >>> saved = base_fingerprint(tuned)
    >>> list(saved["hashes"])  # the frozen, LoRA-wrapped layer
    ['0.weight', '0.bias']
    >>> _ = torch.manual_seed(0)
    >>> same_base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> compare_fingerprints(saved, base_fingerprint(same_base, hash_names=saved["hashes"]))
    []
    >>> compare_fingerprints(saved, base_fingerprint(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))))
    ['shapes differ: 1.weight (2, 4) -> (3, 4), 1.bias (2,) -> (3,)']
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks.core import quantized
from peft_callbacks.core.sharding import full_shape, full_tensor, unsharded_class
from peft_callbacks.io.state import BASE_LAYER, base_keys, wrapper_paths

__all__ = ["architecture", "base_fingerprint", "compare_fingerprints", "tensor_digest"]

_HASHED_VALUES = 2**20
_MAX_LISTED = 5


def architecture(model: nn.Module) -> str:
    """The fully qualified class name of ``model`` (``timm.models.vision_transformer.VisionTransformer``).

    Example::

        >>> import torch.nn as nn
        >>> architecture(nn.Linear(2, 2))
        'torch.nn.modules.linear.Linear'
    """
    cls = unsharded_class(model)  # a model sharded with FSDP2 fingerprints as the model itself
    return f"{cls.__module__}.{cls.__qualname__}"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of the first ``2**20`` values of ``tensor`` (as float32, so devices and dtypes that hold them agree).

    Example::

        >>> import torch
        >>> tensor_digest(torch.ones(3)) == tensor_digest(torch.ones(3, dtype=torch.bfloat16))
        True
    """
    values = tensor.detach().flatten()[:_HASHED_VALUES].to("cpu", torch.float32).contiguous()
    return hashlib.sha256(values.numpy().tobytes()).hexdigest()


def _choose_hashed(model: nn.Module, keys: dict[str, str], count: int) -> list[str]:
    """Base names of up to ``count`` frozen parameters: first/last wrapped by PEFT modules, then first/last others."""
    state = model.state_dict(keep_vars=True)
    wrappers = wrapper_paths(model)
    frozen = [
        key
        for key, t in state.items()
        if key in keys and isinstance(t, nn.Parameter) and not t.requires_grad and t.device.type != "meta"
    ]
    inside = tuple(f"{w}.{BASE_LAYER}." if w else f"{BASE_LAYER}." for w in wrappers)
    wrapped = [k for k in frozen if k.startswith(inside)]
    others = [k for k in frozen if k not in set(wrapped)]
    chosen: list[str] = []
    for group in (wrapped, others):
        for key in (group[:1] + group[-1:]) if group else []:
            if keys[key] not in chosen and len(chosen) < count:
                chosen.append(keys[key])
    return chosen


def base_fingerprint(model: nn.Module, hash_names: Iterable[str] | None = None, count: int = 4) -> dict[str, Any]:
    """Fingerprint the base of ``model`` (PEFT modules left out; works before and after surgery).

    Shapes are the full ones; hashed tensors are gathered first when sharded, so every rank must call it then and
    a sharded model fingerprints like the same model on one process.

    Args:
        model: the model, with or without PEFT modules in it.
        hash_names: base names of the tensors to hash (to compare with a saved fingerprint); by default up to
            ``count`` frozen parameters are chosen (see the module docstring).
        count: how many tensors to choose when ``hash_names`` is not given.

    Returns:
        ``{"architecture": str, "shapes": {base name: [sizes]}, "hashes": {base name: {"sha256", "dtype"}}}``.

    Example::

        >>> import torch.nn as nn
        >>> base_fingerprint(nn.Linear(2, 3))["shapes"]
        {'weight': [3, 2], 'bias': [3]}
    """
    keys = base_keys(model)
    state = model.state_dict(keep_vars=True)
    by_name = {name: state[key] for key, name in keys.items()}
    layers = {
        keys[f"{path}.weight"]: m for path, m in quantized.quantized_layers(model).items() if f"{path}.weight" in keys
    }
    names = _choose_hashed(model, keys, count) if hash_names is None else [n for n in hash_names if n in by_name]

    def shape(name: str) -> list[int]:
        return list(quantized.weight_shape(layers[name]) if name in layers else full_shape(by_name[name]))

    def digest(name: str) -> dict[str, str]:
        if name in layers:
            layer = layers[name]
            return {"sha256": tensor_digest(quantized.dequantize(layer)), "dtype": quantized.quantization_label(layer)}
        tensor = by_name[name]
        return {"sha256": tensor_digest(full_tensor(tensor)), "dtype": str(tensor.dtype).removeprefix("torch.")}

    shapes = {name: shape(name) for name in by_name}
    for name, layer in layers.items():  # a 4-bit weight sharded by FSDP2: its statistics, as one process lists them
        for stat, value in quantized.sharded_statistics(layer).items():
            shapes.setdefault(f"{name}.{stat}", list(value.shape))
    return {
        "architecture": architecture(model),
        "shapes": shapes,
        "hashes": {n: digest(n) for n in names if by_name[n].device.type != "meta"},
    }


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", … ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def compare_fingerprints(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Say how ``current`` differs from ``saved``: one sentence per kind of difference, empty when they match.

    Example::

        >>> import torch.nn as nn
        >>> compare_fingerprints(base_fingerprint(nn.Linear(2, 3)), base_fingerprint(nn.Linear(2, 3, bias=False)))
        ['1 base tensor(s) missing: bias']
    """
    diffs = []
    if saved.get("architecture") != current.get("architecture"):
        diffs.append(f"architecture differs: saved for {saved.get('architecture')}, got {current.get('architecture')}")
    old, new = saved.get("shapes", {}), current.get("shapes", {})
    missing = [n for n in old if n not in new]
    extra = [n for n in new if n not in old]
    if missing:
        diffs.append(f"{len(missing)} base tensor(s) missing: {_listing(missing)}")
    if extra:
        diffs.append(f"{len(extra)} unexpected base tensor(s): {_listing(extra)}")
    reshaped = [f"{n} {tuple(old[n])} -> {tuple(new[n])}" for n in old if n in new and list(old[n]) != list(new[n])]
    if reshaped:
        diffs.append(f"shapes differ: {_listing(reshaped)}")
    changed = []
    for name, digest in saved.get("hashes", {}).items():
        now = current.get("hashes", {}).get(name)
        if now is not None and now["sha256"] != digest["sha256"]:
            dtypes = f" (dtype {digest['dtype']} -> {now['dtype']})" if now["dtype"] != digest["dtype"] else ""
            changed.append(name + dtypes)
    if changed:
        diffs.append(f"base weights differ (another checkpoint, or weights changed since): {_listing(changed)}")
    return diffs
