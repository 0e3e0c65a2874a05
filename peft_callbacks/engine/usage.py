"""Adapted layers the model never calls: their weight is read directly, so their adapters never run.

Some models read a layer's weight instead of calling the layer: longcat_flash's MoE router computes
``F.linear(h, self.classifier.weight)``. An adapter on such a layer never runs (:class:`AdaptedLayer` passes
``.weight`` through to the base layer), so it trains nothing, yet a merge would fold it into the weight and change
what the model computes (HF PEFT has the same trap). Each :class:`AdaptedLayer` notes, at no cost worth measuring,
that its forward ran (``called``) and that its weight was read through it (``weight_read``). A layer whose weight was
read but which was never called, in a model some of whose adapted layers were called, is *uncalled*:

* :func:`merge` and :func:`~peft_callbacks.engine.adapters.merge_adapter` never fold its adapters (a warning names
  it; a merge puts its base layer back unchanged);
* the PEFT callbacks drop such adapters after the first training step (:func:`drop_adapters`), with a log line, so
  that they are neither trained, saved nor merged, and a resumed run drops them again.

Layers that are neither called nor read (an MoE expert no token was routed to yet, a layer skipped by LayerDrop) are
not uncalled: they may run later.

Example::

    >>> import torch, torch.nn as nn, torch.nn.functional as F
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> class Routed(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.proj, self.gate = nn.Linear(4, 4), nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         h = self.proj(x)
    ...         return h * F.linear(h, self.gate.weight).softmax(-1).sum(-1, keepdim=True)
    >>> model = inject_lora(Routed(), rank=2, target_modules=["proj", "gate"])
    >>> _ = model(torch.randn(3, 4))
    >>> uncalled_layers(model)
    ['gate']
    >>> drop_adapters(model, ["gate"], "default"), type(model.gate).__name__
    (['gate'], 'Linear')
"""

from __future__ import annotations

import logging

import torch.nn as nn

from peft_callbacks.core.recipe import drop_targets
from peft_callbacks.engine.layers import AdaptedLayer
from peft_callbacks.engine.method import replace_module

__all__ = ["drop_adapters", "is_called", "reset_usage", "uncalled_layers", "warn_uncalled"]

log = logging.getLogger(__name__)


def is_called(layer: AdaptedLayer) -> bool:
    """Has ``layer``'s forward run since it was wrapped (or since :func:`reset_usage`)?"""
    return bool(layer.__dict__.get("_called"))


def _weight_read(layer: AdaptedLayer) -> bool:
    return bool(layer.__dict__.get("_weight_read"))


def reset_usage(model: nn.Module) -> None:
    """Forget what was called and read so far (e.g. reads of ``.weight`` while a model is set up)."""
    for m in model.modules():
        if isinstance(m, AdaptedLayer):
            m.__dict__["_called"] = False
            m.__dict__["_weight_read"] = False


def uncalled_layers(model: nn.Module) -> list[str]:
    """Paths of the adapted layers of ``model`` whose weight was read directly while the forward never called them
    (see the module docstring); empty while no adapted layer was called at all (nothing is known yet)."""
    layers = {path: m for path, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    if not any(is_called(m) for m in layers.values()):
        return []
    return [path for path, m in layers.items() if _weight_read(m) and not is_called(m)]


def drop_adapters(model: nn.Module, paths: list[str], adapter_name: str) -> list[str]:
    """Take the adapter ``adapter_name`` out of the layers at ``paths`` (a layer left without adapters becomes its base
    layer again) and out of the surgery records, which then list those paths under ``"dropped"``. Merged adapters
    stay. Return the paths it was taken from."""
    modules = dict(model.named_modules(remove_duplicate=False))
    dropped = []
    for path in paths:
        layer = modules.get(path)
        if not isinstance(layer, AdaptedLayer) or adapter_name not in layer.adapters:
            continue
        if adapter_name in layer.merged_adapters:
            continue
        layer.delete_adapter(adapter_name)
        if not layer.adapters:
            for other, m in modules.items():
                if m is layer:
                    replace_module(model, other, layer.base_layer)
        dropped.append(path)
    if dropped:
        drop_targets(model, adapter_name, dropped)
    return dropped


def warn_uncalled(paths: list[str], what: str) -> None:
    """The warning for adapters left out of a merge because their layers never ran."""
    log.warning(
        "Not %s the adapters of %d layer(s) the model never called (%s): their weight is read directly (e.g. "
        "F.linear(h, layer.weight)), so their adapters never ran; merging them would change what the model "
        "computes. Their base layers are kept as they are; leave them out with `exclude_modules`.",
        what,
        len(paths),
        ", ".join(paths[:5]) + (", …" if len(paths) > 5 else ""),
    )
