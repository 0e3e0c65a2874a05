r"""The LoRA layer as one autograd node: ``y = x·W₀ᵀ + b + s·(x·Aᵀ)·Bᵀ`` forward, and its backward written by hand.

The plain path builds five autograd nodes per adapted layer (the base linear, ``A``, the scaled ``B`` product, two
reshapes) and launches a kernel for each step of each. Here one node does the forward in three GEMMs (the scale is
folded into the last one, which adds the update onto the base output in place) and the backward in at
most five, and keeps only what the backward needs: the input ``x`` (for ``A``'s gradient, and ``W₀``'s if it trains)
and the ``(N, r)`` activation ``x·Aᵀ`` (for ``B``'s gradient); the weights are referenced, never copied::

    forward     h = x̃·Aᵀ                  (N, r)        y = b + x·W₀ᵀ + s·h·Bᵀ          (N, out)
    backward    u = (Bᵀ·gᵀ)ᵀ              (N, r)        ∂x = g·W₀ + s·u·A               (N, in)
                ∂A = s·uᵀ·x̃               (r, in)       ∂B = s·(hᵀ·g)ᵀ                   (out, r)

``x̃`` is ``x``, or with LoRA dropout while training the dropped input: then ``s·u·A`` is returned as the gradient of
``x̃`` and flows back through the dropout outside the node. The rank-r products are computed with r output rows and
read transposed, which CPU BLAS runs 2–3× faster than the same products with r output columns. It is used for an
``nn.Linear`` or transformers ``Conv1D`` base with one active LoRA adapter, one dtype throughout, outside autocast and
``torch.compile`` (which fuses the plain path itself); everything else takes the plain path.
Outputs and gradients equal the plain path's (tested at 1e-6 in float32). The output is a tensor of its own, not a
view made inside the node, so models may change it in place as they change an ``nn.Linear``'s (longformer's
``query /= √d``, swinv2's ``ReLU(inplace=True)``, naflexvit's ``x.add_``).

Example::

    >>> import torch
    >>> x = torch.randn(4, 8, requires_grad=True)
    >>> w, a, b = torch.randn(6, 8), torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    >>> y = lora_linear(x, w, None, a, b, 0.5, transposed=False)
    >>> torch.allclose(y, x @ w.T + 0.5 * (x @ a.T) @ b.T, atol=1e-5)
    True
    >>> y.relu_().sum().backward()  # changed in place, as after an nn.Linear
    >>> a.grad.shape
    torch.Size([2, 8])
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LoRALinearFunction", "lora_linear"]


class LoRALinearFunction(torch.autograd.Function):
    """``x·W₀ᵀ + b + s·(x̃·Aᵀ)·Bᵀ`` with a hand-written backward (see the module docstring); ``x̃`` is ``x_lora`` (the
    input after LoRA's dropout) when given, else ``x``."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, lora_a, lora_b, scaling: float, transposed: bool, x_lora=None):  # type: ignore[override]
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, in)
        lora_flat = flat if x_lora is None else x_lora.reshape(-1, shape[-1])
        h = lora_flat @ lora_a.t()  # (N, in) @ (in, r) -> (N, r)
        base = weight if transposed else weight.t()  # (in, out)
        # the output is allocated in its final shape (…, out) and written through a flat view: what is returned is
        # not a view, so the model may change it in place (`q /= √d`, `ReLU(inplace=True)`), as an nn.Linear's
        out = x.new_empty((*shape[:-1], base.shape[1]))
        rows = out.view(flat.shape[0], base.shape[1])  # (N, out)
        if bias is not None:
            torch.addmm(bias, flat, base, out=rows)
        else:
            torch.mm(flat, base, out=rows)
        rows.addmm_(h, lora_b.t(), alpha=scaling)  # += s · (N, r) @ (r, out), scaled inside the GEMM
        ctx.save_for_backward(
            flat if ctx.needs_input_grad[1] else None,  # for W₀'s gradient, when it trains
            lora_flat if ctx.needs_input_grad[3] else None,  # for A's
            h,
            weight,
            lora_a,
            lora_b,
        )
        ctx.scaling, ctx.transposed, ctx.shape = scaling, transposed, shape
        ctx.has_bias, ctx.separate = bias is not None, x_lora is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out):  # type: ignore[override]
        flat, lora_flat, h, weight, lora_a, lora_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        separate = ctx.separate
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        # the rank-r products are taken as (r, ·) results and read transposed: a GEMM with r output columns runs
        # 2-3x slower on CPU BLAS than the same product with r output rows (benchmarks/RESULTS.md)
        wants_u = needs[3] or (needs[7] if separate else needs[0])
        u = (lora_b.t() @ g.t()).t() if wants_u else None  # (r, out) @ (out, N) -> (N, r)
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_x_lora = None
        if needs[0]:
            grad_x = g @ (weight.t() if ctx.transposed else weight)  # (N, out) @ (out, in) -> (N, in)
            if not separate:
                grad_x.addmm_(u, lora_a, alpha=ctx.scaling)
            grad_x = grad_x.view(ctx.shape)
        if separate and needs[7]:
            grad_x_lora = (u @ lora_a).mul_(ctx.scaling).view(ctx.shape)  # through LoRA's dropout, outside this node
        if needs[1]:
            grad_w = g.t() @ flat if not ctx.transposed else flat.t() @ g
        if needs[2] and ctx.has_bias:
            grad_bias = g.sum(0)
        if needs[3]:
            grad_a = (u.t() @ lora_flat).mul_(ctx.scaling)  # (r, N) @ (N, in)
        if needs[4]:
            grad_b = (h.t() @ g).t().mul_(ctx.scaling)  # ((r, N) @ (N, out))ᵀ -> (out, r)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, grad_x_lora


def lora_linear(
    x, weight, bias, lora_a, lora_b, scaling: float, transposed: bool, x_lora: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply :class:`LoRALinearFunction`; ``transposed`` for a ``(in, out)`` weight (transformers ``Conv1D``);
    ``x_lora``: the LoRA branch's input when it differs from ``x`` (after dropout)."""
    return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, transposed, x_lora)
