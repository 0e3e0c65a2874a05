r"""PiSSA and OLoRA: LoRA factors initialised from the base weight, the base becoming the residual.

Both start training from the principal part of ``W₀`` instead of from zero (Meng et al. 2024, "PiSSA", §3; Büyükakyüz
2024, "OLoRA")::

    pissa:  W₀ = U S Vᵀ (SVD)   B₀ = U[:, :r]·√(S[:r]/s)     A₀ = √(S[:r]/s)·Vᵀ[:r]     (s = the LoRA scaling)
    pissa_niter_K:              the same from a randomised SVD with K power iterations (``torch.svd_lowrank``)
    olora:  W₀ = Q R (QR)       B₀ = Q[:, :r]                A₀ = R[:r]

    the model computes   (W₀ − s·B₀A₀) x + s·B·A x          B, A trained from B₀, A₀

HF PEFT writes the residual ``W₀ − s·B₀A₀`` into the base weight. Here the base weight stays ``W₀`` and the adapter
keeps ``B₀``, ``A₀`` as frozen buffers (``lora_B_init``, ``lora_A_init``) and subtracts their product: the same model,
with the engine's rules intact: the frozen base is bit-identical to the checkpoint it came from (its fingerprint
matches, slim checkpoints and adapter files leave it out), ``disabled()`` and ``unload()`` give the original model
back, and a reload is exact. The adapter file stores ``B₀``, ``A₀`` beside ``B``, ``A`` (twice LoRA's size), so
reloading onto a fresh original base needs no SVD to agree to the last bit, whatever the platform, and a randomised
SVD's draw is kept. Merging folds ``s·(B·A − B₀·A₀)`` into ``W₀``: the weights PEFT's ``merge_and_unload`` gives.

The cost is one more rank-``r`` product per forward (the two products run as one of rank ``2r``).

The adapter's :attr:`~peft_callbacks.engine.scaling.Scalable.scale` multiplies the whole update, ``W₀ + scale·s·(B·A −
B₀·A₀)`` (linear, as LoRA's); it cannot be absorbed into ``B`` alone (that would scale ``B·A`` but not ``B₀·A₀``), so a
scale is made permanent by merging at it.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine import AdaptedLayer
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> base = nn.Linear(16, 32)
    >>> lora = ResidualLoRALinear(base, LoRAConfig(rank=4, alpha=8, init="pissa"))
    >>> top = torch.linalg.svdvals(base.weight)[:4]  # s·B₀·A₀ is the top-4 part of W₀
    >>> initial = lora.scaling * lora.lora_B.weight @ lora.lora_A.weight
    >>> torch.allclose(torch.linalg.svdvals(initial)[:4], top, atol=1e-5)
    True
    >>> layer = AdaptedLayer(base)
    >>> layer.add_adapter("default", lora)
    >>> x = torch.randn(2, 16)
    >>> torch.allclose(layer(x), base(x), atol=1e-5)  # B·A = B₀·A₀ at injection
    True
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from peft_callbacks.core.kinds import base_weight
from peft_callbacks.engine.layers import AdaptedLayer
from peft_callbacks.methods.lora.layers import LoRAAdapter, LoRAConv, LoRAConv1D, LoRALinear

if TYPE_CHECKING:
    from peft_callbacks.methods.lora.method import LoRAConfig

__all__ = [
    "DATA_INITS",
    "RESIDUAL_INITS",
    "ResidualLoRAAdapter",
    "ResidualLoRAConv",
    "ResidualLoRAConv1D",
    "ResidualLoRALinear",
    "is_residual_init",
    "principal_factors",
]

DATA_INITS = ("corda", "lora_ga")  # residual inits whose factors come from data, supplied after injection
RESIDUAL_INITS = ("pissa", "pissa_niter_<K>", "olora", *DATA_INITS)
_NITER = re.compile(r"pissa_niter_(\d+)")


def is_residual_init(init: str) -> bool:
    """Does ``init`` start the factors from a part of the base weight, the base acting as the residual (PiSSA, OLoRA,
    and the data-driven CorDA and LoRA-GA)?

    Example::

        >>> is_residual_init("pissa_niter_4"), is_residual_init("corda"), is_residual_init("gaussian")
        (True, True, False)
    """
    return init in ("pissa", "olora", *DATA_INITS) or _NITER.fullmatch(init) is not None


def principal_factors(weight: torch.Tensor, rank: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A₀, B₀)`` in float32 for a weight seen as ``(out, fan_in)``, by HF PEFT's formulas (module docstring).

    A weight has at most ``k = min(out, fan_in)`` components: for ``rank > k`` the ``k`` there are are returned
    (``A₀``: ``(k, fan_in)``, ``B₀``: ``(out, k)``), and the adapter starts its other ``rank − k`` components as plain
    LoRA does (``A`` random, ``B`` zero).

    Args:
        weight: ``(out, fan_in)``.
        rank: ``r``.
        scaling: the LoRA scaling ``s`` (PiSSA divides the singular values by it, so ``s·B₀A₀`` is the top-``r`` part).
        init: ``"pissa"``, ``"pissa_niter_<K>"`` or ``"olora"``.

    Raises:
        ValueError: an unknown ``init``.

    Example::

        >>> w = torch.randn(6, 5)
        >>> a, b = principal_factors(w, 8, 1.0, "olora")
        >>> tuple(a.shape), tuple(b.shape), torch.allclose(b @ a, w, atol=1e-5)  # 5 components: the whole weight
        ((5, 5), (6, 5), True)
    """
    weight = weight.detach().float()
    rank = min(rank, *weight.shape)
    niter = _NITER.fullmatch(init)
    if init == "pissa":
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in)
        vr, sr, uhr = v[:, :rank], s[:rank] / scaling, uh[:rank]
    elif niter is not None:
        vr, sr, ur = torch.svd_lowrank(weight, rank, niter=int(niter.group(1)))
        sr, uhr = sr / scaling, ur.t()
    elif init == "olora":
        q, r = torch.linalg.qr(weight)  # (out, k), (k, in)
        return r[:rank].contiguous(), q[:, :rank].contiguous()
    else:
        raise ValueError(f"`init` must be one of {RESIDUAL_INITS} here, got {init!r}.")
    lora_A = torch.diag(torch.sqrt(sr)) @ uhr  # (r, in)
    lora_B = vr @ torch.diag(torch.sqrt(sr))  # (out, r)
    return lora_A, lora_B


class ResidualLoRAAdapter(LoRAAdapter):
    """What PiSSA / OLoRA add to a LoRA adapter: factors taken from the base weight, and that initial product
    subtracted again (frozen buffers ``lora_A_init`` / ``lora_B_init``), so the layer starts as the base.

    Subclasses combine it with a LoRA adapter (``class ResidualLoRALinear(ResidualLoRAAdapter, LoRALinear)``).

    Example::

        >>> from peft_callbacks.methods.lora import LoRAConfig
        >>> lora = ResidualLoRAConv(nn.Conv2d(3, 8, 3), LoRAConfig(rank=4, init="olora"))
        >>> tuple(lora.lora_A_init.shape), bool(lora.delta_weight().abs().max() < 1e-6)  # B·A = B₀·A₀ at the start
        ((4, 3, 3, 3), True)
    """

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        weight = base_weight(base_layer)
        if weight.device.type == "meta" or config.init in DATA_INITS:
            # a dry run (shapes only), or factors from data: set by `start_from` once computed, or loaded from a file
            lora_A, lora_B = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        else:
            rows = weight.T if self.kind == "hf_conv1d" else weight.flatten(1)  # (out, fan_in)
            lora_A, lora_B = principal_factors(rows, config.rank, self.scaling, config.init)
            k = lora_A.shape[0]  # < rank only for layers narrower than the rank: the rest start as plain LoRA
            with torch.no_grad():
                self.lora_A.weight[:k].copy_(lora_A.view(k, *self.lora_A.weight.shape[1:]))
                self.lora_B.weight[:, :k].copy_(lora_B.view(lora_B.shape[0], k, *self.lora_B.weight.shape[2:]))
        self.register_buffer("lora_A_init", self.lora_A.weight.detach().clone())
        self.register_buffer("lora_B_init", self.lora_B.weight.detach().clone())

    absorbs_scale = False  # B alone would scale B·A, not B·A − B₀·A₀

    @torch.no_grad()
    def start_from(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Start from factors ``A₀`` ``(r, fan_in)`` and ``B₀`` ``(out, r)`` computed elsewhere (CorDA, LoRA-GA:
        from data, before injection): both the trained factors and the frozen copies subtracted again, so the layer
        still computes the base.

        Raises:
            ValueError: factors of another shape than this adapter's.

        Example::

            >>> from peft_callbacks.methods.lora import LoRAConfig
            >>> lora = ResidualLoRALinear(nn.Linear(6, 5), LoRAConfig(rank=2, init="corda"))
            >>> lora.start_from(torch.randn(2, 6), torch.randn(5, 2))
            >>> torch.equal(lora.lora_B.weight, lora.lora_B_init), bool(lora.delta_weight().abs().max() < 1e-6)
            (True, True)
        """
        a_shape, b_shape = (self.r, self.lora_A.weight[0].numel()), (self.lora_B.weight.shape[0], self.r)
        if tuple(lora_A.shape) != a_shape or tuple(lora_B.shape) != b_shape:
            raise ValueError(
                f"start_from: factors of shapes A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} do not fit this "
                f"adapter (A {a_shape}, B {b_shape})."
            )
        for factor, buffer, value in ((self.lora_A, "lora_A_init", lora_A), (self.lora_B, "lora_B_init", lora_B)):
            factor.weight.copy_(value.reshape(factor.weight.shape))
            getattr(self, buffer).copy_(factor.weight)

    def _merged_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[A; A₀]`` (2r, …) and ``[B, −B₀]`` (…, 2r): one rank-2r product for ``B·A − B₀·A₀``."""
        lora_A = torch.cat([self.lora_A.weight, self.lora_A_init.to(self.lora_A.weight.dtype)], dim=0)
        lora_B = torch.cat([self.lora_B.weight, -self.lora_B_init.to(self.lora_B.weight.dtype)], dim=1)
        return lora_A, lora_B

    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([A; A₀], [B, −B₀])``: ``ΔW = s·(B·A − B₀·A₀)`` as one rank-``2r`` product."""
        a, b = self._merged_factors()
        return a.float().flatten(1), b.float().flatten(1)  # (2r, in·k…), (out, 2r)

    def low_rank_delta(self) -> torch.Tensor:
        """``s·(B·A − B₀·A₀)`` in float32, shaped like the base weight."""
        a, b = self.update_factors()
        delta = (b @ a) * self.scaling
        return delta.T if self.kind == "hf_conv1d" else delta.view(self.weight_shape)

    def _dropout_applies(self) -> bool:
        return self.training and not isinstance(self.lora_dropout, nn.Identity)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", init={self.config.init!r}"


class ResidualLoRALinear(ResidualLoRAAdapter, LoRALinear):
    """PiSSA / OLoRA on an ``nn.Linear``."""

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.to(self.lora_A.weight.dtype)
        lora_A, lora_B = self._merged_factors()
        if self._dropout_applies():  # dropout on the trained branch only: the residual sees the plain input
            h = torch.cat([self.lora_A(self.lora_dropout(x)), F.linear(x, lora_A[self.r :])], dim=-1)
        else:
            h = F.linear(x, lora_A)  # (…, in) -> (…, 2r)
        update = F.linear(h, lora_B) * self.scaling  # (…, 2r) -> (…, out)
        return result + update.to(result.dtype)


class ResidualLoRAConv1D(ResidualLoRALinear, LoRAConv1D):
    """PiSSA / OLoRA on transformers' ``Conv1D`` (the weight, stored ``(in, out)``, is decomposed as ``(out, in)``)."""


class ResidualLoRAConv(ResidualLoRAAdapter, LoRAConv):
    """PiSSA / OLoRA on ``nn.Conv1d/2d/3d`` (``groups=1``): the kernel is decomposed as ``(out, in·k…)``, ``A₀`` a
    kernel-sized convolution and ``B₀`` a 1×1 one, as LoRA's factors are."""

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.to(self.lora_A.weight.dtype)
        lora_A, lora_B = self._merged_factors()
        if self._dropout_applies():
            h = torch.cat([self.lora_A(self.lora_dropout(x)), self.lora_A._conv_forward(x, lora_A[self.r :], None)], 1)
        else:
            h = self.lora_A._conv_forward(x, lora_A, None)  # (N, 2r, …)
        update = self.lora_B._conv_forward(h, lora_B, None) * self.scaling
        return result + update.to(result.dtype)
