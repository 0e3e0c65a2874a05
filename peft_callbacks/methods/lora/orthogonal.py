r"""Orthogonal initialisation of LoRA's factors (HF PEFT's ``init_lora_weights="orthogonal"``).

One random ``r × r`` orthogonal matrix ``Q`` is split by rows: rows 0, 2, … seed ``A``, rows 1, 3, … seed ``B``
(https://datta0.github.io/posts/rethink-lora-init/#orthogonal-initialisation)::

    Q = qr(randn(r, r)).Q
    A = (randn(in, r/2) @ Q[0::2])ᵀ / 10          (r, in)    = Q[0::2]ᵀ·R_A
    B =  randn(r/2, out)ᵀ @ Q[1::2]  / 10          (out, r)   = R_B·Q[1::2]

so the columns of ``A`` lie in the span of ``Q``'s even-indexed rows and the rows of ``B`` in that of its odd-indexed
rows: complementary halves of the rank space. Both factors are non-zero (unlike the default's ``B = 0``, both get a
gradient from the first step), yet ``B·A = R_B·Q[1::2]·Q[0::2]ᵀ·R_A = 0`` because ``Q``'s rows are orthonormal: the
adapted model starts equal to the base (up to rounding), and the base weight is left untouched, as in PEFT.
The rank must be even. The draws are made in this order from the global CPU generator, right after the two factor
layers are built, as PEFT does, so the same seed gives PEFT's factors.

Example::

    >>> torch.manual_seed(0) and None
    >>> lora_A, lora_B = orthogonal_factors(16, 32, 4)
    >>> tuple(lora_A.shape), tuple(lora_B.shape)
    ((4, 16), (32, 4))
    >>> bool((lora_B @ lora_A).abs().max() < 1e-6)  # both non-zero, their product zero
    True
"""

from __future__ import annotations

import torch

__all__ = ["orthogonal_factors"]


def orthogonal_factors(fan_in: int, out: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in float32 by PEFT's orthogonal initialisation (module docstring), drawn from the global generator.

    Args:
        fan_in: the columns of ``A`` (``in_features``, or ``in_channels·k…`` for a convolution).
        out: the rows of ``B``.
        rank: ``r``, even.

    Raises:
        ValueError: an odd ``rank``.
    """
    if rank % 2:
        raise ValueError(f"`rank` must be even for init='orthogonal' (Q is split into two halves), got {rank}.")
    q, _ = torch.linalg.qr(torch.randn(rank, rank))  # (r, r)
    lora_A = torch.randn(fan_in, rank // 2).mm(q[0::2]).T / 10.0  # (in, r/2) @ (r/2, r) -> (r, in)
    lora_B = torch.randn(rank // 2, out).T.mm(q[1::2]) / 10.0  # (out, r/2) @ (r/2, r) -> (out, r)
    return lora_A.contiguous(), lora_B.contiguous()
