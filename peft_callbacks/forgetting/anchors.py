r"""The starting point of a fine-tune, and the update made since: what L2-SP, EWC and the finish act on.

:class:`UpdateAnchor` describes the *update space* of a model:

* every adapted layer (any layer method: LoRA, DoRA, IA3, LoHa, LoKr, OFT, VeRA, AdaLoRA, LoRA on expert parameters)
  contributes its weight-space update ``ΔW`` (one entry per adapted weight, named ``<layer path>.weight``, or
  ``<layer path>.<parameter>`` for parameter adapters: the name the merged tensor will have), read through
  :func:`~peft_callbacks.forgetting.updates.weight_updates`. Its starting weight ``W₀`` is the frozen base weight, so
  nothing is copied;
* every other tensor that trains (full fine-tuning, unfrozen layers, adapters, prompts, norms) contributes
  ``θ − θ₀``, with ``θ₀`` copied the first time the tensor is seen trainable (:meth:`UpdateAnchor.capture`; call it
  again after a schedule unfreezes more: tensors unfrozen later are copied before their first step).

Excluded are the *new* task head (``exclude`` paths, when the base task is scored through the original head, the
current head serves the new task only) and the parameters inside mergeable layers (their update is in weight space).

Example::

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    >>> anchor = UpdateAnchor(net, exclude=["1"])
    >>> anchor.capture()
    ['0.weight', '0.bias']
    >>> with torch.no_grad():
    ...     _ = net[0].bias.add_(1.0)
    >>> {name: float(delta.detach().abs().sum()) for name, delta in anchor.updates()}
    {'0.weight': 0.0, '0.bias': 3.0}
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from peft_callbacks.core.targets import in_subtree
from peft_callbacks.forgetting.updates import disabled_layers, mergeable_layers, update_square_norm, weight_updates


class UpdateAnchor:
    """``θ₀`` of the tensors a fine-tune can change in ``root``, and their update ``θ − θ₀`` (see module docstring).

    Args:
        root: the module whose update is measured (a LightningModule or a model); names are relative to it.
        exclude: module paths inside ``root`` left out (the new task head).
        include: module paths inside ``root`` that hold the update (the found models); ``None``: all of ``root``.
        trainable_only: only tensors that require grad count (``False``: every floating-point parameter in scope,
            e.g. for a Fisher that must cover layers a schedule unfreezes later).
        buffers: also keep ``θ₀`` of floating-point buffers outside mergeable layers (BatchNorm statistics), for
            interpolating whole models (:mod:`peft_callbacks.forgetting.scaling`).
    """

    def __init__(
        self,
        root: nn.Module,
        exclude: Iterable[str] = (),
        buffers: bool = False,
        include: Iterable[str] | None = None,
        trainable_only: bool = True,
    ) -> None:
        self.root = root
        self.trainable_only = trainable_only
        self.exclude = list(exclude)
        self.include = None if include is None else list(include)
        self.buffers = buffers
        self.start: dict[str, torch.Tensor] = {}
        self.layers = {p: m for p, m in mergeable_layers(root).items() if self.in_scope(p)}

    def in_scope(self, path: str) -> bool:
        """Is the module at ``path`` inside the update space (inside ``include``, outside ``exclude``)?"""
        inside = self.include is None or "" in self.include or in_subtree(path, self.include)
        return inside and not in_subtree(path, self.exclude)

    def _outside(self, name: str) -> bool:
        owner = name.rpartition(".")[0]
        return self.in_scope(owner) and not in_subtree(owner, self.layers)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of the live trainable tensors outside mergeable layers and excluded paths."""
        for name, p in self.root.named_parameters():
            if (p.requires_grad or not self.trainable_only) and p.is_floating_point() and self._outside(name):
                yield name, p
        if self.buffers:
            for name, b in self.root.named_buffers():
                if b.is_floating_point() and self._outside(name):
                    yield name, b

    def capture(self) -> list[str]:
        """Copy ``θ₀`` of every trainable tensor not seen before; returns their names."""
        new = []
        for name, tensor in self.tensors():
            if name not in self.start:
                self.start[name] = tensor.detach().clone()
                new.append(name)
        return new

    def layer_name(self, path: str, key: str = "weight") -> str:
        """The name of an adapted layer's weight-space entry for its weight ``key``: ``<path>.<key>``."""
        return f"{path}.{key}" if path else key

    def updates(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, ΔW or θ − θ₀)`` for every entry of the update space, differentiable, float32."""
        for path, layer in self.layers.items():
            for key, delta in weight_updates(layer).items():
                yield self.layer_name(path, key), delta
        live = dict(self.tensors())
        for name, start in self.start.items():
            if name in live:
                yield name, (live[name].float() - start.to(live[name].device).float())

    def square_norm(self) -> torch.Tensor:
        """``Σ ‖update‖²`` over the whole update space (each adapter computes its own: LoRA in rank space),
        differentiable."""
        total = torch.zeros(())
        for layer in self.layers.values():
            value = update_square_norm(layer)
            total = total.to(value.device) + value
        live = dict(self.tensors())
        for name, start in self.start.items():
            if name in live:
                delta = live[name].float() - start.to(live[name].device).float()
                total = total.to(delta.device) + delta.pow(2).sum()
        return total

    @contextlib.contextmanager
    def at_start(self) -> Iterator[None]:
        """The model computes its starting point inside the ``with`` block: adapted layers skip their update and
        every captured tensor holds ``θ₀`` (swapped in without a copy). Use it before building a graph: tensors
        saved for backward must not be swapped under it."""
        live = dict(self.tensors())
        swapped = []
        try:
            for name, start in self.start.items():
                if name in live:
                    tensor = live[name]
                    current, tensor.data = tensor.data, start.to(tensor.device, tensor.dtype)
                    swapped.append((tensor, current))
            with disabled_layers(self.layers):
                yield
        finally:
            for tensor, current in swapped:
                tensor.data = current

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The captured ``θ₀`` (CPU copies), for checkpoints."""
        return {name: t.cpu() for name, t in self.start.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``θ₀`` saved by :meth:`state_dict` (on the device of each live tensor)."""
        live = dict(self.tensors())
        self.start = {name: t.to(live[name].device if name in live else "cpu") for name, t in (state or {}).items()}


def update_scope(root: nn.Module, module: str | None, exclude_head: bool) -> tuple[list[str], list[str]]:
    """``(include, exclude)`` module paths of the update space inside ``root``: the models found in it (timm /
    transformers, or ``root`` itself; ``module`` narrows the search) and, when ``exclude_head``, their task heads.

    A model without a head of its own (timm ``num_classes=0``) is scored through ``root``'s own head when no
    original head is given, so the update space is then all of ``root`` (``[""]``): that head is part of it.

    Example::

        >>> import timm
        >>> class Task(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
        >>> update_scope(Task(), None, exclude_head=True)
        (['model'], ['model.fc'])
    """
    from peft_callbacks.core.heads import headless_reason
    from peft_callbacks.core.models import find_models, join_path
    from peft_callbacks.forgetting.original_heads import head_paths

    models = find_models(root, module)
    if not exclude_head and any(path and headless_reason(model) for path, model in models):
        return [""], []
    include = [path for path, _ in models]
    exclude = [join_path(path, head) for path, model in models for head in head_paths(model)] if exclude_head else []
    return include, exclude
