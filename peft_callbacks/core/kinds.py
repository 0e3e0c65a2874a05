"""What kind of weight layer a module is, and how to read and write its weight: the engine's view of base layers.

Every method that wraps a weight layer dispatches on :func:`layer_kind`:

==============  ===================================================================================
kind            layers
==============  ===================================================================================
``"linear"``    ``nn.Linear``, and subclasses with their own ``forward`` whose output is still linear in
                the weight (checked on a probe input, e.g. Falcon's ``FalconLinear``)
``"conv"``      ``nn.Conv1d/2d/3d`` with ``groups=1`` (and subclasses that pass the same probe)
``"hf_conv1d"`` transformers' ``Conv1D`` (GPT-2), whose weight is stored transposed as ``(in, out)``
``"embedding"`` ``nn.Embedding`` (no ``max_norm``), and subclasses whose forward multiplies it by a scalar
                ``embed_scale`` (Gemma's ``Gemma3TextScaledWordEmbedding``, BART's ``BartScaledWordEmbedding``);
                adapted only where ``target_modules`` names it, as in HF PEFT
``"mha"``       ``nn.MultiheadAttention`` with one packed ``in_proj_weight`` (q, k and v of one size): its
                ``in_proj`` and ``out_proj`` weights, which its forward reads directly
==============  ===================================================================================

Quantized layers (bitsandbytes ``Linear4bit`` and ``Linear8bitLt``) have the kinds ``"linear_4bit"`` and
``"linear_8bit"`` (:mod:`peft_callbacks.core.quantized`): linear layers whose weight is read dequantized and never
written in place. An adapter class written for ``"linear"`` adapts them too (:func:`dequantized_kind`).

Layers that are not linear in their weight (timm's weight-standardised ``ScaledStdConv2d``, ``Conv2dSame`` with its
own padding) and ``nn.MultiheadAttention.out_proj`` (its parent reads the weight and never calls it) have no kind:
an update added beside them would not equal the merged layer, or would never run.

:func:`base_weight` / :func:`write_weight` are the single place where surgery reads or replaces a base weight, so
sharded (DTensor) and quantized bases are handled once for every method.

Example::

    >>> import torch.nn as nn
    >>> layer_kind(nn.Linear(4, 2)), layer_kind(nn.Conv2d(3, 8, 3)), layer_kind(nn.Conv2d(8, 8, 3, groups=8))
    ('linear', 'conv', None)
"""

from __future__ import annotations

import sys
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from peft_callbacks.core import quantized
from peft_callbacks.core.sharding import full_shape, full_tensor, is_sharded, write_full

__all__ = [
    "KIND_NAMES",
    "LINEAR_KINDS",
    "NAMED_ONLY_KINDS",
    "base_weight",
    "dequantized_kind",
    "embed_scale",
    "conv_with_weight",
    "is_custom_layer",
    "is_grouped_conv",
    "is_hf_conv1d",
    "kinds_description",
    "layer_kind",
    "weight_shape",
    "write_weight",
]

KIND_NAMES = {
    "linear": "nn.Linear",
    "conv": "nn.Conv1d/Conv2d/Conv3d (groups=1)",
    "hf_conv1d": "transformers' Conv1D",
    "linear_4bit": "bitsandbytes Linear4bit",
    "linear_8bit": "bitsandbytes Linear8bitLt",
    "embedding": "nn.Embedding",
    "mha": "nn.MultiheadAttention",
}
LINEAR_KINDS = ("linear", "hf_conv1d", "linear_4bit", "linear_8bit")  # what ``target_modules="all-linear"`` selects
NAMED_ONLY_KINDS = ("embedding",)  # adapted only where ``target_modules`` names them (HF PEFT's rule too)

_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PROBED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def kinds_description(kinds: list[str] | tuple[str, ...]) -> str:
    """``"nn.Linear, nn.Conv1d/Conv2d/Conv3d (groups=1) and transformers' Conv1D"`` for messages."""
    names = [KIND_NAMES.get(k, k) for k in kinds]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def is_hf_conv1d(module: nn.Module) -> bool:
    """Is ``module`` a transformers ``Conv1D`` (GPT-2 style Linear with a transposed weight)?"""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def dequantized_kind(kind: str | None) -> str | None:
    """The kind of plain layer a quantized kind computes like (``"linear_4bit"`` → ``"linear"``); others unchanged.

    Example::

        >>> dequantized_kind("linear_8bit"), dequantized_kind("conv")
        ('linear', 'conv')
    """
    return "linear" if kind in ("linear_4bit", "linear_8bit") else kind


def is_grouped_conv(module: nn.Module) -> bool:
    """Is ``module`` a grouped or depthwise convolution (``groups > 1``)?"""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1


def _overrides_forward(module: nn.Module) -> bool:
    for plain in (nn.Linear, *_PLAIN_CONVS):
        if isinstance(module, plain):
            own = type(module)
            return own.forward is not plain.forward or getattr(own, "_conv_forward", None) is not getattr(
                plain, "_conv_forward", None
            )
    return False


def is_custom_layer(module: nn.Module) -> bool:
    """Is ``module`` a Linear/Conv subclass with its own forward that an update beside it would not match?

    Subclasses whose output stays linear in the weight (checked once per module on a small random probe: the output
    change for a weight change ``Δ`` must equal the plain layer's output for ``Δ``) are adaptable like their parent
    class; the others (weight standardisation, input padding of their own, meta tensors that cannot be probed) are
    not. ``nn.MultiheadAttention.out_proj`` never is: its parent reads the weight directly and never calls it.

    Example::

        >>> import torch.nn as nn
        >>> class ScaledLinear(nn.Linear):
        ...     def forward(self, x):
        ...         return nn.functional.linear(x, self.weight / self.weight.norm(), self.bias)
        >>> class BiasFirst(nn.Linear):
        ...     def forward(self, x):
        ...         return self.bias + x @ self.weight.T
        >>> is_custom_layer(ScaledLinear(4, 2)), is_custom_layer(BiasFirst(4, 2)), is_custom_layer(nn.Linear(4, 2))
        (True, False, False)
    """
    if isinstance(module, NonDynamicallyQuantizableLinear):
        return True
    if quantized.is_quantized(module):  # linear in its dequantized weight, which surgery reads
        return False
    if not _overrides_forward(module):
        return False
    if module not in _PROBED:
        _PROBED[module] = _linear_in_weight(module)
    return not _PROBED[module]


def conv_with_weight(layer: nn.modules.conv._ConvNd, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer``'s convolution (stride, padding and padding mode, dilation, groups) of ``x`` with another ``weight``
    and no bias: what a weight update ``Δ`` adds to the layer's output, for methods that build ``Δ`` in full.

    Example::

        >>> import torch, torch.nn as nn
        >>> _ = torch.manual_seed(0)
        >>> conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")
        >>> x = torch.randn(1, 2, 5, 5)
        >>> torch.allclose(conv_with_weight(conv, x, conv.weight) + conv.bias.view(1, 3, 1, 1), conv(x), atol=1e-6)
        True
    """
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    else:
        padding = layer.padding
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(layer.kernel_size)]
    return conv(x, weight, None, layer.stride, padding, layer.dilation, layer.groups)


def _plain_output(module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, delta)
    return conv_with_weight(module, x, delta)


def _probe_input(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if isinstance(module, nn.Linear):
        shape: tuple[int, ...] = (2, module.in_features)
    else:
        span = [d * (k - 1) + s + 1 for k, d, s in zip(module.kernel_size, module.dilation, module.stride)]
        shape = (1, module.in_channels, *span)
    return torch.randn(shape, generator=generator).to(weight.device, weight.dtype)


def _linear_in_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta" or not weight.is_floating_point():
        return False
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(weight.shape, generator=generator).to(weight.device, weight.dtype) * 0.1
    x = _probe_input(module, weight)
    try:
        with torch.no_grad():
            before = module(x)
            after = torch.func.functional_call(module, {"weight": weight + delta}, (x,))
            expected = _plain_output(module, x, delta)
    except Exception:  # a layer that cannot run on a plain probe is not one we can vouch for
        return False
    if not isinstance(after, torch.Tensor) or after.shape != expected.shape:
        return False
    tolerance = 1e-4 if weight.dtype == torch.float32 else 5e-2
    return torch.allclose((after - before).float(), expected.float(), atol=tolerance, rtol=tolerance)


def embed_scale(module: nn.Module) -> torch.Tensor | float | None:
    """The scalar ``embed_scale`` a scaled embedding multiplies its output by (Gemma, BART), else ``None``.

    Example::

        >>> import torch.nn as nn
        >>> embed_scale(nn.Embedding(4, 2)) is None
        True
    """
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return float(scale)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None


def _embedding_kind(module: nn.Embedding) -> str | None:
    """``"embedding"`` for a plain or scaled embedding without ``max_norm`` (which renormalises rows in place)."""
    if module.max_norm is not None:
        return None
    if type(module).forward is nn.Embedding.forward or embed_scale(module) is not None:
        return "embedding"
    return None


def _attention_kind(module: nn.MultiheadAttention) -> str | None:
    """``"mha"`` for attention with one packed ``in_proj_weight`` and a plain ``out_proj`` weight."""
    packed = module._qkv_same_embed_dim and isinstance(module.in_proj_weight, torch.Tensor)
    return "mha" if packed and isinstance(module.out_proj, nn.Linear) else None


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"``, ``"hf_conv1d"``, ``"linear_4bit"``, ``"linear_8bit"``, ``"embedding"`` or ``"mha"``
    for layers the engine can adapt, else ``None``.

    Example::

        >>> import torch.nn as nn
        >>> layer_kind(nn.Embedding(10, 4)), layer_kind(nn.MultiheadAttention(8, 2))
        ('embedding', 'mha')
        >>> layer_kind(nn.Embedding(10, 4, max_norm=1.0)) is None  # max_norm renormalises rows in place
        True
    """
    from peft_callbacks.core.modules import PEFTModule

    if isinstance(module, PEFTModule):
        return None
    if isinstance(module, nn.Embedding):
        return _embedding_kind(module)
    if isinstance(module, nn.MultiheadAttention):
        return _attention_kind(module)
    kind = quantized.quantized_kind(module)
    if kind is not None:
        return kind
    if is_custom_layer(module):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _PLAIN_CONVS) and module.groups == 1:
        return "conv"
    if is_hf_conv1d(module):
        return "hf_conv1d"
    return None


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The full weight of a base layer as stored (``Conv1D``: ``(in, out)``), whatever holds it.

    Quantized layers give their dequantized ``(out, in)`` weight (a new tensor: writing to it changes nothing); a
    sharded weight (an FSDP2 shard or a ZeRO-3 partition) is gathered on every rank (a collective).
    """
    if quantized.is_quantized(layer):
        return quantized.dequantize(layer)
    weight = layer.weight
    if is_sharded(weight):
        return full_tensor(weight)
    return weight


def weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """The shape of :func:`base_weight` without reading (dequantizing or gathering) any value.

    Example::

        >>> import torch.nn as nn
        >>> weight_shape(nn.Conv2d(3, 8, 3))
        (8, 3, 3, 3)
    """
    if quantized.is_quantized(layer):
        return quantized.weight_shape(layer)
    return tuple(full_shape(layer.weight))  # a sharded weight's full shape, without gathering it


def write_weight(layer: nn.Module, value: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Replace a base layer's weight (and bias, if given) by ``value`` (usually float32), cast to the stored dtype,
    in place.

    Raises:
        ValueError: the weight is stored quantized: rounding ``value`` into 4 or 8 bits would lose most of a small
            update, so it is done only on request (``merge(model, requantize=True)``) or not at all
            (``merge(model, dtype=...)`` writes plain layers).
    """
    if quantized.stores_quantized(layer):
        raise ValueError(
            f"Refusing to write into a {quantized.quantization_label(layer)} weight ({type(layer).__name__}): "
            f"rounding it back into {'4' if quantized.quantized_kind(layer) == 'linear_4bit' else '8'} bits would "
            f"lose most of the update. Keep the adapter unmerged, merge into plain layers with "
            f"`merge(model, dtype=torch.bfloat16)`, or re-quantize on purpose with `merge(model, requantize=True)`."
        )
    if is_sharded(layer.weight):  # each rank keeps its own slice of the full value
        write_full(layer.weight, value)
        if bias is not None:
            write_full(layer.bias, bias)
        return
    with torch.no_grad():
        layer.weight.copy_(value.to(layer.weight.dtype))
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))
