"""Several named adapters on one model: list them, choose the active ones, delete one, merge and unmerge in place.

Each surgery records its adapter name (``inject(model, config, adapter_name="task_b")``): a second adapter of any
method goes onto a model that has one, on the same layers or others. In an adapted layer every adapter lives under
its name (``layer.adapters["task_b"]``); modules inserted beside the model's own (bottleneck adapters) are found
through the recipe. The functions here act on all of them at once, with HF PEFT's names:

================================  ======================================================================
:func:`adapter_names`             every adapter in the model, in the order they were added
:func:`active_adapters`           the adapters the forward pass applies
:func:`set_adapter`               apply exactly these (others kept, inactive and frozen)
:func:`using_adapter`             the same inside a ``with`` block only (trainability untouched)
:func:`delete_adapter`            take one out (its layers back to what they were without it)
:func:`merge_adapter`             fold the active adapters into the base weights, wrappers kept
:func:`unmerge_adapter`           take them out of the weights again
:func:`~peft_callbacks.disabled`  the base model inside a ``with`` block
================================  ======================================================================

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> net = inject_lora(net, rank=2, train_head=False, target_modules=["0"], adapter_name="a")
    >>> net = inject_lora(net, rank=2, train_head=False, target_modules=["0"], adapter_name="b")
    >>> adapter_names(net), active_adapters(net)
    (['a', 'b'], ['a', 'b'])
    >>> set_adapter(net, "b")
    >>> active_adapters(net), net[0].adapters["a"].lora_A.weight.requires_grad
    (['b'], False)
    >>> with using_adapter(net, "a"):
    ...     active_adapters(net)
    ['a']
    >>> delete_adapter(net, "a")
    >>> adapter_names(net)
    ['b']
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.nn as nn

from peft_callbacks._validation import check_adapter_name, check_bool, check_module
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.recipe import recorded_models, surgery_records
from peft_callbacks.engine.layers import DEFAULT_ADAPTER, AdaptedLayer
from peft_callbacks.engine.method import LayerMethod, get_method
from peft_callbacks.engine.surgery import unload
from peft_callbacks.engine.usage import uncalled_layers, warn_uncalled

__all__ = [
    "active_adapters",
    "adapter_names",
    "delete_adapter",
    "merge_adapter",
    "set_adapter",
    "unmerge_adapter",
    "using_adapter",
]


def _layers(model: nn.Module) -> list[AdaptedLayer]:
    return [m for m in model.modules() if isinstance(m, AdaptedLayer)]


def module_adapters(model: nn.Module) -> dict[str, list[PEFTModule]]:
    """``{adapter name: [modules]}`` of the adapters inserted beside the model's own modules (bottleneck adapters,
    prompts), found through the recorded surgeries."""
    found: dict[str, list[PEFTModule]] = {}
    for target in recorded_models(model).values():
        for record in surgery_records(target):
            method = get_method(record["method"])
            if isinstance(method, LayerMethod):
                continue
            name = record.get("adapter_name", DEFAULT_ADAPTER)
            modules = found.setdefault(name, [])
            modules.extend(m for m in method.modules(target, name).values() if all(m is not o for o in modules))
    return found


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name in ``model``, in the order the adapters were added.

    Example::

        >>> adapter_names(nn.Linear(2, 2))
        []
    """
    check_module("model", model)
    names: list[str] = []
    for target in recorded_models(model).values():
        names.extend(r.get("adapter_name", DEFAULT_ADAPTER) for r in surgery_records(target))
    for layer in _layers(model):
        names.extend(layer.adapters)
    return list(dict.fromkeys(names))


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters the forward pass of ``model`` applies (in the order they were added).

    Example::

        >>> active_adapters(nn.Linear(2, 2))
        []
    """
    check_module("model", model)
    active = {n for layer in _layers(model) if not layer.disabled for n in layer.active_adapters}
    for name, modules in module_adapters(model).items():
        if any(not getattr(m, "disabled", False) for m in modules):
            active.add(name)
    return [n for n in adapter_names(model) if n in active]


def _check_names(model: nn.Module, adapter_name: Any, argument: str = "adapter_name") -> list[str]:
    names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"`{argument}` must be an adapter name or a non-empty list of them, got {adapter_name!r}.")
    for name in names:
        check_adapter_name(name, argument)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"`{argument}`={adapter_name!r}: no adapter {unknown} in {type(model).__name__}; it has {known}."
        )
    return list(dict.fromkeys(names))


def _activate(model: nn.Module, names: list[str]) -> None:
    for layer in _layers(model):
        layer.set_active([n for n in names if n in layer.adapters])
    for name, modules in module_adapters(model).items():
        for module in modules:
            module.disabled = name not in names


def set_adapter(model: nn.Module, adapter_name: str | list[str], *, inference_mode: bool = False) -> None:
    """Apply exactly the adapter(s) ``adapter_name`` (in this order); the others stay in the model, inactive.

    As in HF PEFT, the active adapters become trainable and the inactive ones frozen (all frozen with
    ``inference_mode``); the rest of the model is left as it is.

    Args:
        model: a model holding named adapters.
        adapter_name: one name or a list of names.
        inference_mode: freeze the active adapters too.

    Raises:
        ValueError: an unknown name (the message lists the adapters), or adapters merged in place
            (:func:`unmerge_adapter` first).
    """
    check_module("model", model)
    names = _check_names(model, adapter_name)
    check_bool("inference_mode", inference_mode)
    _activate(model, names)
    for layer in _layers(model):
        for name, adapter in layer.adapters.items():
            adapter.requires_grad_(name in names and not inference_mode)
    for name, modules in module_adapters(model).items():
        for module in modules:
            module.requires_grad_(name in names and not inference_mode)


def _snapshot(model: nn.Module) -> tuple[list, list]:
    layers = [(layer, list(layer.active_adapters)) for layer in _layers(model)]
    modules = [(m, m.disabled) for ms in module_adapters(model).values() for m in ms]
    return layers, modules


@contextlib.contextmanager
def using_adapter(model: nn.Module, adapter_name: str | list[str]) -> Iterator[nn.Module]:
    """Apply only ``adapter_name`` inside the ``with`` block; the active adapters are restored afterwards and
    nothing's trainability changes. For scoring one adapter while another trains, e.g. in a ``ForgettingMonitor``'s
    ``forward_fn``.

    Example::

        >>> import torch
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2, adapter_name="a")
        >>> net = inject_lora(net, rank=2, target_modules=["0"], train_head=False, adapter_name="b")
        >>> with using_adapter(net, "a"):
        ...     net[0].active_adapters
        ['a']
        >>> net[0].active_adapters
        ['a', 'b']
    """
    check_module("model", model)
    names = _check_names(model, adapter_name)
    layers, modules = _snapshot(model)
    _activate(model, names)
    try:
        yield model
    finally:
        for layer, active in layers:
            layer.active_adapters = active
        for module, was in modules:
            module.disabled = was


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Take the adapter ``adapter_name`` out of ``model`` (unmerged); layers left without adapters are plain again.

    Raises:
        ValueError: no adapter of that name (the message lists the adapters).
    """
    check_module("model", model)
    if not isinstance(adapter_name, str):
        raise TypeError(f"`adapter_name` must be the name of one adapter, got {adapter_name!r}.")
    _check_names(model, adapter_name)
    methods = {
        r["method"]
        for target in recorded_models(model).values()
        for r in surgery_records(target)
        if r.get("adapter_name", DEFAULT_ADAPTER) == adapter_name
    }
    methods.update(
        getattr(type(a), "method", "")
        for layer in _layers(model)
        for n, a in layer.adapters.items()
        if n == adapter_name
    )
    for method in sorted(m for m in methods if m):
        unload(model, method=method, adapter_name=adapter_name)


def merge_adapter(model: nn.Module, adapter_names: list[str] | None = None) -> None:
    """Fold the active adapters (or ``adapter_names``) into the base weights in place; the wrappers stay, so
    :func:`unmerge_adapter` takes them out again (HF PEFT's ``merge_adapter``). Float32, cast back once, every
    merged weight checked for NaN/Inf: on a refusal no layer stays merged. Layers the model never calls are left
    unmerged, with a warning (:mod:`peft_callbacks.engine.usage`).

    Raises:
        ValueError: an unknown name, adapters merged already, an adapter that cannot be merged, or a merged weight
            that would not be finite.
    """
    check_module("model", model)
    names = None if adapter_names is None else _check_names(model, adapter_names, "adapter_names")
    uncalled = uncalled_layers(model)  # their adapters never ran: never folded
    if uncalled:
        warn_uncalled(uncalled, "merging")
    skipped = {id(model.get_submodule(p)) for p in uncalled}
    done = []
    try:
        for layer in _layers(model):
            if id(layer) in skipped:
                continue
            chosen = [n for n in (layer.active_adapters if names is None else names) if n in layer.adapters]
            unmergeable = [n for n in chosen if not layer.adapters[n].mergeable]
            if unmergeable:
                raise ValueError(f"Adapters {unmergeable} cannot be merged into their base weights.")
            if chosen:
                layer.merge(chosen)
                done.append(layer)
    except ValueError:
        for layer in done:
            layer.unmerge()
        raise


def unmerge_adapter(model: nn.Module) -> None:
    """Take every adapter merged in place (:func:`merge_adapter`) out of the base weights again."""
    check_module("model", model)
    for layer in _layers(model):
        layer.unmerge()
