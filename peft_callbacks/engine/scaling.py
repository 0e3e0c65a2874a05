r"""The scale of an update: one knob every module this library inserts answers to (HF PEFT's ``set_scale`` and
``rescale_adapter_scale``).

Every :class:`~peft_callbacks.engine.layers.Adapter` (LoRA, DoRA, IA3, LoHa, LoKr, OFT, VeRA, AdaLoRA, LoRA on
expert parameters) and every bottleneck adapter has a settable :attr:`Scalable.scale`, ``1`` by default, applied in
the forward pass and in a merge::

    scale = 0   the module changes nothing: it is skipped, so the model computes what the base model does, exactly
    scale = 1   the trained update, exactly (the default; the same computation as without a scale)
    scale = s   the update scaled by s; each method's docstring says what that means for it. For most of them the
                layer's weight is W₀ + s·ΔW (LoRA, LoHa, LoKr, VeRA, AdaLoRA: a factor the update is linear in;
                IA3: the vector 1 + s·(l − 1); DoRA: the effective weight interpolated, W₀ + s·(W' − W₀));
                OFT scales the generator of its rotation, R(s) = Cayley(s·Q), which stays orthogonal.

Soft and visual prompts add tokens instead of changing an output: no scale of them gives the base model back, so
setting one refuses with a sentence that says so (:class:`FixedScale`).

A scale is a run-time setting, as in HF PEFT: it is not saved with the adapter. :meth:`Scalable.absorb_scale` writes
it into the module's own tensors, where the method can do that exactly (LoRA scales ``B``), so that an adapter file
or a merge afterwards holds the scaled update.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine import inject
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> net = inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LoRAConfig(rank=2))
    >>> _ = nn.init.ones_(net[0].adapters["default"].lora_B.weight)
    >>> x = torch.randn(3, 4)
    >>> with scaled(net, 0.0):
    ...     torch.equal(net(x), net[1](net[0].base_layer(x)))
    True
    >>> net[0].adapters["default"].scale  # put back on leaving the block
    1.0
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn as nn

from peft_callbacks._validation import check_module

__all__ = ["FixedScale", "Scalable", "check_scale", "scalable_modules", "scaled"]


def check_scale(value: Any, name: str = "scale") -> float:
    """Return ``value`` as a float if it is a finite real number (``0`` removes the update, ``1`` keeps it).

    Example::

        >>> check_scale(1), check_scale(-0.5)
        (1.0, -0.5)
        >>> check_scale(float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: `scale` must be a finite number (0: the base model, 1: the trained update), got nan.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number (0: the base model, 1: the trained update), got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number (0: the base model, 1: the trained update), got {value!r}.")
    return float(value)


class Scalable:
    """Mixin for an inserted module whose update has a :attr:`scale` (see the module docstring).

    Subclasses read ``self.scale`` where they apply their update (in ``forward`` and in their merge); those whose
    update is linear in one of their own tensors set ``absorbs_scale = True`` and implement :meth:`store_scale`.

    Attributes:
        scalable: the update can be scaled; ``False`` (prompts): setting a scale other than 1 is refused with
            :attr:`scale_refusal`.
        absorbs_scale: :meth:`absorb_scale` can write the scale into the module's own tensors, exactly.
        linear_scale: scale ``s`` makes the layer's weight exactly ``W₀ + s·ΔW`` (in exact arithmetic), so the size
            of the update is ``|s|`` times its size at ``1``; OFT, which scales its rotation's generator, is not.
    """

    scalable: ClassVar[bool] = True
    absorbs_scale: ClassVar[bool] = False
    linear_scale: ClassVar[bool] = True
    scale_refusal: ClassVar[str] = ""

    @property
    def scale(self) -> float:
        """The multiplier of this module's update (``1``: as trained; ``0``: no update). Not saved."""
        return self.__dict__.get("_scale", 1.0)

    @scale.setter
    def scale(self, value: float) -> None:
        value = check_scale(value)
        if not self.scalable and value != 1.0:
            raise ValueError(
                f"{type(self).__name__} cannot scale its update: {self.scale_refusal} Got scale={value!r}."
            )
        self.__dict__["_scale"] = value

    def times_scale(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor · scale``; ``tensor`` itself at scale 1, so the default computation is unchanged to the bit."""
        return tensor if self.scale == 1.0 else tensor * self.scale

    def store_scale(self, scale: float) -> None:
        """Write ``scale`` into this module's own tensors (in place, no gradient), so that at scale 1 it computes
        what it computed at ``scale``; only for ``absorbs_scale`` classes."""
        raise NotImplementedError(f"{type(self).__name__} cannot hold a scale in its own tensors.")

    def absorb_scale(self) -> None:
        """Make the current scale permanent: write it into the module's tensors and set the scale back to 1.

        Raises:
            ValueError: the method's update cannot hold a scale in its own tensors (DoRA, PiSSA/OLoRA): merge it at
                that scale instead (a merge applies the scale).
        """
        if self.scale == 1.0:
            return
        if not self.absorbs_scale:
            raise ValueError(
                f"{type(self).__name__} cannot hold scale={self.scale:g} in its own tensors (its update is not "
                f"linear in one of them); merge it at this scale instead: merging applies the scale."
            )
        with torch.no_grad():
            self.store_scale(self.scale)
        self.scale = 1.0


class FixedScale(Scalable):
    """Mixin for inserted modules whose update has no scale (prompts): ``scale`` reads 1 and any other is refused."""

    scalable = False
    scale_refusal = (
        "prompts add tokens to the input, so no scale of them gives the base model back (run the model without them "
        "inside `disabled(model)`)."
    )


def scalable_modules(model: nn.Module) -> dict[str, Scalable]:
    """``{path: module}`` of every inserted module of ``model`` that has a :attr:`~Scalable.scale` (prompts too)."""
    return {path: m for path, m in check_module("model", model).named_modules() if isinstance(m, Scalable)}


@contextlib.contextmanager
def scaled(model: nn.Module, scale: float) -> Iterator[nn.Module]:
    """Multiply the update of every adapter in ``model`` by ``scale`` inside the ``with`` block (on top of any
    scale set before), and put the scales back afterwards, also on an exception.

    ``scale=0`` runs the base model, ``1`` the trained one. Merging inside the block merges at that scale.

    Raises:
        ValueError: ``scale`` is not a finite number, or ``model`` holds prompts (they cannot be scaled) and
            ``scale`` is not 1.
    """
    scale = check_scale(scale)
    modules = scalable_modules(model)
    fixed = sorted({type(m).__name__ for m in modules.values() if not m.scalable})
    if fixed and scale != 1.0:
        raise ValueError(
            f"`scale`={scale:g} cannot apply to {type(model).__name__}: it holds {', '.join(fixed)}, whose update "
            f"cannot be scaled: {next(m for m in modules.values() if not m.scalable).scale_refusal}"
        )
    previous = [(m, m.scale) for m in modules.values() if m.scalable]
    try:
        for module, old in previous:
            module.scale = old * scale
        yield model
    finally:
        for module, old in previous:
            module.scale = old
