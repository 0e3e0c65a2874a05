r"""Scale a fine-tune's update by ``s`` and pick the ``s`` that learns most within a forgetting budget.

``θ(s) = θ₀ + s·(θ₁ − θ₀)``: ``s = 0`` is the model before fine-tuning, ``s = 1`` the trained one. For adapted layers
of every method this is the adapters' own :attr:`~peft_callbacks.engine.scaling.Scalable.scale` (HF PEFT's
``rescale_adapter_scale`` is the same knob): ``W₀ + s·ΔW`` for most (exactly ``s·B·A`` added for LoRA; DoRA's
effective weight interpolated; IA3's vector ``1 + s·(l − 1)``), OFT's rotation generator times ``s``; for bottleneck
adapters the adapter's output times ``s``; and for every other trained tensor (full fine-tuning) the weight-space
interpolation of WiSE-FT (Wortsman et al. 2022, eq. 1), BatchNorm statistics included.

:func:`choose_scale` takes the curve ``(s, new-task score, forgetting)`` and returns the ``s`` with the best
new-task score among those that forget at most the budget (ties: less forgetting, then larger ``s``). ``s = 0``
forgets nothing by definition, so some ``s`` always qualifies.

Example::

    >>> curve = [{"s": 0.0, "new_task": 0.2, "forgetting": 0.0}, {"s": 0.5, "new_task": 0.8, "forgetting": 0.05},
    ...          {"s": 1.0, "new_task": 0.9, "forgetting": 0.3}]
    >>> choose_scale(curve, max_forgetting=0.1)["s"]
    0.5
    >>> check_grid([0, 0.5, 1])
    [0.0, 0.5, 1.0]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks.forgetting.anchors import UpdateAnchor
from peft_callbacks.forgetting.updates import commit_scaled_update, layer_adapters, output_adapters, scaled_updates


def check_grid(grid: Any) -> list[float]:
    """Return ``grid`` as a sorted list of distinct floats in ``[0, 1]`` that holds both ``0`` and ``1``.

    Raises:
        TypeError: ``grid`` is not a list of numbers.
        ValueError: a value outside ``[0, 1]`` or not finite, or ``0`` or ``1`` missing.
    """
    if isinstance(grid, (str, bytes, torch.Tensor)) or not isinstance(grid, Sequence):
        raise TypeError(f"`grid` must be a list of numbers in [0, 1] holding 0 and 1, got {type(grid).__name__}.")
    values = []
    for value in grid:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`grid` entries must be numbers, got {type(value).__name__} {value!r} in {list(grid)}.")
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"`grid` entries must lie in [0, 1], got {value!r} in {list(grid)}.")
        values.append(float(value))
    missing = [end for end in (0.0, 1.0) if end not in values]
    if missing:
        raise ValueError(
            f"`grid` must hold 0 (the model before fine-tuning, the forgetting baseline) and 1 (the trained model); "
            f"{' and '.join(f'{m:g}' for m in missing)} missing from {list(grid)}."
        )
    return sorted(set(values))


def choose_scale(curve: list[dict[str, Any]], max_forgetting: float) -> dict[str, Any]:
    """The point of ``curve`` with the best ``new_task`` among those with ``forgetting <= max_forgetting``.

    Ties go to less forgetting, then to the larger ``s``. Points whose ``new_task`` is ``None`` rank last.
    """
    allowed = [p for p in curve if p["forgetting"] is not None and p["forgetting"] <= max_forgetting + 1e-12]
    if not allowed:
        allowed = [min(curve, key=lambda p: p["s"])]
    return max(
        allowed,
        key=lambda p: (-math.inf if p["new_task"] is None else p["new_task"], -(p["forgetting"] or 0.0), p["s"]),
    )


class UpdateScaler:
    """Set a model's update to ``s`` times its trained value, and put it back (see module docstring).

    Built at the end of training, from the anchor whose ``θ₀`` was captured at the start.

    Args:
        anchor: the update space of the model (adapted layers, ``θ₀`` of other trained tensors, with buffers).
        adapters: scale the output of output adapters (bottleneck adapters) inside the anchor's scope (their
            parameters are then left out of the interpolated tensors).
    """

    def __init__(self, anchor: UpdateAnchor, adapters: bool = True) -> None:
        self.anchor = anchor
        found = output_adapters(anchor.root) if adapters else {}
        self.adapters = {p: a for p, a in found.items() if anchor.in_scope(p)}
        inside = {id(t) for a in self.adapters.values() for t in a.parameters()}  # adapters scale as a whole
        live = dict(anchor.tensors())
        self._tensors = {
            name: (live[name], start, live[name].detach().clone())  # (tensor, θ₀, θ₁)
            for name, start in anchor.start.items()
            if name in live and id(live[name]) not in inside
        }

    @property
    def tensor_names(self) -> list[str]:
        """Names of the interpolated tensors (outside adapted layers and output adapters)."""
        return list(self._tensors)

    def _set_tensors(self, s: float) -> None:
        with torch.no_grad():
            for tensor, start, end in self._tensors.values():
                start = start.to(end.device)
                tensor.copy_((start.float() + s * (end.float() - start.float())).to(tensor.dtype))

    @contextlib.contextmanager
    def scaled(self, s: float) -> Iterator[None]:
        """The model computes ``θ(s)`` inside the ``with`` block, and ``θ₁`` again afterwards."""
        modules = [*layer_adapters(self.anchor.layers), *self.adapters.values()]
        try:
            self._set_tensors(s)
            with scaled_updates(modules, s):
                yield
        finally:
            self._set_tensors(1.0)

    def commit(self, model: nn.Module, s: float) -> list[str]:
        """Leave the model at ``θ(s)``: tensors interpolated, the scale written into the adapters that can hold it
        (LoRA's ``B``, the adapters' up-projections), the layers of the others merged at ``s`` (returned paths,
        relative to ``anchor.root``).

        ``model`` must be ``anchor.root``.
        """
        self._set_tensors(s)
        return commit_scaled_update(model, self.anchor.layers, s, outputs=self.adapters.values())
