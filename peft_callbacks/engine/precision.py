r"""Where a merged weight goes: back into its layer, into a plain layer of another dtype, or re-quantized.

:func:`~peft_callbacks.engine.surgery.merge` computes every merged weight in float32 from the weight the layer
computes with (on a quantized base: the dequantized ``dequant(W₄)``, never the 16-bit weights it was quantized from),
then writes it in one of three ways:

===========================  ========================================================================================
``merge(model)``             into each base weight, cast to its dtype. Refused on a quantized base: rounding the
                             merged weight back into 4 bits would lose most of a small update (peft#2321).
``merge(model, dtype=…)``    the whole model becomes a plain model in ``dtype``: merged layers hold the merged
                             weight, every other quantized layer its dequantized weight, every other tensor is cast.
                             No re-rounding: it equals the adapted model up to the rounding to ``dtype``.
``merge(model,               the merged weight is quantized again in the layer's own format. Lossy, on purpose:
requantize=True)``           :func:`requantization_error` says beforehand how much of each update survives, and the
                             merge logs it.
===========================  ========================================================================================

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine import inject, merge
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> net = inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).to(torch.bfloat16), LoRAConfig(rank=2))
    >>> merged = merge(net, dtype="float32")  # a float32 model, merged without a bfloat16 rounding
    >>> merged[0].weight.dtype, merged[1].weight.dtype
    (torch.float32, torch.float32)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_module
from peft_callbacks.core import quantized
from peft_callbacks.core.kinds import write_weight
from peft_callbacks.engine.config import ADAPTER_DTYPES
from peft_callbacks.engine.layers import AdaptedLayer

__all__ = [
    "check_dtype",
    "dequantize_model",
    "log_requantization",
    "refuse_quantized_merge",
    "requantization_error",
    "write_merged",
]

log = logging.getLogger(__name__)


def check_dtype(name: str, value: Any) -> torch.dtype | None:
    """``None``, or ``value`` as a floating ``torch.dtype`` (given as one, or by name: ``"bfloat16"``).

    Example::

        >>> check_dtype("dtype", "bfloat16"), check_dtype("dtype", None)
        (torch.bfloat16, None)
    """
    if value is None:
        return None
    if isinstance(value, str) and value in ADAPTER_DTYPES:
        return getattr(torch, value)
    if isinstance(value, torch.dtype) and value in {getattr(torch, n) for n in ADAPTER_DTYPES}:
        return value
    raise ValueError(
        f"`{name}` must be None or one of {', '.join(repr(n) for n in ADAPTER_DTYPES)} (or the torch dtype), "
        f"got {type(value).__name__} {value!r}."
    )


def refuse_quantized_merge(path: str, layer: AdaptedLayer) -> None:
    """Raise the ``ValueError`` for a plain ``merge`` that would write into a quantized weight (naming the options)."""
    base = layer.base_layer
    bits = "4" if quantized.quantized_kind(base) == "linear_4bit" else "8"
    raise ValueError(
        f"Cannot merge into {path!r}: its base is a bitsandbytes {quantized.quantization_label(base)} layer, and "
        f"rounding the merged weight back into {bits} bits would lose most of the update. Keep the adapter unmerged "
        f"(save it with save_adapter), merge into a plain model with `merge(model, dtype=torch.bfloat16)` (from the "
        f"dequantized weights, no re-rounding), or re-quantize on purpose with `merge(model, requantize=True)` "
        f"(see requantization_error(model) first). The model was left unmerged."
    )


def write_merged(
    layer: AdaptedLayer,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype | None,
    requantize: bool,
) -> tuple[nn.Module, float | None]:
    """Write one merged weight (float32) where the merge mode says; return the base layer to put back in the model
    and, when re-quantized, the share of the update the rounding changed (see :func:`requantization_error`)."""
    base = layer.base_layer
    if quantized.stores_quantized(base):
        if dtype is not None:
            return quantized.plain_linear(base, weight, bias, dtype), None
        before = quantized.dequantize(base).float()
        quantized.requantized(base, weight)
        if bias is not None:
            with torch.no_grad():
                base.bias.copy_(bias.to(base.bias.dtype))
        return base, _relative_error(quantized.dequantize(base).float(), weight, before)
    if dtype is None:
        write_weight(base, weight, bias)
        return base, None
    with torch.no_grad():  # the dtype changes too: swap the data, the parameters stay the same objects
        base.weight.data = weight.to(dtype)
        if bias is not None:
            base.bias.data = bias.to(dtype)
    return base, None


def _relative_error(kept: torch.Tensor, merged: torch.Tensor, before: torch.Tensor) -> float:
    """``‖kept − merged‖ / ‖merged − before‖``: how much of the update (``merged − before``) the rounding changed."""
    update = (merged - before).norm()
    return float((kept - merged.to(kept.device)).norm() / update.clamp_min(1e-12))


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes layer left in ``model`` by a plain ``nn.Linear`` holding its dequantized weight in
    ``dtype``, drop transformers' quantization record, and cast the rest of the model to ``dtype``.

    Returns:
        How many quantized layers were replaced.
    """
    layers = quantized.quantized_layers(model)
    for path, layer in layers.items():
        plain = quantized.plain_linear(layer, quantized.dequantize(layer).float(), layer.bias, dtype)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, plain)
    quantized.forget_quantization(model)
    model.to(dtype)
    return len(layers)


def requantization_error(model: nn.Module, method: str | None = None) -> dict[str, float]:
    """What ``merge(model, requantize=True)`` would lose, per adapted quantized layer, without changing anything.

    For each layer: ``‖Q(W′) − W′‖_F / ‖W′ − W₀‖_F``, where ``W₀`` is the dequantized base weight, ``W′ = W₀ + ΔW``
    the merged weight and ``Q`` quantizing in the layer's own format and back. 0 keeps the update exactly; around 1
    or more means the re-rounding changes the weights by as much as the whole update did (typical for a small LoRA
    update on NF4 weights, whose steps are much larger than the update).

    Args:
        model: an adapted model with quantized base layers.
        method: only this method's adapters (``"lora"``); by default every mergeable one.

    Returns:
        ``{layer path: relative error}`` (empty when no adapted layer is quantized).

    Raises:
        ImportError: bitsandbytes cannot be imported (the message names the extra to install).

    Example::

        >>> import pytest, torch, torch.nn as nn
        >>> bnb = pytest.importorskip("bitsandbytes")
        >>> from peft_callbacks.engine import inject
        >>> from peft_callbacks.methods.lora import LoRAConfig
        >>> _ = torch.manual_seed(0)
        >>> layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4").to("cpu")  # quantized on .to()
        >>> net = inject(nn.Sequential(layer, nn.Linear(64, 2)), LoRAConfig(rank=4))
        >>> _ = nn.init.normal_(net[0].adapters["default"].lora_B.weight, std=1e-3)
        >>> requantization_error(net)["0"] > 0.5  # most of a small update is rounded away
        True
    """
    from peft_callbacks.engine.surgery import _methods

    check_module("model", model)
    candidates = _methods(model, method)
    quantized.require_bitsandbytes("measure the error of re-quantizing merged weights")
    errors = {}
    for m in [m for m in candidates if m.mergeable]:
        for path, layer in m.modules(model).items():
            base = layer.base_layer
            if not quantized.stores_quantized(base):
                continue
            with torch.no_grad():
                before = quantized.dequantize(base).float()
                merged = layer.merged_weight()
                errors[path] = _relative_error(quantized.round_trip(base, merged), merged, before)
    return errors


def log_requantization(model: nn.Module, errors: dict[str, float]) -> None:
    """One log line: how much of the updates re-quantizing changed (mean and worst layer)."""
    if not errors:
        return
    worst = max(errors, key=errors.__getitem__)
    log.warning(
        "Re-quantized %d merged layer(s) of %s: the rounding changed the weights by %.0f%% of the update's norm on "
        "average (%.0f%% in %r); the merged model computes differently from the adapted one. "
        "`merge(model, dtype=...)` keeps the update exactly.",
        len(errors),
        type(model).__name__,
        100 * sum(errors.values()) / len(errors),
        100 * errors[worst],
        worst,
    )
