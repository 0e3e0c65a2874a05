r"""LoRA layers: a frozen base layer plus a trainable low-rank update (Hu et al. 2021, eq. 3).

::

             ┌─────────────┐
    x ──┬──► │ base_layer  │ (frozen W₀) ───────────────┐
        │    └─────────────┘                            ▼
        │    ┌──────────┐   ┌────────┐   ┌────────┐     (+) ──► h = W₀x + s·B·A·x
        └──► │ dropout  │──►│ lora_A │──►│ lora_B │──►·s┘
             └──────────┘   └────────┘   └────────┘
                            r × in        out × r     s = lora_alpha / r

``lora_A`` is initialised kaiming-uniform (a=√5) and ``lora_B`` with zeros, so the wrapped layer computes exactly
what the base layer did until training moves ``B``. The base layer is wrapped, never copied. For convolutions
``lora_A`` is a convolution with the base layer's kernel, stride, padding and dilation, and ``lora_B`` a 1×1
convolution, so ``ΔW = B·A`` has the base kernel's shape. transformers' ``Conv1D`` stores its weight as
``(in, out)``, so its ``ΔW`` is transposed.

Example::

    >>> import torch, torch.nn as nn
    >>> layer = LoRALinear(nn.Linear(16, 32), r=4, lora_alpha=8)
    >>> x = torch.randn(2, 16)
    >>> torch.equal(layer(x), layer.base_layer(x))  # B = 0 at injection
    True
    >>> layer.delta_weight().shape
    torch.Size([32, 16])
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from peft_callbacks._validation import check_bool, check_float, check_positive_float, check_positive_int
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.targets import SUPPORTED_LAYERS, layer_kind


def _check_base_layer(base_layer: object) -> None:
    if not isinstance(base_layer, nn.Module) or not isinstance(getattr(base_layer, "weight", None), torch.Tensor):
        raise TypeError(
            f"`base_layer` must be a layer with a `weight` tensor (nn.Linear, nn.Conv*d, transformers Conv1D), "
            f"got {type(base_layer).__name__}."
        )


class LoRALayer(PEFTModule):
    """Base of all LoRA layers: holds the wrapped ``base_layer``, ``lora_A``, ``lora_B`` and ``scaling``.

    Subclasses set ``base_kind`` to the :func:`~peft_callbacks.core.targets.layer_kind` they wrap.

    Args:
        base_layer: the layer to adapt; it is kept as is (frozen by the caller) and never copied.
        r: the rank of the update (Hu et al. 2021, §4.1).
        lora_alpha: scale numerator; ``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the input of the LoRA branch, in ``[0, 1)``.
        use_rslora: rank-stabilised scaling (Kalajdzievski 2023).
    """

    base_kind: str | None = None

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        _check_base_layer(base_layer)
        if self.base_kind is not None and layer_kind(base_layer) != self.base_kind:
            raise TypeError(
                f"`base_layer` of {type(self).__name__} must be a {self.base_kind} layer ({SUPPORTED_LAYERS}, "
                f"each with its own LoRA class; lora_layer_for(module) picks it), got {type(base_layer).__name__}."
            )
        check_positive_int("r", r)
        check_positive_float("lora_alpha", lora_alpha)
        check_float("lora_dropout", lora_dropout, low=0.0, high=1.0, high_inclusive=False)
        check_bool("use_rslora", use_rslora)
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.disabled = False
        self.lora_A: nn.Module
        self.lora_B: nn.Module

    # The wrapped layer's attributes stay reachable, for model code that reads `layer.weight.dtype` and the like.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def reset_lora_parameters(self) -> None:
        """``lora_A`` kaiming-uniform (a=√5, as ``nn.Linear``), ``lora_B`` zeros: the layer starts as the base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def _new_factor(self, module: nn.Module) -> nn.Module:
        weight = self.base_layer.weight
        return module.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B(A(dropout(x)))``, computed in the LoRA weights' dtype (scaled on the narrow rank-r tensor)."""
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if type(self.lora_B) is nn.Linear and type(self).lora_branch is LoRALayer.lora_branch:
            return self._add_linear_branch(x, result)
        return result + self.lora_branch(x).to(result.dtype)

    def _add_linear_branch(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + s·B·A·x`` for a Linear ``lora_B``: one ``addmm`` adds the update onto the base output, with no
        separate passes to scale and add the full-width update (the reason this is faster than the plain formula)."""
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (…, r)
        if h.dtype != result.dtype:  # e.g. float32 factors around a bf16 base layer
            return result + self.lora_B(h * self.scaling).to(result.dtype)
        flat = result.reshape(-1, result.shape[-1])  # (N, out)
        update = h.reshape(-1, h.shape[-1])  # (N, r); times Bᵀ (r, out), scaled inside the GEMM
        out = torch.addmm(flat, update, self.lora_B.weight.t(), alpha=self.scaling)
        return out.view(result.shape)

    def delta_weight(self) -> torch.Tensor:
        """``s · B·A`` in float32, shaped like ``base_layer.weight``."""
        a = self.lora_A.weight.float().flatten(1)  # (r, in·k…)
        b = self.lora_B.weight.float().flatten(1)  # (out, r)
        return (b @ a).view(self.base_layer.weight.shape) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the update folded in, in float32."""
        return self.base_layer.weight.float() + self.delta_weight()

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}"


class LoRALinear(LoRALayer):
    """LoRA around an ``nn.Linear``: ``lora_A`` is ``Linear(in, r)``, ``lora_B`` is ``Linear(r, out)``."""

    base_kind = "linear"

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, **kwargs) -> None:
        super().__init__(base_layer, r, lora_alpha, **kwargs)
        self.lora_A = self._new_factor(nn.Linear(base_layer.in_features, r, bias=False))
        self.lora_B = self._new_factor(nn.Linear(r, base_layer.out_features, bias=False))
        self.reset_lora_parameters()


class LoRAConv(LoRALayer):
    """LoRA around ``nn.Conv1d/2d/3d`` with ``groups=1``.

    ``lora_A`` convolves with the base kernel, stride, padding, dilation and padding mode (so output sizes match);
    ``lora_B`` is a 1×1 convolution.
    """

    base_kind = "conv"

    def __init__(self, base_layer: nn.modules.conv._ConvNd, r: int, lora_alpha: float, **kwargs) -> None:
        if getattr(base_layer, "groups", 1) != 1:
            raise ValueError(
                f"LoRAConv supports groups=1 only; got a {type(base_layer).__name__} with groups={base_layer.groups}."
            )
        super().__init__(base_layer, r, lora_alpha, **kwargs)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(base_layer.kernel_size)]
        ones = (1,) * len(base_layer.kernel_size)
        self.lora_A = self._new_factor(
            conv(
                base_layer.in_channels,
                r,
                base_layer.kernel_size,
                stride=base_layer.stride,
                padding=base_layer.padding,
                dilation=base_layer.dilation,
                padding_mode=base_layer.padding_mode,
                bias=False,
            )
        )
        self.lora_B = self._new_factor(conv(r, base_layer.out_channels, ones, stride=ones, bias=False))
        self.reset_lora_parameters()


class LoRAConv1D(LoRALayer):
    """LoRA around transformers' ``Conv1D`` (GPT-2), whose weight is stored transposed as ``(in, out)``."""

    base_kind = "hf_conv1d"

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, **kwargs) -> None:
        super().__init__(base_layer, r, lora_alpha, **kwargs)
        in_features, out_features = base_layer.weight.shape
        self.lora_A = self._new_factor(nn.Linear(in_features, r, bias=False))
        self.lora_B = self._new_factor(nn.Linear(r, out_features, bias=False))
        self.reset_lora_parameters()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()).T * self.scaling  # (in, out)


def lora_layer_for(module: nn.Module) -> type[LoRALayer]:
    """The LoRA class that wraps ``module``'s type."""
    kind = layer_kind(module)
    if kind == "linear":
        return LoRALinear
    if kind == "conv":
        return LoRAConv
    if kind == "hf_conv1d":
        return LoRAConv1D
    raise TypeError(f"LoRA cannot adapt a {type(module).__name__}; it supports {SUPPORTED_LAYERS}.")
