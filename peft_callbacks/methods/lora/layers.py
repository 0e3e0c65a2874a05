r"""LoRA adapters: a trainable low-rank update of a frozen weight layer (Hu et al. 2021, eq. 3).

::

             ┌─────────────┐
    x ──┬──► │ base_layer  │ (frozen W₀) ───────────────┐
        │    └─────────────┘                            ▼
        │    ┌──────────┐   ┌────────┐   ┌────────┐     (+) ──► h = W₀x + s·B·A·x
        └──► │ dropout  │──►│ lora_A │──►│ lora_B │──►·s┘
             └──────────┘   └────────┘   └────────┘
                            r × in        out × r     s = lora_alpha / r

``lora_A`` is initialised kaiming-uniform (a=√5) and ``lora_B`` with zeros, so the adapted layer computes exactly
what the base layer did until training moves ``B``. For convolutions ``lora_A`` is a convolution with the base
layer's kernel, stride, padding and dilation, and ``lora_B`` a 1×1 convolution, so ``ΔW = B·A`` has the base
kernel's shape. transformers' ``Conv1D`` stores its weight as ``(in, out)``, so its ``ΔW`` is transposed.

The adapter's :attr:`~peft_callbacks.engine.scaling.Scalable.scale` multiplies ``s`` (HF PEFT's ``set_scale``): the
layer computes ``W₀ + scale·s·B·A``, linear in ``scale``, and
:meth:`~peft_callbacks.engine.scaling.Scalable.absorb_scale` multiplies ``B`` by it.

Each class is one :class:`~peft_callbacks.engine.layers.Adapter`: it lives inside an
:class:`~peft_callbacks.engine.layers.AdaptedLayer` beside the base layer it updates.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine import AdaptedLayer
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> base = nn.Linear(16, 32)
    >>> lora = LoRALinear(base, LoRAConfig(rank=4, alpha=8))
    >>> lora.scaling, lora.delta_weight().shape
    (2.0, torch.Size([32, 16]))
    >>> layer = AdaptedLayer(base)
    >>> layer.add_adapter("default", lora)
    >>> x = torch.randn(2, 16)
    >>> torch.equal(layer(x), base(x))  # B = 0 at injection
    True
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from peft_callbacks.core.kinds import conv_like
from peft_callbacks.engine.layers import AdaptedLayer, Adapter
from peft_callbacks.methods.lora.fused import lora_linear
from peft_callbacks.methods.lora.orthogonal import orthogonal_factors

if TYPE_CHECKING:
    from peft_callbacks.methods.lora.method import LoRAConfig

__all__ = ["LoRAAdapter", "LoRAConv", "LoRAConv1D", "LoRALinear", "add_lora_bias", "factored_norm"]

log = logging.getLogger(__name__)


def factored_norm(a: torch.Tensor, b: torch.Tensor, scaling: float, *, squared: bool = False) -> torch.Tensor:
    """``‖s·B·A‖_F`` (``squared``: its square) from the ``r × r`` Gram matrices, ``s²·Σ (BᵀB) ⊙ (AAᵀ)``, without
    forming ``B·A``; ``a`` is ``(r, in)``, ``b`` is ``(out, r)``.

    Example::

        >>> a, b = torch.randn(2, 5), torch.randn(4, 2)
        >>> torch.allclose(factored_norm(a, b, 0.5), torch.linalg.norm(0.5 * b @ a), atol=1e-5)
        True
    """
    square = (b.t() @ b * (a @ a.t())).sum() * scaling**2  # (r, r) ⊙ (r, r)
    return square if squared else square.clamp_min(0).sqrt()


class LoRAAdapter(Adapter):
    """What every LoRA adapter holds: ``lora_A``, ``lora_B``, ``scaling`` and the dropout on the branch input.

    Subclasses build the two factors for their base layer kind (:meth:`make_factors`) and may say how ``B·A`` maps
    onto the stored base weight (:meth:`low_rank_delta`).

    ``scaling`` is ``alpha / r`` (``alpha / √r`` with rsLoRA) times :attr:`scale`; ``lora_scaling`` is the first
    factor alone.

    Args:
        base_layer: the layer to adapt (read for its shape, device and dtype).
        config: a :class:`~peft_callbacks.methods.lora.LoRAConfig` (rank, alpha, dropout, rsLoRA, …).
    """

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        self.r = config.rank
        self.lora_alpha = config.alpha
        self.use_rslora = config.use_rslora
        self.lora_scaling = config.alpha / (math.sqrt(config.rank) if config.use_rslora else config.rank)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        weight = base_layer.weight
        lora_A, lora_B = self.make_factors(base_layer, config.rank)
        dtype = weight.dtype if weight.is_floating_point() else None
        self.lora_A = lora_A.to(device=weight.device, dtype=dtype)
        self.lora_B = lora_B.to(device=weight.device, dtype=dtype)
        if getattr(config, "lora_bias", False):
            add_lora_bias(self, base_layer)
        self.reset_parameters()

    absorbs_scale = True

    @property
    def scaling(self) -> float:
        """``s = alpha / r`` (or ``alpha / √r``) times :attr:`scale`: what ``B·A`` is multiplied by."""
        return self.lora_scaling * self.scale

    def make_factors(self, base_layer: nn.Module, r: int) -> tuple[nn.Module, nn.Module]:
        """``(lora_A, lora_B)`` for this kind of base layer."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """``lora_A`` kaiming-uniform (a=√5, as ``nn.Linear``; with ``init="gaussian"`` normal with std ``1/r``, as
        PEFT), ``lora_B`` zeros: the layer starts as the base."""
        init = getattr(self.config, "init", "default")
        if init == "orthogonal":  # A, B from one random orthogonal matrix (PEFT's): both ≠ 0, B·A = 0
            lora_A, lora_B = orthogonal_factors(self.lora_A.weight[0].numel(), self.lora_B.weight.shape[0], self.r)
            with torch.no_grad():
                self.lora_A.weight.copy_(lora_A.view(self.lora_A.weight.shape))
                self.lora_B.weight.copy_(lora_B.view(self.lora_B.weight.shape))
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B(A(dropout(x)))``, computed in the LoRA weights' dtype (scaled on the narrow rank-r tensor, or
        after ``B`` when it has a bias, which is scaled with the branch as in PEFT)."""
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (…, r)
        if self.lora_B.bias is not None:
            return self.lora_B(h) * self.scaling
        return self.lora_B(h * self.scaling)

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return result + self.branch(x).to(result.dtype)

    def low_rank_delta(self) -> torch.Tensor:
        """``s · B·A`` in float32, shaped like the base weight."""
        a = self.lora_A.weight.float().flatten(1)  # (r, in·k…)
        b = self.lora_B.weight.float().flatten(1)  # (out, r)
        return (b @ a).view(self.weight_shape) * self.scaling

    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as float32 matrices ``(k, in·k…)`` and ``(out, k)`` with ``ΔW = s·B·A`` (up to layout)."""
        return self.lora_A.weight.float().flatten(1), self.lora_B.weight.float().flatten(1)

    def delta_weight(self, layer: AdaptedLayer | None = None) -> torch.Tensor:
        """``ΔW = s · B·A`` in float32, shaped like the base weight (no ``layer`` needed)."""
        return self.low_rank_delta()

    def update_norm(self, layer: AdaptedLayer | None = None, *, squared: bool = False) -> torch.Tensor:
        """``‖s·B·A‖_F`` from the ``r × r`` Gram matrices, ``s²·Σ (BᵀB) ⊙ (AAᵀ)``, without forming ``B·A``."""
        return factored_norm(*self.update_factors(), self.scaling, squared=squared)

    def store_scale(self, scale: float) -> None:
        self.lora_B.weight.mul_(scale)
        if self.lora_B.bias is not None:
            self.lora_B.bias.mul_(scale)

    def merge_into(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        if not self.mergeable:
            raise ValueError(no_bias_to_merge(layer.base_layer))
        return weight + self.low_rank_delta()

    def unmerge_from(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.low_rank_delta()

    def merge_bias_into(self, layer: AdaptedLayer, bias: torch.Tensor) -> torch.Tensor:
        """``b + s · b_B`` with ``lora_bias`` (PEFT's merge), else ``b``."""
        return bias if self.lora_B.bias is None else bias + self.lora_B.bias.float() * self.scaling

    def unmerge_bias_from(self, layer: AdaptedLayer, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.lora_B.bias is None else bias - self.lora_B.bias.float() * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}"


def add_lora_bias(adapter: LoRAAdapter, base_layer: nn.Module) -> None:
    """Give ``lora_B`` a zero bias (``lora_bias``); on a base layer without a bias the adapter cannot merge."""
    weight = adapter.lora_B.weight  # (out, r, …)
    adapter.lora_B.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype))
    if getattr(base_layer, "bias", None) is None:
        adapter.mergeable = False
        adapter.merge_refusal = no_bias_to_merge(base_layer)
        log.warning("%s; it works unmerged.", no_bias_to_merge(base_layer))


def no_bias_to_merge(base_layer: nn.Module) -> str:
    return (
        f"`lora_bias=True` on a {type(base_layer).__name__} without a bias: merging would need a bias the layer does "
        f"not have, so this LoRA cannot be merged (as in HF PEFT)"
    )


class LoRALinear(LoRAAdapter):
    """LoRA on an ``nn.Linear``: ``lora_A`` is ``Linear(in, r)``, ``lora_B`` is ``Linear(r, out)``.

    A plain ``nn.Linear`` base (not a subclass with its own forward) runs with its update as one autograd node
    (:mod:`peft_callbacks.methods.lora.fused`) whenever nothing else needs the plain path.
    """

    base_kind = "linear"
    transposed = False  # the base stores its weight as (out, in)

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        plain = type(base_layer) is nn.Linear or (self.transposed and type(base_layer).__name__ == "Conv1D")
        own_update = type(self).forward is LoRALinear.forward  # a subclass (DoRA) that computes otherwise: plain path
        factors = type(self.lora_A) is nn.Linear and type(self.lora_B) is nn.Linear and self.lora_B.bias is None
        self._fusable = plain and own_update and factors

    def fused(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor | None:
        base, a, b = layer.base_layer, self.lora_A, self.lora_B
        if (
            not self._fusable
            or torch.compiler.is_compiling()
            or torch.is_autocast_enabled(x.device.type)
            or x.dtype != a.weight.dtype
            or base.weight.dtype != x.dtype
            or type(base.weight) is not nn.Parameter
            or base._forward_hooks
            or base._forward_pre_hooks
            or a._forward_hooks
            or b._forward_hooks
        ):
            return None
        dropped = self.lora_dropout(x) if self.training and not isinstance(self.lora_dropout, nn.Identity) else None
        return lora_linear(x, base.weight, base.bias, a.weight, b.weight, self.scaling, self.transposed, dropped)

    def make_factors(self, base_layer: nn.Linear, r: int) -> tuple[nn.Module, nn.Module]:
        return nn.Linear(base_layer.in_features, r, bias=False), nn.Linear(r, base_layer.out_features, bias=False)

    def tensor_parallel_dims(self) -> dict[str, tuple[int | None, int | None]] | None:
        if self.transposed or self.lora_B.bias is not None:
            return None  # Conv1D stores (in, out): no parallel style splits it; nor B's bias here
        return {"lora_A.weight": (None, 1), "lora_B.weight": (0, None)}  # A: (r, in), B: (out, r)

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (…, r)
        if self.lora_B.bias is not None:  # lora_bias: B's bias is scaled with the branch, as in PEFT
            return result + (self.lora_B(h) * self.scaling).to(result.dtype)
        if h.dtype != result.dtype:  # e.g. float32 factors around a bf16 base layer
            return result + self.lora_B(h * self.scaling).to(result.dtype)
        # one addmm adds s·h·Bᵀ onto the base output: no separate passes to scale and add the full-width update
        flat = result.reshape(-1, result.shape[-1])  # (N, out)
        out = torch.addmm(flat, h.reshape(-1, h.shape[-1]), self.lora_B.weight.t(), alpha=self.scaling)
        return out.view(result.shape)


class LoRAConv(LoRAAdapter):
    """LoRA on ``nn.Conv1d/2d/3d`` (``groups=1``): ``lora_A`` convolves with the base kernel, stride, padding,
    dilation and padding mode (so output sizes match); ``lora_B`` is a 1×1 convolution."""

    base_kind = "conv"

    def make_factors(self, base_layer: nn.modules.conv._ConvNd, r: int) -> tuple[nn.Module, nn.Module]:
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(base_layer.kernel_size)]
        ones = (1,) * len(base_layer.kernel_size)
        lora_B = conv(r, base_layer.out_channels, ones, stride=ones, bias=False)
        return conv_like(base_layer, base_layer.in_channels, r), lora_B


class LoRAConv1D(LoRALinear):
    """LoRA on transformers' ``Conv1D`` (GPT-2), whose weight is stored transposed as ``(in, out)``; the factors are
    Linear layers as for ``nn.Linear``."""

    base_kind = "hf_conv1d"
    transposed = True  # the base stores its weight as (in, out)

    def make_factors(self, base_layer: nn.Module, r: int) -> tuple[nn.Module, nn.Module]:
        in_features, out_features = base_layer.weight.shape
        return nn.Linear(in_features, r, bias=False), nn.Linear(r, out_features, bias=False)

    def low_rank_delta(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()).T * self.scaling  # (in, out)
