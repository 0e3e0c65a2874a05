r"""LoHa (Hyeon-Woo et al. 2022, "FedPara", §3; LyCORIS): the update is the Hadamard product of two low-rank matrices.

::

    ΔW = (alpha / r) · (W1a·W1b) ⊙ (W2a·W2b)          W1a, W2a: (out, r)   W1b, W2b: (r, in·k…)

The element-wise product of two rank-``r`` matrices has rank up to ``r²``, for ``2·r·(out + in)`` parameters (a LoRA
of rank ``r²`` has ``r²·(out + in)``). With ``use_effective_conv2d`` a convolution's kernel (larger than 1) is
factored through two core tensors instead (FedPara's "Proposition 3")::

    ΔW = (alpha / r) · (T1 ×₁ W1a ×₂ W1b) ⊙ (T2 ×₁ W2a ×₂ W2b)    T: (r, r, *kernel)   Wa: (r, out)   Wb: (r, in)

``W2b`` starts at zero (the others Kaiming-uniform), so an adapted layer computes what the base did until training
moves it. Tensors keep HF PEFT's names and shapes (``hada_w1_a`` …, ``hada_t1`` …), so the same tensors give the
same outputs as ``peft.LoHaConfig`` and directories move between the two libraries. ``rank_dropout`` and
``module_dropout`` act during training only (see :mod:`peft_callbacks.methods.lycoris`).

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine import inject, merge
    >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> model = inject(model, LoHaConfig(rank=3, alpha=3, target_modules=["0"]))
    >>> loha = model[0].adapters["default"]
    >>> sum(p.numel() for p in loha.parameters())  # 2·r·(out + in); a rank-9 LoRA trains 9·(out + in) = 576
    384
    >>> torch.count_nonzero(loha.delta_weight()).item()  # W2b = 0 at injection
    0
    >>> with torch.no_grad():
    ...     _ = loha.hada_w2_b.normal_()
    >>> torch.linalg.matrix_rank(loha.delta_weight()).item()  # (W1a·W1b) ⊙ (W2a·W2b): rank r² = 9, not r
    9
    >>> x = torch.randn(4, 32)
    >>> adapted = model(x)
    >>> torch.allclose(merge(model)(x), adapted, atol=1e-5)
    True
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from peft_callbacks.engine import register_method
from peft_callbacks.methods.lycoris import LycorisAdapter, LycorisConfig, LycorisMethod, kind_classes, peft_mapping

__all__ = ["LoHaAdapter", "LoHaConfig", "LoHaConv", "LoHaConv1D", "LoHaLinear"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoHaConfig(LycorisConfig, method="loha"):
    """LoHa: a Hadamard product of two rank-``r`` updates, scaled by ``alpha / rank`` (HF PEFT's ``LoHaConfig``).

    Attributes:
        rank: the rank ``r`` of each factor pair (> 0; the product has rank up to ``r²``) [PEFT: ``r``].
        alpha: the update is multiplied by ``alpha / rank`` (> 0).
        rank_dropout: probability of zeroing each output row of the update during training (the kept rows are
            rescaled by the inverse of the kept fraction), in ``[0, 1)``.
        module_dropout: probability of skipping a layer's whole update for one training step, in ``[0, 1)``.
        use_effective_conv2d: factor kernels larger than 1 through core tensors ``hada_t1``/``hada_t2``.

    Example::

        >>> LoHaConfig(rank=4, alpha=4, target_modules=["qkv"]).to_dict()["alpha"]
        4.0
        >>> LoHaConfig(rank_dropout=1.0)
        Traceback (most recent call last):
        ...
        ValueError: `rank_dropout` must be in [0.0, 1.0), got 1.0.
    """


class LoHaAdapter(LycorisAdapter):
    """A LoHa update of one layer: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and ``hada_t1``,
    ``hada_t2`` for factored kernels), in PEFT's shapes.

    Args:
        base_layer: the layer to adapt (read for its shape, device and dtype).
        config: a :class:`LoHaConfig`.
    """

    def parameter_shapes(self, config: LoHaConfig) -> dict[str, tuple[int, ...]]:
        r, out_features, in_features = self.r, self.out_features, self.in_features
        if self.effective_conv:
            core = (r, r, *self._core_shape())
            return {
                "hada_t1": core,
                "hada_w1_a": (r, out_features),
                "hada_w1_b": (r, in_features),
                "hada_t2": core,
                "hada_w2_a": (r, out_features),
                "hada_w2_b": (r, in_features),
            }
        columns = in_features * math.prod(self.kernel_size)  # the kernel is flattened into the input dimension
        return {
            "hada_w1_a": (out_features, r),
            "hada_w1_b": (r, columns),
            "hada_w2_a": (out_features, r),
            "hada_w2_b": (r, columns),
        }

    def reset_parameters(self) -> None:
        """Kaiming-uniform everywhere but ``hada_w2_b``, which starts at zero (so ``ΔW = 0``), as PEFT does."""
        self.kaiming_("hada_w1_a", "hada_w1_b", "hada_w2_a", *(("hada_t1", "hada_t2") if self.effective_conv else ()))
        nn.init.zeros_(self.hada_w2_b)

    def update_factor(self) -> torch.Tensor:
        return self.hada_w2_b  # ΔW = c·(W1a·W1b) ⊙ (W2a·W2b): linear in W2b, also through a core tensor

    def kernel_delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w1_a, w1_b = self._tensor("hada_w1_a", dtype), self._tensor("hada_w1_b", dtype)
        w2_a, w2_b = self._tensor("hada_w2_a", dtype), self._tensor("hada_w2_b", dtype)
        if self.effective_conv:
            # (r, r, k…) ×₁ (r, out) ×₂ (r, in) -> (out, in, k…)
            first = torch.einsum("ij...,jr,ip->pr...", self._tensor("hada_t1", dtype), w1_b, w1_a)
            second = torch.einsum("ij...,jr,ip->pr...", self._tensor("hada_t2", dtype), w2_b, w2_a)
            delta = first * second * self.scaling
        else:
            delta = (w1_a @ w1_b) * (w2_a @ w2_b) * self.scaling  # (out, r)·(r, in·k…), twice, element-wise
        return delta.reshape(self.out_features, self.in_features, *self.kernel_size)


LoHaLinear, LoHaConv, LoHaConv1D = kind_classes(LoHaAdapter, "LoHa")


class LoHaMethod(LycorisMethod):
    """LoHa: ``W₀x + (alpha/r)·((W1a·W1b) ⊙ (W2a·W2b))·x`` on Linear, Conv and ``Conv1D`` layers."""

    name = "loha"
    title = "LoHa"
    config_class = LoHaConfig
    examples = {
        "plain": LoHaConfig(rank=4, alpha=8),
        "effective-conv2d": LoHaConfig(rank=4, alpha=8, use_effective_conv2d=True, rank_dropout=0.1),
    }
    adapter_classes = {"linear": LoHaLinear, "conv": LoHaConv, "hf_conv1d": LoHaConv1D}
    peft = peft_mapping("LOHA", "LoHa", LoHaConfig)


register_method(LoHaMethod())
