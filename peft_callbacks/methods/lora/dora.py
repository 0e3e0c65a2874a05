r"""DoRA layers: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA", eq. 5).

The adapted weight is split into a direction, updated by LoRA, and a trainable magnitude per output unit::

    W' = m · (W₀ + s·B·A) / ‖W₀ + s·B·A‖_c          m: (out,)   ‖·‖_c: one norm per output row, over the inputs

``m`` (``lora_magnitude_vector``) starts at ``‖W₀‖_c``, so with ``B = 0`` the layer computes exactly what the base
layer did. As in the paper (§4.3) and in HF PEFT, the norm is treated as a constant in backward: gradients reach
``m``, ``A`` and ``B`` but not through ``‖·‖_c``. The forward pass never forms ``W'``; it rescales the base output::

    h = b + (m/‖·‖_c − 1) ⊙ W₀x + (m/‖·‖_c) ⊙ s·B·A·x          (b: the base bias, left untouched)

which is how HF PEFT computes it, so with the same ``A``, ``B`` and ``m`` the outputs match
``LoraConfig(use_dora=True)``. Each DoRA class subclasses its LoRA class, so everything that handles LoRA layers
(``lora_layers``, ``merge_lora``, ``unload_lora``, ``lora_disabled``) handles DoRA layers too; ``merge_lora`` folds
``W'`` into the base weight (float32, finite-checked, idempotent).

Example::

    >>> import torch, torch.nn as nn
    >>> layer = DoRALinear(nn.Linear(16, 32), r=4, lora_alpha=8)
    >>> x = torch.randn(2, 16)
    >>> torch.allclose(layer(x), layer.base_layer(x), atol=1e-6)  # m = ‖W₀‖_c and B = 0 at injection
    True
    >>> layer.lora_magnitude_vector.shape
    torch.Size([32])
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peft_callbacks.lora.layers import LoRAConv, LoRAConv1D, LoRALayer, LoRALinear

__all__ = ["DoRAConv", "DoRAConv1D", "DoRALayer", "DoRALinear", "dora_layer_for"]

_NORM_FLOOR = 1e-12  # a base row of zeros has m = 0: 0 / floor = 0 instead of 0 / 0 = NaN


class DoRALayer(LoRALayer):
    """What every DoRA layer adds to its LoRA layer: the magnitude ``m`` and the rescaled forward.

    Subclasses combine this class with a LoRA layer (``class DoRALinear(DoRALayer, LoRALinear)``) and say how the
    base weight maps to ``(out, fan_in)`` rows (:meth:`weight_rows`), how the bias-free base layer is applied
    (:meth:`base_forward`) and on which output dimension channels live (:attr:`channel_dim`).

    Args:
        base_layer: the layer to adapt, as for :class:`LoRALayer`.
        r: the LoRA rank.
        lora_alpha: the scale numerator. Other keyword arguments (``lora_dropout``, ``use_rslora``) go to the LoRA
            layer.
    """

    channel_dim = -1

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, **kwargs) -> None:
        super().__init__(base_layer, r, lora_alpha, **kwargs)
        with torch.no_grad():
            norm = self.weight_norm().to(self.lora_A.weight.dtype)
        self.lora_magnitude_vector = nn.Parameter(norm)  # (out,)

    # -- per layer type -----------------------------------------------------------------------------------------
    def weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (shaped like ``base_layer.weight``) as ``(out, fan_in)`` rows."""
        return weight.flatten(1)

    def weight_from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_rows`: ``(out, fan_in)`` rows back to ``base_layer.weight``'s shape."""
        return rows.reshape(self.base_layer.weight.shape)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W₀x`` without the bias."""
        raise NotImplementedError

    # -- DoRA ---------------------------------------------------------------------------------------------------
    def weight_norm(self) -> torch.Tensor:
        """``‖W₀ + s·B·A‖_c`` per output row, in float32, detached (a constant in backward, as in the paper)."""
        with torch.no_grad():
            return self.weight_rows(self.merged_lora_weight()).norm(dim=1).clamp_min(_NORM_FLOOR)

    def merged_lora_weight(self) -> torch.Tensor:
        """``W₀ + s·B·A`` in float32 (plain LoRA's merged weight, before DoRA's rescaling)."""
        return super().merged_weight()

    def magnitude_scale(self) -> torch.Tensor:
        """``m / ‖W₀ + s·B·A‖_c``, shape ``(out,)``; gradients reach ``m`` only."""
        m = self.lora_magnitude_vector
        return m / self.weight_norm().to(m.dtype)

    def _channels(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_dim == -1:
            return scale  # (out,) broadcasts over the last dim
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return scale.view(shape)  # (1, out, 1, …)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        x = x.to(self.lora_A.weight.dtype)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = result.to(x.dtype)
            if self.bias is not None:
                base = base - self._channels(self.bias.to(x.dtype), base.ndim)
        else:  # dropout on the LoRA input: the rescaled base term sees the same dropped input, as in HF PEFT
            x = self.lora_dropout(x)
            base = self.base_forward(x)
        scale = self._channels(self.magnitude_scale(), base.ndim)
        lora = self.lora_B(self.lora_A(x)) * self.scaling
        return result + ((scale - 1) * base + scale * lora).to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        """``m · (W₀ + s·B·A) / ‖W₀ + s·B·A‖_c`` in float32, shaped like ``base_layer.weight``."""
        weight = self.merged_lora_weight()
        scale = self.magnitude_scale().detach().float()
        return self.weight_from_rows(self.weight_rows(weight) * scale[:, None])  # (out, fan_in) · (out, 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class DoRALinear(DoRALayer, LoRALinear):
    """DoRA around an ``nn.Linear``."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base_layer.weight.to(x.dtype))


class DoRAConv(DoRALayer, LoRAConv):
    """DoRA around ``nn.Conv1d/2d/3d`` (``groups=1``); the norm runs over each output channel's whole kernel."""

    channel_dim = 1

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self.base_layer.weight.to(x.dtype), None)


class DoRAConv1D(DoRALayer, LoRAConv1D):
    """DoRA around transformers' ``Conv1D`` (GPT-2), whose weight is stored as ``(in, out)``."""

    def weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T  # (in, out) -> (out, in)

    def weight_from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.T.contiguous()  # (out, in) -> (in, out)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.base_layer.weight.to(x.dtype)  # (…, in) @ (in, out) -> (…, out)


def dora_layer_for(module: nn.Module) -> type[DoRALayer]:
    """The DoRA class that wraps ``module``'s type.

    Example::

        >>> import torch.nn as nn
        >>> dora_layer_for(nn.Conv2d(3, 8, 3)).__name__
        'DoRAConv'
    """
    from peft_callbacks.core.targets import SUPPORTED_LAYERS, layer_kind

    kind = layer_kind(module)
    if kind == "linear":
        return DoRALinear
    if kind == "conv":
        return DoRAConv
    if kind == "hf_conv1d":
        return DoRAConv1D
    raise TypeError(f"DoRA cannot adapt a {type(module).__name__}; it supports {SUPPORTED_LAYERS}.")
