r"""Loss terms that keep the base task: L2-SP, EWC's diagonal Fisher and penalty, and LwF distillation.

All act on the update space of :class:`~peft_callbacks.forgetting.anchors.UpdateAnchor` (weight space ``ΔW`` for
adapted layers of every layer method, ``θ − θ₀`` for every other trained tensor):

* **L2-SP** (Li et al. 2018, "Explicit inductive bias for transfer learning", eq. 2, the ``α`` term):
  ``α/2 · Σ ‖update‖²`` pulls the fine-tuned weights back to the starting point.
* **EWC** (Kirkpatrick et al. 2017, eq. 3): ``λ/2 · Σ F ⊙ update²`` with ``F`` the diagonal Fisher of the base task
  at the starting point. :func:`diagonal_fisher` computes it as Avalanche's ``EWCPlugin`` does: the square of each
  mini-batch gradient of the base-task loss, averaged over batches (the *empirical* Fisher of mini-batches).
* **LwF** (Li & Hoiem 2017, eq. 2, with Hinton's temperature): ``T² · KL(p_old^T ‖ p_new^T)`` between the original
  model's and the current model's base-head outputs, averaged over examples.

**Normalised penalties.** ``Σ ‖update‖²`` grows with the number of penalised weights and with their size, so a
weight that is mild on a small model crushes a large one. :func:`start_square_norm` gives ``S₀ = Σ ‖θ₀‖²`` over the
same update space (the base weight ``W₀`` of each adapted layer, the starting value of every other tensor; for EWC
weighted by the Fisher, ``Σ F ⊙ θ₀²``), and the normalised penalty divides by it: ``α/2 · Σ‖update‖² / S₀`` is
``α/2`` times the squared *relative* update, the same number for the same relative change whatever the model's size
or initialisation scale. Dividing by the element count instead would still depend on the weights' scale (a wider
layer is initialised with smaller weights).

Example::

    >>> import torch
    >>> teacher = torch.tensor([[2.0, 0.0]])
    >>> round(float(distillation_loss(teacher, teacher)), 6)
    0.0
    >>> float(distillation_loss(torch.zeros(1, 2), teacher, temperature=1.0)) > 0
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from peft_callbacks.core.sharding import full_parameters
from peft_callbacks.forgetting.anchors import UpdateAnchor
from peft_callbacks.forgetting.updates import folded_weights


def l2sp_penalty(anchor: UpdateAnchor, alpha: float, scale: float = 1.0) -> torch.Tensor:
    """``alpha/2 · scale · Σ ‖update‖²`` over the anchor's update space (differentiable); ``scale`` is ``1/S₀`` for
    the normalised penalty (:func:`normalizing_scale`)."""
    return 0.5 * alpha * scale * anchor.square_norm()


def ewc_penalty(anchor: UpdateAnchor, fisher: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """``weight/2 · Σ F ⊙ update²`` over the entries of ``fisher`` (entries without a Fisher are not penalised)."""
    total = torch.zeros(())
    for name, delta in anchor.updates():
        f = fisher.get(name)
        if f is not None:
            total = total.to(delta.device) + (f.to(delta.device) * delta.pow(2)).sum()
    return 0.5 * weight * total


def start_values(anchor: UpdateAnchor) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, θ₀)`` for every entry of the update space, keyed like :meth:`UpdateAnchor.updates`: the base weight
    ``W₀`` of each adapted weight, the captured start of every other tensor. Sharded layers are gathered one at a
    time (every process must call it)."""
    for path, layer in anchor.layers.items():
        with full_parameters(layer):
            for key in layer.weight_names(layer.applied_adapters()):
                yield anchor.layer_name(path, key), layer.base_tensor(key).detach()
    live = dict(anchor.tensors())
    for name, start in anchor.start.items():
        if name in live:
            yield name, start


def start_square_norm(anchor: UpdateAnchor, fisher: dict[str, torch.Tensor] | None = None) -> float:
    """``S₀ = Σ ‖θ₀‖²`` over the update space (see module docstring), or ``Σ F ⊙ θ₀²`` over the entries of
    ``fisher`` when one is given.

    Example::

        >>> import torch.nn as nn
        >>> net = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(3.0), net.bias.fill_(1.0)
        >>> anchor = UpdateAnchor(net)
        >>> _ = anchor.capture()
        >>> start_square_norm(anchor)  # 3² + 3² + 1²
        19.0
    """
    total = 0.0
    with torch.no_grad():
        for name, start in start_values(anchor):
            square = start.float().pow(2)
            if fisher is not None:
                f = fisher.get(name)
                if f is None:
                    continue
                square = f.to(square.device) * square
            total += float(square.sum())
    return total


def normalizing_scale(anchor: UpdateAnchor, fisher: dict[str, torch.Tensor] | None = None) -> float:
    """``1/S₀`` (:func:`start_square_norm`), the factor of the normalised penalty; ``1/count`` of the penalised
    elements when every ``θ₀`` is zero, and ``1`` for an empty update space."""
    total = start_square_norm(anchor, fisher)
    if total > 0:
        return 1.0 / total
    count = sum(int(t.numel()) for _, t in start_values(anchor))
    return 1.0 / count if count else 1.0


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, summed over classes, averaged over examples (and token
    positions for ``(B, T, V)`` logits)."""
    classes = student.shape[-1]
    log_q = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)  # (N, C) student
    log_p = F.log_softmax(teacher.reshape(-1, classes).float() / temperature, dim=-1)  # (N, C) teacher
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


@contextlib.contextmanager
def _requiring_grad(tensors: list[torch.Tensor]) -> Iterator[None]:
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t in tensors:
            t.requires_grad_(False)


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def diagonal_fisher(
    anchor: UpdateAnchor,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    *,
    limit_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the base task over the anchor's update space, at the current weights.

    ``F = 1/N · Σ_b (∇ L_b)²`` with ``L_b = loss_fn(batch_b)`` (the mean base-task loss of mini-batch ``b``) and
    ``N`` the number of batches. For an adapted layer the gradient is taken in weight space: with respect to the
    merged weight ``W``, the layer run as a plain layer (:func:`~peft_callbacks.forgetting.updates.folded_weights`);
    for every other tensor of the anchor (frozen ones too, for an anchor that is not trainable-only) with respect to
    the tensor. With several processes batch ``b`` is taken by rank
    ``b % world_size`` and the sums are added over ranks, so the result equals one process. The caller sets the
    model's mode (eval: no dropout, no BatchNorm statistics update).

    Returns:
        ``{name: F}`` keyed like :meth:`UpdateAnchor.updates`, float32.

    Raises:
        ValueError: ``batches`` yields no batch.
    """
    tensors = dict(anchor.tensors())  # frozen ones too when the anchor is not trainable-only
    frozen = [t for t in tensors.values() if not t.requires_grad]
    with folded_weights(anchor.layers, requires_grad=True) as folded, _requiring_grad(frozen):
        targets = {anchor.layer_name(path, key): t for path, weights in folded.items() for key, t in weights.items()}
        targets.update(tensors)
        names, params = list(targets), list(targets.values())
        if not params:
            return {}
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        count = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
        seen = 0
        for index, batch in enumerate(batches):
            if limit_batches is not None and index >= limit_batches:
                break
            seen += 1
            if index % world_size != rank:
                continue
            loss = loss_fn(batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for total, grad in zip(sums, grads):
                if grad is not None:
                    total += grad.detach().float().pow(2)
            count += 1
    if seen == 0:
        raise ValueError("The base-task `dataloader` yielded no batches; the Fisher needs at least one.")
    _all_reduce([*sums, count])
    return {name: total / count.clamp(min=1).to(total.dtype) for name, total in zip(names, sums)}
