r"""LoRA-Pro: gradients of ``A`` and ``B`` whose low-rank update best matches the full fine-tuning gradient.

Wang et al. 2024, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?". With ``W = W₀ + s·B·A`` (``B``: out × r,
``A``: r × in) and ``g = ∂L/∂W``, back-propagation gives ``g_A = s·Bᵀg`` and ``g_B = s·g·Aᵀ``. One SGD step on
``(A, B)`` moves ``W`` (to first order) along the *equivalent gradient* ``g̃ = s·(B·ĝ_A + ĝ_B·A)``. Plain LoRA uses
``ĝ = g``, which gives ``g̃ = s²(BBᵀg + gAᵀA)``: not the best low-rank approximation of ``g``. LoRA-Pro chooses
(Theorem 2.1)::

    ĝ_A = (1/s²)(BᵀB)⁻¹ g_A + X·A
    ĝ_B = (1/s²)[I − B(BᵀB)⁻¹Bᵀ] g_B (AAᵀ)⁻¹ − B·X

so that ``g̃ = P_B·g + (I − P_B)·g·P_A`` is the least-squares projection of ``g`` onto the update directions
``{B·Y + Z·A}`` (``P_B``, ``P_A``: orthogonal projectors onto B's columns and A's rows). Any ``X`` (r × r) gives
the same ``g̃``; the paper (Theorem 2.2) takes the one closest to the plain gradients, the solution of the
Sylvester equation ``BᵀB·X + X·AAᵀ = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ``. The inverses are pseudo-inverses (eigenvalues
below ``rcond · largest`` count as zero), so ``B = 0`` at initialisation is handled: then ``ĝ_A = 0`` and ``ĝ_B``
reaches ``g·P_A``. The small r × r algebra uses symmetric eigendecompositions, in float64.

Only the gradients change, so this works with any optimizer; with SGD the step follows ``g̃`` exactly. With Adam
the optimizer's per-coordinate scaling is applied to ``ĝ`` (the paper's full-Adam variant, which keeps the moment
estimates in the full weight space, is :class:`LoRAProAdamW`).

Example::

    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> A, B, g = torch.randn(2, 6), torch.randn(5, 2), torch.randn(5, 6)
    >>> s = 2.0
    >>> grad_A, grad_B = s * B.T @ g, s * g @ A.T  # what backward gives LoRA's factors
    >>> new_A, new_B = lora_pro_gradients(A, B, grad_A, grad_B, s)
    >>> pro = equivalent_gradient(A, B, new_A, new_B, s)
    >>> plain = equivalent_gradient(A, B, grad_A, grad_B, s)
    >>> bool((g - pro).norm() < (g - plain).norm())
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from peft_callbacks._validation import check_float, check_module, check_positive_float
from peft_callbacks.methods.lora.dora import DoRAAdapter
from peft_callbacks.methods.lora.method import lora_adapters

__all__ = ["LoRAProAdamW", "apply_lora_pro", "equivalent_gradient", "lora_pro_gradients", "solve_sylvester"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64  # mps has no float64


def _eigh_psd(m: torch.Tensor, rcond: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped ≥ 0), eigenvectors and pseudo-inverse eigenvalues of a symmetric PSD matrix."""
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    values = values.clamp_min(0)
    keep = values > rcond * values.max().clamp_min(torch.finfo(values.dtype).tiny)
    inverse = torch.where(keep, 1 / torch.where(keep, values, torch.ones_like(values)), torch.zeros_like(values))
    return values, vectors, inverse


def solve_sylvester(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor, rcond: float = 1e-10) -> torch.Tensor:
    """Solve ``P·X + X·Q = C`` for symmetric positive semi-definite ``P`` (k × k) and ``Q`` (l × l).

    With ``P = U·diag(λ)·Uᵀ`` and ``Q = V·diag(μ)·Vᵀ`` the equation decouples: ``X = U·Y·Vᵀ`` with
    ``Y_ij = (UᵀCV)_ij / (λ_i + μ_j)``. Where ``λ_i + μ_j`` is (numerically) zero the equation has no unique
    solution and ``Y_ij = 0`` is taken (the minimum-norm least-squares solution).

    Args:
        p: ``(k, k)`` symmetric PSD matrix.
        q: ``(l, l)`` symmetric PSD matrix.
        c: ``(k, l)`` right-hand side.
        rcond: ``λ_i + μ_j`` below ``rcond`` times the largest eigenvalue counts as zero.

    Returns:
        ``X`` of shape ``(k, l)``, in ``c``'s dtype.

    Example::

        >>> import torch
        >>> p, q, c = torch.eye(2) * 2, torch.eye(3), torch.ones(2, 3)
        >>> solve_sylvester(p, q, c)  # (2 + 1)·X = C
        tensor([[0.3333, 0.3333, 0.3333],
                [0.3333, 0.3333, 0.3333]])
    """
    dtype = _compute_dtype(c)
    lam, u, _ = _eigh_psd(p.to(dtype), rcond)
    mu, v, _ = _eigh_psd(q.to(dtype), rcond)
    denom = lam[:, None] + mu[None, :]  # (k, l)
    ok = denom > rcond * denom.max().clamp_min(torch.finfo(dtype).tiny)
    y = torch.where(ok, (u.T @ c.to(dtype) @ v) / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
    return (u @ y @ v.T).to(c.dtype)


def lora_pro_gradients(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    grad_A: torch.Tensor,
    grad_B: torch.Tensor,
    scaling: float,
    rcond: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's gradients ``(ĝ_A, ĝ_B)`` (Wang et al. 2024, Theorems 2.1 and 2.2).

    Args:
        lora_A: ``A``, shape ``(r, in)``.
        lora_B: ``B``, shape ``(out, r)``.
        grad_A: the back-propagated gradient of ``A``, ``(r, in)``.
        grad_B: the back-propagated gradient of ``B``, ``(out, r)``.
        scaling: ``s`` in ``W = W₀ + s·B·A``.
        rcond: relative threshold under which eigenvalues of ``BᵀB`` and ``AAᵀ`` count as zero (pseudo-inverse).

    Returns:
        ``(ĝ_A, ĝ_B)`` in the dtypes of ``grad_A`` and ``grad_B``.
    """
    dtype = _compute_dtype(grad_A)
    a, b, g_a, g_b = (t.detach().to(dtype) for t in (lora_A, lora_B, grad_A, grad_B))
    s2 = float(scaling) ** 2
    btb, aat = b.T @ b, a @ a.T  # (r, r), (r, r)
    lam, u, lam_inv = _eigh_psd(btb, rcond)
    _, v, mu_inv = _eigh_psd(aat, rcond)
    btb_pinv = u @ torch.diag(lam_inv) @ u.T
    aat_pinv = v @ torch.diag(mu_inv) @ v.T
    new_a = btb_pinv @ g_a / s2  # (r, in)
    x = solve_sylvester(btb, aat, -(new_a @ a.T), rcond)  # (r, r)
    residual_b = g_b - b @ (btb_pinv @ (b.T @ g_b))  # [I − B(BᵀB)⁺Bᵀ] g_B, (out, r)
    new_b = residual_b @ aat_pinv / s2 - b @ x  # (out, r)
    new_a = new_a + x @ a
    return new_a.to(grad_A.dtype), new_b.to(grad_B.dtype)


def equivalent_gradient(
    lora_A: torch.Tensor, lora_B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``s·(B·g_A + g_B·A)``: the first-order change of ``s·B·A`` per unit SGD step along ``(g_A, g_B)``.

    Example::

        >>> import torch
        >>> equivalent_gradient(torch.ones(1, 2), torch.ones(3, 1), torch.zeros(1, 2), torch.ones(3, 1), 2.0)
        tensor([[2., 2.],
                [2., 2.],
                [2., 2.]])
    """
    return scaling * (lora_B @ grad_A + grad_B @ lora_A)


def apply_lora_pro(model: nn.Module, params: list[torch.Tensor] | None = None, rcond: float = 1e-10) -> int:
    """Replace the ``.grad`` of every LoRA ``A``/``B`` pair in ``model`` by LoRA-Pro's gradients (in place).

    Call it after ``backward`` and before ``optimizer.step()`` (``LoRACallback(lora_pro=True)`` does so in
    ``on_before_optimizer_step``). Convolution factors are flattened to ``(r, in·k…)`` and ``(out, r)``. Layers whose
    ``A`` or ``B`` has no gradient (frozen, or unused this step) are left alone.

    Args:
        model: a model with LoRA layers.
        params: only treat layers whose ``A`` and ``B`` are among these tensors (e.g. one optimizer's parameters).
        rcond: see :func:`lora_pro_gradients`.

    Returns:
        How many layers got new gradients.

    Raises:
        TypeError: ``model`` holds DoRA layers (LoRA-Pro's closed form is for ``W₀ + s·B·A``).

    Example::

        >>> import torch, torch.nn as nn
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)), rank=2)
        >>> net(torch.randn(4, 8)).sum().backward()
        >>> apply_lora_pro(net)
        1
    """
    check_module("model", model)
    check_positive_float("rcond", rcond)
    if params is not None and (
        not isinstance(params, (list, tuple)) or not all(isinstance(p, torch.Tensor) for p in params)
    ):
        raise TypeError(f"`params` must be None or a list of tensors, got {type(params).__name__} {params!r}.")
    if params is not None and not params:
        raise ValueError("`params` is an empty list: pass None to treat every LoRA layer, or the tensors to treat.")
    wanted = None if params is None else {id(p) for p in params}
    done = 0
    for path, layer in lora_adapters(model).items():
        if isinstance(layer, DoRAAdapter):
            raise TypeError(
                f"LoRA-Pro does not apply to DoRA layers (found {type(layer).__name__} at {path!r}); its closed form "
                f"is for W0 + s*B*A. Use plain LoRA layers (use_dora=False) with LoRA-Pro."
            )
        a, b = layer.lora_A.weight, layer.lora_B.weight
        if a.grad is None or b.grad is None:
            continue
        if wanted is not None and (id(a) not in wanted or id(b) not in wanted):
            continue
        new_a, new_b = lora_pro_gradients(
            a.flatten(1), b.flatten(1), a.grad.flatten(1), b.grad.flatten(1), layer.scaling, rcond
        )
        a.grad.copy_(new_a.view_as(a.grad))
        b.grad.copy_(new_b.view_as(b.grad))
        done += 1
    return done


class LoRAProAdamW(torch.optim.Optimizer):
    """The paper's full-Adam LoRA-Pro (Wang et al. 2024, Algorithm 1): Adam moments kept in the full weight space.

    Per LoRA layer, the equivalent gradient ``g̃`` (out × in) feeds AdamW's moment estimates, as if the merged weight
    were trained in full; the Adam direction ``d = m̂ / (√v̂ + ε)`` is then mapped back onto ``A`` and ``B`` with
    :func:`lora_pro_gradients` (``g_A = s·Bᵀd``, ``g_B = s·d·Aᵀ``) and applied with step ``lr``. Decoupled weight decay
    shrinks ``A`` and ``B`` by ``√(1 − lr·wd)`` each, so ``s·B·A`` decays like a fully fine-tuned delta. Every other
    trainable parameter (the head, biases) gets plain AdamW. Memory: two ``out × in`` tensors per LoRA layer, as in
    the paper; use ``LoRACallback(lora_pro=True)`` (gradients only) with your own optimizer to avoid it.

    Args:
        model: a model with (non-DoRA) LoRA layers; all its trainable parameters are optimized.
        lr: learning rate (> 0).
        betas: Adam's moment decay rates.
        eps: Adam's ε.
        weight_decay: decoupled weight decay.
        rcond: see :func:`lora_pro_gradients`.

    Example::

        >>> import torch, torch.nn as nn
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)), rank=2)
        >>> optimizer = LoRAProAdamW(net, lr=1e-2)
        >>> net(torch.randn(4, 8)).pow(2).sum().backward()
        >>> optimizer.step()
        >>> lora_A = net[0].adapters["default"].lora_A.weight
        >>> optimizer.state[lora_A]["exp_avg"].shape  # full-space moments of the (8, 8) weight
        torch.Size([8, 8])
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rcond: float = 1e-10,
    ) -> None:
        check_module("model", model)
        check_positive_float("lr", lr)
        check_positive_float("rcond", rcond)
        check_positive_float("eps", eps)
        check_float("weight_decay", weight_decay, low=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"`betas` must be a pair of floats in [0, 1), got {type(betas).__name__} {betas!r}.")
        for beta in betas:
            check_float("betas", beta, low=0.0, high=1.0, high_inclusive=False)
        self._pairs: dict[int, tuple[nn.Parameter, nn.Parameter, float]] = {}
        for path, layer in lora_adapters(model).items():
            if isinstance(layer, DoRAAdapter):
                raise TypeError(f"LoRAProAdamW does not support DoRA layers (found one at {path!r}).")
            a, b = layer.lora_A.weight, layer.lora_B.weight
            if a.requires_grad and b.requires_grad:
                self._pairs[id(a)] = (a, b, layer.scaling)
        self._b_ids = {id(b) for _, b, _ in self._pairs.values()}
        self._rcond = rcond
        params = [p for p in model.parameters() if p.requires_grad]
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _adam_direction(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
        return m_hat / (v_hat.sqrt() + group["eps"])

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if id(p) in self._b_ids or p.grad is None:
                    continue
                if id(p) not in self._pairs:
                    p.mul_(1 - lr * wd)
                    p.sub_(lr * self._adam_direction(self.state[p], p.grad, group))
                    continue
                a, b, s = self._pairs[id(p)]
                if b.grad is None:
                    continue
                a2, b2 = a.flatten(1), b.flatten(1)  # (r, in·k…), (out, r)
                pro_a, pro_b = lora_pro_gradients(a2, b2, a.grad.flatten(1), b.grad.flatten(1), s, self._rcond)
                direction = self._adam_direction(self.state[a], equivalent_gradient(a2, b2, pro_a, pro_b, s), group)
                new_a, new_b = lora_pro_gradients(a2, b2, s * b2.T @ direction, s * direction @ a2.T, s, self._rcond)
                shrink = math.sqrt(1 - lr * wd)
                a.mul_(shrink).sub_(lr * new_a.view_as(a))
                b.mul_(shrink).sub_(lr * new_b.view_as(b))
        return loss
