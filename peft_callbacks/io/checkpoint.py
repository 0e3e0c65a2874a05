r"""Checkpoints that load like the user's own: the merged layout in ``state_dict``, what resuming needs beside it.

During a LoRA fit the module's ``state_dict`` holds the adapted layout (``q_lin.base_layer.weight``,
``q_lin.adapters.default.lora_A.weight``), which a freshly built module does not have. :func:`write_plain_layout`
rewrites a Lightning checkpoint dict so that its ``state_dict`` is the model as a plain model::

    state_dict (what the module as built loads)      checkpoint["peft_callbacks"] (what resuming needs)
    ─────────────────────────────────────────────    ────────────────────────────────────────────────────
    q_lin.weight   W₀ + s·B·A  (float32, cast once)   tensors  q_lin.adapters.default.lora_A.weight, …
    q_lin.bias     b₀ (or the adapted bias)            layers   q_lin: adapters folded, active, base digests
    classifier.*   the trained head                    recipes  the surgeries, to replay them

so ``MyModule.load_from_checkpoint(path)`` works in a process that never imports peft_callbacks, with the original
keys and layer types. :func:`restore_adapted_layout` turns such a ``state_dict`` back into the adapted layout of a
module that carries the surgery again (resuming, or testing a module that still holds its adapters): the adapters
come from the record, and each frozen base weight from the module as built when its digest matches the one recorded
(bit-identical); otherwise the stored merged weight is unmerged in float32, with a warning.

Models holding modules that cannot be folded into weights (bottleneck adapters, prompts), and slim checkpoints, keep
the adapted layout; their ``state_dict`` then carries one extra key whose name says how to load them
(:data:`LOADER`), so a plain ``load_from_checkpoint`` fails with an error that names the way. Everything written is
plain Python data and tensors (``torch.load(weights_only=True)`` reads it).

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> def base():
    ...     _ = torch.manual_seed(0)
    ...     return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> tuned = inject_lora(base(), rank=2)
    >>> _ = nn.init.ones_(tuned[0].adapters["default"].lora_B.weight)
    >>> checkpoint = {"state_dict": tuned.state_dict()}
    >>> write_plain_layout(tuned, checkpoint)["layout"]
    'merged'
    >>> plain = base()
    >>> _ = plain.load_state_dict(checkpoint["state_dict"])  # strict: the original keys
    >>> x = torch.randn(3, 4)
    >>> torch.allclose(plain(x), tuned(x), atol=1e-6)
    True
    >>> resumed = inject_lora(base(), rank=2)
    >>> _ = resumed.load_state_dict(restore_adapted_layout(resumed, checkpoint))
    >>> torch.equal(resumed[0].base_layer.weight, tuned[0].base_layer.weight)  # the base as built, bit for bit
    True
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.recipe import recorded_models, surgery_records
from peft_callbacks.engine.layers import AdaptedLayer, Adapter
from peft_callbacks.io.checkpoint_record import (
    CHECKPOINT_KEY,
    FORMAT_VERSION,
    CheckpointLayoutError,
    check_recipes,
    check_replay,
    read_record,
    stored_tensors,
)
from peft_callbacks.io.fingerprint import tensor_digest

__all__ = [
    "CHECKPOINT_KEY",
    "FORMAT_VERSION",
    "LOADER",
    "CheckpointLayoutError",
    "check_recipes",
    "check_replay",
    "read_record",
    "restore_adapted_layout",
    "stored_tensors",
    "strip_loader_key",
    "write_plain_layout",
]

log = logging.getLogger(__name__)

LOADER = "peft_callbacks.load_checkpoint"
_LOADER_KEY = "(load this checkpoint with " + LOADER + "({module}, path))"
_LOADER_PREFIX = _LOADER_KEY.split("{", 1)[0]
_DIGESTS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (version, digest): a frozen base is hashed once


def _digest(tensor: torch.Tensor | None) -> str | None:
    """:func:`~peft_callbacks.io.fingerprint.tensor_digest`, remembered until the tensor changes in place."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
        return None
    cached = _DIGESTS.get(tensor)
    if cached is not None and cached[0] == tensor._version:
        return cached[1]
    digest = tensor_digest(tensor)
    _DIGESTS[tensor] = (tensor._version, digest)
    return digest


def _adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """Every path of every adapted layer (a layer shared by two paths appears under both, as in ``state_dict``)."""
    return {path: m for path, m in model.named_modules(remove_duplicate=False) if isinstance(m, AdaptedLayer)}


def _foreign_modules(model: nn.Module) -> list[str]:
    """Paths of inserted modules that are neither adapted layers nor their adapters (adapters, prompts, …)."""
    inside = tuple(f"{p}." for p in _adapted_layers(model))
    return [
        path
        for path, m in model.named_modules()
        if isinstance(m, PEFTModule) and not isinstance(m, (AdaptedLayer, Adapter)) and not path.startswith(inside)
    ]


def loader_key(model: nn.Module) -> str:
    """The ``state_dict`` key that names the loader in a plain ``load_from_checkpoint``'s "Unexpected key(s)" error.

    Example::

        >>> loader_key(nn.Linear(2, 2))
        '(load this checkpoint with peft_callbacks.load_checkpoint(Linear, path))'
    """
    return _LOADER_KEY.format(module=type(model).__name__)


def strip_loader_key(state_dict: dict[str, Any]) -> bool:
    """Remove the key of :func:`loader_key` from ``state_dict`` (in place); say whether there was one."""
    keys = [k for k in state_dict if isinstance(k, str) and k.startswith(_LOADER_PREFIX)]
    for key in keys:
        del state_dict[key]
    return bool(keys)


def _foldable(layers: dict[str, AdaptedLayer], state: dict[str, Any]) -> bool:
    """Can every adapted layer be written as its base layer with the adapters folded in?"""
    for path, layer in layers.items():
        if not all(a.mergeable for a in layer.adapters.values()):
            return False
        weight = state.get(f"{path}.base_layer.weight")
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.device.type == "meta":
            return False  # missing (slim), or stored quantized: a merged weight would not go back under this key
    return True


def write_plain_layout(model: nn.Module, checkpoint: dict[str, Any], *, keep_adapted: bool = False) -> dict | None:
    """Rewrite ``checkpoint["state_dict"]`` (of ``model``) as the plain model, and record what resuming needs.

    Every adapted layer whose adapters can all be folded becomes its base layer's keys again (``path.weight`` =
    the base weight with the active adapters folded in, computed in float32 and cast once to the base weight's
    dtype; adapters and ``base_layer`` keys removed). The adapters' tensors, the surgeries, each folded layer's active
    adapters and the digests of its frozen base tensors go into ``checkpoint["peft_callbacks"]``.

    When that is not possible (modules that cannot be folded, ``keep_adapted``: a slim checkpoint), the adapted
    layout stays, plus one key that names :data:`LOADER` so that a plain load fails with a helpful message.

    Args:
        model: the module whose ``state_dict()`` ``checkpoint["state_dict"]`` is (a LightningModule).
        checkpoint: a Lightning checkpoint dict; changed in place.
        keep_adapted: keep the adapted layout (the base tensors may be missing, e.g. slim checkpoints).

    Returns:
        The record written to ``checkpoint["peft_callbacks"]``, or ``None`` when ``model`` holds nothing of ours
        (or the checkpoint was rewritten already).
    """
    if CHECKPOINT_KEY in checkpoint or not any(isinstance(m, PEFTModule) for m in model.modules()):
        return None
    state = checkpoint["state_dict"]
    layers = _adapted_layers(model)
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "layout": "adapted",
        "recipes": {path: surgery_records(m) for path, m in recorded_models(model).items()},
        "layers": {},
        "tensors": {},
    }
    if keep_adapted or _foreign_modules(model) or not _foldable(layers, state):
        state[loader_key(model)] = torch.zeros(0)
        checkpoint[CHECKPOINT_KEY] = record
        return record
    record["layout"] = "merged"
    merged: dict[int, tuple[torch.Tensor, torch.Tensor | None, list[str]]] = {}
    for path, layer in layers.items():
        if id(layer) not in merged:
            names = [] if layer.disabled else [n for n in layer.active_adapters if n not in layer.merged_adapters]
            folded = [*layer.merged_adapters, *names]
            with torch.no_grad():
                weight = layer.merged_weight(names).to(layer.base_layer.weight.dtype)
                bias = layer.merged_bias(names)
            base_bias = getattr(layer.base_layer, "bias", None)
            merged[id(layer)] = (weight, None if bias is None else bias.to(base_bias.dtype), folded)
        weight, bias, folded = merged[id(layer)]
        for key in [k for k in state if k.startswith(f"{path}.")]:
            rest = key[len(path) + 1 :]
            value = state.pop(key)
            if rest.startswith("base_layer."):
                name = rest[len("base_layer.") :]
                state[f"{path}.{name}"] = weight if name == "weight" else bias if name == "bias" else value
            else:
                record["tensors"][key] = value
        base_bias = getattr(layer.base_layer, "bias", None)
        record["layers"][path] = {
            "folded": folded,
            "active": list(layer.active_adapters),
            "digests": {"weight": _digest(layer.base_layer.weight), "bias": _digest(base_bias)},
        }
    checkpoint[CHECKPOINT_KEY] = record
    return record


def restore_adapted_layout(model: nn.Module, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Turn ``checkpoint["state_dict"]`` back into the layout of ``model`` (in place) and return it.

    ``model`` carries the surgery again (its adapted layers as at the checkpoint). For each layer the checkpoint
    folded, the adapters' tensors come back from the record, and the frozen base tensors are ``model``'s own when
    their digests match the recorded ones (so resuming keeps the base bit-identical); otherwise the stored merged
    weight is unmerged in float32 and a warning says so. Layers that are plain in ``model`` keep the merged keys (they
    fit as they are). The key naming the loader is removed. Checkpoints without a record are returned unchanged.

    Raises:
        CheckpointLayoutError: a newer or malformed record, or an adapted layer of ``model`` that lacks adapters the
            checkpoint folded.
    """
    state = checkpoint["state_dict"]
    strip_loader_key(state)
    record = read_record(checkpoint)
    if record is None or record["layout"] != "merged" or record.get("restored"):
        return state
    modules = dict(model.named_modules(remove_duplicate=False))
    unmerged: list[str] = []
    for path, info in record["layers"].items():
        layer = modules.get(path)
        if not isinstance(layer, AdaptedLayer):
            continue  # a plain layer here: the merged keys fit
        _restore_layer(path, layer, info, state, record["tensors"], unmerged)
    record["restored"] = True
    if unmerged:
        log.warning(
            "The frozen base of %d layer(s) (%s) differs from the one the checkpoint was trained on, so it was "
            "recovered by unmerging the stored weights in float32: not bit-identical. Build the module as for "
            "training (same pretrained weights or seed) to resume exactly.",
            len(unmerged),
            ", ".join(unmerged[:5]) + (", …" if len(unmerged) > 5 else ""),
        )
    return state


def _restore_layer(path, layer, info, state, tensors, unmerged) -> None:
    folded = list(info.get("folded", []))
    missing = [n for n in folded if n not in layer.adapters]
    if missing:
        raise CheckpointLayoutError(
            f"The checkpoint folded adapters {folded} into {path!r}, but this module's layer there holds "
            f"{list(layer.adapters)}. Use the same callbacks and adapter names as for the run that wrote it."
        )
    prefix = f"{path}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            state[key] = value
    base = layer.base_layer
    digests = info.get("digests", {})
    same = {name: _digest(getattr(base, name, None)) == digests.get(name) for name in ("weight", "bias")}
    if not (same["weight"] and (same["bias"] or getattr(base, "bias", None) is None)):
        unmerged.append(path)
        weight, bias = _unmerge(path, layer, folded, state, tensors)
    for name, tensor in base.state_dict(keep_vars=True).items():
        stored = state.pop(f"{prefix}{name}", None)
        if name == "weight":
            value = tensor.detach() if same["weight"] else weight
        elif name == "bias":
            value = tensor.detach() if same["bias"] or bias is None else bias
        else:
            value = tensor.detach() if stored is None else stored
        state[f"{prefix}base_layer.{name}"] = value
    if all(n in layer.adapters for n in info.get("active", [])):
        layer.active_adapters = list(info["active"])


def _unmerge(path, layer, folded, state, tensors) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The base weight and bias recovered from the stored merged ones, with the checkpoint's adapter tensors."""
    prefix = f"{path}.adapters."
    with torch.no_grad():
        for name in folded:  # the module's adapters take the checkpoint's values (Lightning loads them anyway)
            own = layer.adapters[name].state_dict(keep_vars=True)
            for key, target in own.items():
                stored = tensors.get(f"{prefix}{name}.{key}")
                if stored is not None:
                    target.copy_(stored.to(target.dtype))
        weight = state[f"{path}.weight"].float()
        bias = state.get(f"{path}.bias")
        bias = None if bias is None else bias.float()
        try:
            for name in reversed(folded):
                weight = layer.adapters[name].unmerge_from(layer, weight)
                bias = None if bias is None else layer.adapters[name].unmerge_bias_from(layer, bias)
        except (NotImplementedError, ValueError) as err:
            raise CheckpointLayoutError(
                f"The frozen base of {path!r} differs from the one the checkpoint was trained on, and its adapters "
                f"cannot be taken out of the stored merged weight ({err}). Build the module as for training (same "
                f"pretrained weights or seed)."
            ) from None
    base = layer.base_layer
    return weight.to(base.weight.dtype), None if bias is None else bias.to(base.bias.dtype)
