r"""The learned update of a fine-tune, read and scaled through the engine's adapter API, whatever the method.

Forgetting control works on the *update* a fine-tune made, not on its parameters. This module asks the modules the
engine inserted, found structurally (``isinstance``), and imports no method's classes:

* an **adapted layer** (:class:`~peft_callbacks.engine.AdaptedLayer`, any layer method: LoRA, DoRA, IA3, LoHa, LoKr,
  OFT, VeRA, AdaLoRA, LoRA on expert parameters, …) has its update in weight space, ``ΔW = W' − W₀`` for each weight
  it adapts (:meth:`~peft_callbacks.engine.AdaptedLayer.delta_weights`, its size
  :meth:`~peft_callbacks.engine.AdaptedLayer.update_norm`; for LoRA exactly ``s·B·A``, its norm without forming it);
* an **output adapter** (a :class:`~peft_callbacks.engine.scaling.Scalable` module outside adapted layers: bottleneck
  adapters) adds something to a hidden state: its update is that output;
* anything else that trains (full fine-tuning, unfrozen layers, norms, prompts) is a plain tensor ``θ`` with its
  starting value ``θ₀`` (see :mod:`peft_callbacks.forgetting.anchors`).

Scaling the update by ``s`` sets each adapter's :attr:`~peft_callbacks.engine.scaling.Scalable.scale` (times what it
was): ``s = 0`` is the model before fine-tuning and ``s = 1`` the trained one, for every method; each method's
docstring says what ``s`` between means (``W₀ + s·ΔW`` for most). Making a scale permanent writes it into the
adapters' own tensors where the method can (LoRA's ``B``), else merges their layers at ``s``.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks import inject_lora
    >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), rank=2)  # the head trains
    >>> _ = nn.init.ones_(next(p for n, p in net.named_parameters() if "lora_B" in n))
    >>> list(mergeable_layers(net))
    ['0']
    >>> layer = net[0]
    >>> torch.allclose(weight_update(layer), layer.merged_weight() - layer.base_layer.weight)
    True
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from peft_callbacks.core.sharding import full_parameters
from peft_callbacks.engine import AdaptedLayer, Adapter, get_method, merge
from peft_callbacks.engine.layers import norm_of
from peft_callbacks.engine.scaling import Scalable, scalable_modules

log = logging.getLogger(__name__)


def is_mergeable(module: nn.Module) -> bool:
    """Is ``module`` an adapted layer whose adapters all fold into its weights?

    Example::

        >>> from peft_callbacks import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), rank=1)
        >>> is_mergeable(net[0]), is_mergeable(net[1])
        (True, False)
    """
    return isinstance(module, AdaptedLayer) and all(a.mergeable for a in module.adapters.values())


def mergeable_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """``{path: layer}`` of every mergeable adapted layer inside ``model`` (see :func:`is_mergeable`)."""
    return {name: m for name, m in model.named_modules() if is_mergeable(m)}


def output_adapters(model: nn.Module) -> dict[str, Scalable]:
    """``{path: module}`` of every scalable inserted module outside adapted layers (bottleneck adapters): its
    update is what it adds to a hidden state, scaled as a whole.

    Example::

        >>> output_adapters(nn.Linear(2, 2))
        {}
    """
    return {p: m for p, m in scalable_modules(model).items() if m.scalable and not isinstance(m, Adapter)}


def weight_updates(layer: AdaptedLayer) -> dict[str, torch.Tensor]:
    """``{weight name: ΔW}`` of an adapted layer: what its applied adapters change, float32, differentiable."""
    return layer.delta_weights()


def weight_update(layer: AdaptedLayer) -> torch.Tensor:
    """``ΔW = W − W₀`` of an adapted weight layer, float32, shaped like ``base_layer.weight``, differentiable.

    For LoRA it is ``s·B·A``; for DoRA ``m·(W₀ + s·B·A)/‖W₀ + s·B·A‖_c − W₀`` with the norm a constant, as in its
    forward pass (so gradients reach ``m``, ``A`` and ``B``); for every method what its adapter says
    (:meth:`~peft_callbacks.engine.Adapter.delta_weight`).

    Raises:
        TypeError: the layer adapts parameters rather than one weight (use :func:`weight_updates`).
    """
    updates = weight_updates(layer)
    if list(updates) != ["weight"]:
        raise TypeError(f"This layer updates {list(updates)}, not one weight; use weight_updates(layer).")
    return updates["weight"]


def update_square_norm(layer: AdaptedLayer) -> torch.Tensor:
    """``‖ΔW‖²_F`` of an adapted layer, differentiable (float32 scalar); each adapter computes it its own way (LoRA
    in rank space, ``s²·Σ (BᵀB) ⊙ (AAᵀ)``, without forming the ``out × in`` matrix).

    Example::

        >>> from peft_callbacks import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2)), rank=2)
        >>> _ = nn.init.normal_(next(p for n, p in net.named_parameters() if "lora_B" in n))
        >>> torch.allclose(update_square_norm(net[0]), weight_update(net[0]).pow(2).sum())
        True
    """
    return layer.update_norm(squared=True)


def layer_adapters(layers: dict[str, AdaptedLayer]) -> list[Adapter]:
    """The adapters the forward passes of ``layers`` apply (active, not merged)."""
    return [layer.adapters[name] for layer in layers.values() for name in layer.applied_adapters()]


@contextlib.contextmanager
def scaled_updates(modules: Iterable[Scalable], s: float) -> Iterator[None]:
    """Multiply the :attr:`~peft_callbacks.engine.scaling.Scalable.scale` of each module by ``s`` inside the ``with``
    block; the scales come back afterwards.

    Example::

        >>> from peft_callbacks import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), rank=1)
        >>> _ = nn.init.ones_(next(p for n, p in net.named_parameters() if "lora_B" in n))
        >>> x = torch.randn(4, 3)
        >>> with scaled_updates(layer_adapters(mergeable_layers(net)), 0.0):
        ...     torch.equal(net[0](x), net[0].base_layer(x))
        True
    """
    previous = [(m, m.scale) for m in modules]
    try:
        for module, scale in previous:
            module.scale = scale * s
        yield
    finally:
        for module, scale in previous:
            module.scale = scale


@contextlib.contextmanager
def folded_weights(
    layers: dict[str, AdaptedLayer], requires_grad: bool = False
) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Run adapted ``layers`` as plain layers holding their merged tensors inside the ``with`` block.

    Each layer's merged state (its applied adapters folded in: weight, and bias for methods that change it; the
    parameters of parameter adapters) is written into its base tensors, cast to their dtype, and the layer disabled,
    so the model computes exactly the merged model; afterwards the base tensors, the flags and ``requires_grad`` come
    back. Yields ``{path: {weight name: base tensor}}``; with ``requires_grad=True`` gradients reach those tensors:
    the gradient in weight space.

    Example::

        >>> from peft_callbacks import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), rank=1)
        >>> _ = nn.init.ones_(next(p for n, p in net.named_parameters() if "lora_B" in n))
        >>> x = torch.randn(4, 3)
        >>> adapted = net[0](x)
        >>> with folded_weights(mergeable_layers(net)) as targets:
        ...     torch.allclose(net[0](x), adapted), list(targets["0"])
        (True, ['weight'])
    """
    with torch.no_grad():
        states = {path: layer.merged_state(layer.applied_adapters()) for path, layer in layers.items()}
    saved = []
    targets: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for path, layer in layers.items():
            weights = set(layer.weight_names(layer.applied_adapters()))
            targets[path] = {}
            for key, value in states[path].items():
                tensor = layer.base_layer.get_parameter(key)
                saved.append((tensor, tensor.detach().clone(), tensor.requires_grad))
                with torch.no_grad():
                    tensor.copy_(value.to(tensor.dtype))
                if key in weights:
                    tensor.requires_grad_(requires_grad or tensor.requires_grad)
                    targets[path][key] = tensor
            saved.append((layer, layer.disabled, None))
            layer.disabled = True
        yield targets
    finally:
        with torch.no_grad():
            for owner, value, grad in reversed(saved):
                if isinstance(owner, AdaptedLayer):
                    owner.disabled = value
                else:
                    owner.copy_(value)
                    owner.requires_grad_(grad)


@contextlib.contextmanager
def disabled_layers(layers: dict[str, AdaptedLayer]) -> Iterator[None]:
    """Skip the update of every adapted layer in ``layers`` inside the ``with`` block (``W = W₀``).

    Example::

        >>> from peft_callbacks import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), rank=1)
        >>> with disabled_layers(mergeable_layers(net)):
        ...     net[0].disabled
        True
        >>> net[0].disabled
        False
    """
    previous = [(layer, layer.disabled) for layer in layers.values()]
    try:
        for layer in layers.values():
            layer.disabled = True
        yield
    finally:
        for layer, was in previous:
            layer.disabled = was


def commit_scaled_update(
    model: nn.Module, layers: dict[str, AdaptedLayer], s: float, outputs: Iterable[Scalable] = ()
) -> list[str]:
    """Leave the update of ``layers`` (and of the output adapters ``outputs``) at ``s`` times its value, for good;
    returns the paths of the layers merged to do it.

    Adapters whose method can hold a scale in its own tensors keep their form with the scale written into them
    (LoRA's ``B`` times ``s``: exactly ``s·ΔW``), so an adapter file written or a merge done afterwards holds the
    scaled update. The layers of a method that cannot (DoRA, PiSSA/OLoRA) are merged at ``s`` (the merge applies the
    scale: float32, finite-checked before anything changes, cast back) and the base layers take their place.
    ``layers`` are paths inside ``model``.

    Raises:
        ValueError: a merged weight would not be finite (nothing changed then).
    """
    outputs = list(outputs)
    if s == 1.0 or not (layers or outputs):
        return []
    adapters = layer_adapters(layers)
    fixed = sorted({a.method for a in adapters if not a.absorbs_scale})
    merged = sorted({path for method in fixed for path in get_method(method).modules(model)})
    previous = [(m, m.scale) for m in [*adapters, *outputs]]
    for module, scale in previous:
        module.scale = scale * s
    try:
        for method in fixed:
            merge(model, method=method)
    except ValueError:
        for module, scale in previous:
            module.scale = scale
        raise
    for module in [*outputs, *(a for a in adapters if a.method not in fixed)]:
        module.absorb_scale()
    if merged:
        log.info("Merged %d layer(s) at s=%g (their update cannot hold a scale in its own tensors).", len(merged), s)
    return merged


def update_figures(layers: dict[str, AdaptedLayer]) -> dict[str, float]:
    """The size of the update of adapted ``layers``, for logs: ``update_norm`` (``√Σ‖ΔW‖²_F`` over every adapted
    weight) and ``relative_update`` (that over ``√Σ‖W‖²_F`` of the same weights); ``{}`` without layers.

    Every process must call it (a sharded layer is gathered one at a time).

    Example::

        >>> from peft_callbacks import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), rank=1)
        >>> update_figures(mergeable_layers(net))  # B = 0 at injection
        {'update_norm': 0.0, 'relative_update': 0.0}
    """
    if not layers:
        return {}
    update = base = 0.0
    with torch.no_grad():
        for layer in layers.values():
            with full_parameters(layer):
                names = layer.applied_adapters()
                update += float(layer.update_norm(names, squared=True))
                base += float(norm_of((layer.base_tensor(k) for k in layer.weight_names(names)), squared=True))
    return {"update_norm": update**0.5, "relative_update": (update / base) ** 0.5 if base > 0 else 0.0}
