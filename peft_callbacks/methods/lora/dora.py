r"""DoRA adapters: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA", eq. 5).

The adapted weight is split into a direction, updated by LoRA, and a trainable magnitude per output unit::

    W' = m · (W₀ + s·B·A) / ‖W₀ + s·B·A‖_c          m: (out,)   ‖·‖_c: one norm per output row, over the inputs

``m`` (``lora_magnitude_vector``) starts at ``‖W₀‖_c``, so with ``B = 0`` the layer computes exactly what the base
layer did. As in the paper (§4.3) and in HF PEFT, the norm is treated as a constant in backward: gradients reach
``m``, ``A`` and ``B`` but not through ``‖·‖_c``. The forward pass never forms ``W'``; it rescales the base output::

    h = b + (m/‖·‖_c − 1) ⊙ W₀x + (m/‖·‖_c) ⊙ s·B·A·x          (b: the base bias, left untouched)

which is how HF PEFT computes it, so with the same ``A``, ``B`` and ``m`` the outputs match
``LoraConfig(use_dora=True)``. Each DoRA class subclasses its LoRA class, so everything that handles LoRA (LoRA+,
merging, adapter files) handles DoRA too; merging folds ``W'`` into the base weight (float32, finite-checked).

**Scale.** The renormalisation makes DoRA's update non-linear in ``s·B·A`` (HF PEFT's ``rescale_adapter_scale``
scales ``s`` inside the norm, so its scale 0 is ``m·W₀/‖W₀‖_c``, not the base layer once ``m`` has trained). Here
:attr:`~peft_callbacks.engine.scaling.Scalable.scale` interpolates the effective weight, in the forward pass and in
the merge::

    W(scale) = W₀ + scale·(W' − W₀)            h(scale) = h₀ + scale·(h' − h₀)

so ``scale = 0`` is the base layer and ``1`` the DoRA layer, exactly; no DoRA tensors hold such a weight, so the scale
cannot be absorbed (merge at that scale instead).

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine import AdaptedLayer
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> base = nn.Linear(16, 32)
    >>> layer = AdaptedLayer(base)
    >>> layer.add_adapter("default", DoRALinear(base, LoRAConfig(rank=4, alpha=8, use_dora=True)))
    >>> x = torch.randn(2, 16)
    >>> torch.allclose(layer(x), base(x), atol=1e-6)  # m = ‖W₀‖_c and B = 0 at injection
    True
    >>> layer.adapters["default"].lora_magnitude_vector.shape
    torch.Size([32])
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peft_callbacks.core.kinds import base_weight
from peft_callbacks.core.tensor_parallel import forward_weight
from peft_callbacks.engine.layers import AdaptedLayer, Adapter
from peft_callbacks.methods.lora.layers import LoRAAdapter, LoRAConv, LoRAConv1D, LoRALinear

__all__ = ["DoRAAdapter", "DoRAConv", "DoRAConv1D", "DoRALinear"]

_NORM_FLOOR = 1e-12  # a base row of zeros has m = 0: 0 / floor = 0 instead of 0 / 0 = NaN


class DoRAAdapter(LoRAAdapter):
    """What every DoRA adapter adds to its LoRA adapter: the magnitude ``m`` and the rescaled forward.

    Subclasses combine this class with a LoRA adapter (``class DoRALinear(DoRAAdapter, LoRALinear)``) and say how the
    stored base weight maps to ``(out, fan_in)`` rows (:meth:`weight_rows`), how the bias-free base layer is applied
    (:meth:`base_forward`) and on which output dimension channels live (:attr:`channel_dim`).
    """

    channel_dim = -1
    absorbs_scale = False  # W₀ + s·(W' − W₀) is no DoRA weight: merge at s instead

    @property
    def scaling(self) -> float:
        """``alpha / r`` (or ``alpha / √r``) inside the norm: DoRA's scale interpolates the whole layer instead."""
        return self.lora_scaling

    def __init__(self, base_layer: nn.Module, config) -> None:
        super().__init__(base_layer, config)
        with torch.no_grad():
            norm = self.weight_norm(base_weight(base_layer).float()).to(self.lora_A.weight.dtype)
        self.lora_magnitude_vector = nn.Parameter(norm)  # (out,)
        self._merged_scale: torch.Tensor | None = None

    # -- per layer type -----------------------------------------------------------------------------------------
    def weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (shaped like the stored base weight) as ``(out, fan_in)`` rows."""
        return weight.flatten(1)

    def weight_from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_rows`."""
        return rows.reshape(self.weight_shape)

    def base_forward(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        """``W₀x`` without the bias."""
        raise NotImplementedError

    # -- DoRA ---------------------------------------------------------------------------------------------------
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``‖weight + s·B·A‖_c`` per output row, in float32, detached (a constant in backward, as in the paper).

        Expanded as ``‖W‖² + 2s·⟨W·Aᵀ, B⟩ + s²·⟨B·(A·Aᵀ), B⟩`` per row, so the ``(out, fan_in)`` update is never
        formed: one pass over ``W`` instead of five (DoRA computes this norm in every forward pass).
        """
        with torch.no_grad():
            rows = self.weight_rows(weight.float())  # (out, fan_in)
            a = self.lora_A.weight.float().flatten(1)  # (r, fan_in)
            b = self.lora_B.weight.float().flatten(1)  # (out, r)
            s = self.scaling
            squared = torch.linalg.vector_norm(rows, dim=1).square()
            squared += (rows @ a.t()).mul_(b).sum(1).mul_(2 * s)
            squared += (b @ (a @ a.t())).mul_(b).sum(1).mul_(s * s)
            return squared.clamp_min_(0).sqrt_().clamp_min_(_NORM_FLOOR)

    def magnitude_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """``m / ‖weight + s·B·A‖_c``, shape ``(out,)``; gradients reach ``m`` only."""
        m = self.lora_magnitude_vector
        return m / self.weight_norm(weight).to(m.dtype)

    def _channels(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_dim == -1:
            return scale  # (out,) broadcasts over the last dim
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return scale.view(shape)  # (1, out, 1, …)

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        adapted = self.dora_forward(layer, x, result)
        if self.scale == 1.0:
            return adapted
        return torch.lerp(result, adapted.to(result.dtype), self.scale)  # h₀ + scale·(h' − h₀)

    def dora_forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The DoRA layer's output at scale 1, given the output so far."""
        x = x.to(self.lora_A.weight.dtype)
        bias = layer.base_layer.bias
        weight = forward_weight(layer.base_layer, x)  # a tensor-parallel split stays split
        scale = self._channels(self.magnitude_scale(weight.float()), result.ndim)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            # dropout on the LoRA input: the rescaled base term sees the same dropped input, as in HF PEFT
            x = self.lora_dropout(x)
            base = self.base_forward(layer, x)
            lora = self.lora_B(self.lora_A(x)) * self.scaling
            return result + ((scale - 1) * base + scale * lora).to(result.dtype)
        # result = W₀x + b, so result + (c−1)·(result − b) + c·s·BAx = c·(result + s·BAx) + (1−c)·b with
        # c = m / ‖W₀ + s·B·A‖: two passes over the output instead of six
        total = torch.add(result.to(x.dtype), self.lora_B(self.lora_A(x)), alpha=self.scaling)
        scale = scale.to(total.dtype)
        if bias is None:
            return (total * scale).to(result.dtype)
        shift = (1 - scale) * self._channels(bias.to(total.dtype), result.ndim)
        return torch.addcmul(shift, total, scale).to(result.dtype)

    def tensor_parallel_dims(self) -> dict[str, tuple[int | None, int | None]] | None:
        dims = super().tensor_parallel_dims()
        return None if dims is None else {**dims, "lora_magnitude_vector": (0, None)}  # m: (out,)

    def merge_into(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        """``m · (W + s·B·A) / ‖W + s·B·A‖_c`` in float32 (``m`` too, whatever the model's dtype); differentiable in
        ``m``, ``A`` and ``B`` with the norm a constant, as in the forward pass. At a :attr:`scale` other than 1,
        ``W + scale·(that − W)``."""
        scale = self.lora_magnitude_vector.float() / self.weight_norm(weight)
        adapted = self.weight_from_rows(self.weight_rows(weight + self.low_rank_delta()) * scale[:, None])
        return adapted if self.scale == 1.0 else torch.lerp(weight, adapted, self.scale)

    def merged(self, layer: AdaptedLayer, weight: torch.Tensor) -> None:
        """Keep the scale of this merge (from the weight it was merged into) for :meth:`unmerge_from`."""
        self._merged_scale = (self.lora_magnitude_vector.float() / self.weight_norm(weight)).detach()

    def unmerge_from(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        """``W'/c − s·B·A`` with ``c = m/‖·‖_c`` taken when the adapter was merged (as HF PEFT does); at a
        :attr:`scale` ``t`` other than 1, row by row ``(W' − t·c·s·B·A) / (1 − t + t·c)``."""
        c = self._merged_scale
        if c is None:
            raise ValueError("This DoRA adapter was not merged here; there is nothing to unmerge.")
        self._merged_scale = None
        if self.scale == 1.0:
            return self.weight_from_rows(self.weight_rows(weight) / c[:, None]) - self.low_rank_delta()
        t, delta = self.scale, self.weight_rows(self.low_rank_delta())
        rows = (self.weight_rows(weight) - t * c[:, None] * delta) / (1 - t + t * c)[:, None]
        return self.weight_from_rows(rows)

    # -- the update: W' − W₀ from the merge, not LoRA's closed forms ------------------------------------------------
    def delta_weight(self, layer: AdaptedLayer | None = None) -> torch.Tensor:
        """``W(scale) − W₀`` (module docstring), from :meth:`merge_into`: it needs the ``layer``."""
        return Adapter.delta_weight(self, layer)

    def update_norm(self, layer: AdaptedLayer | None = None, *, squared: bool = False) -> torch.Tensor:
        return Adapter.update_norm(self, layer, squared=squared)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class DoRALinear(DoRAAdapter, LoRALinear):
    """DoRA on an ``nn.Linear``."""

    def base_forward(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, forward_weight(layer.base_layer, x).to(x.dtype))


class DoRAConv(DoRAAdapter, LoRAConv):
    """DoRA on ``nn.Conv1d/2d/3d`` (``groups=1``); the norm runs over each output channel's whole kernel."""

    channel_dim = 1

    def base_forward(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        base = layer.base_layer
        return base._conv_forward(x, base_weight(base).to(x.dtype), None)


class DoRAConv1D(DoRAAdapter, LoRAConv1D):
    """DoRA on transformers' ``Conv1D`` (GPT-2), whose weight is stored as ``(in, out)``."""

    def weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T  # (in, out) -> (out, in)

    def weight_from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.T.contiguous()  # (out, in) -> (in, out)

    def base_forward(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        return x @ base_weight(layer.base_layer).to(x.dtype)  # (…, in) @ (in, out) -> (…, out)
