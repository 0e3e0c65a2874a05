r"""The learned update of a fine-tune, read and scaled layer by layer: the one place that knows PEFT layer kinds.

Forgetting control works on the *update* a fine-tune made, not on its parameters:

* a **mergeable PEFT layer** (LoRA, DoRA, and every layer that keeps the same contract) is found structurally: a
  :class:`~peft_callbacks.core.modules.PEFTModule` with ``.base_layer`` (the wrapped original layer),
  ``.merged_weight()`` (float32, shaped like ``base_layer.weight``) and a ``.disabled`` flag. Its update lives in
  weight space: ``ΔW = W_merged − W₀`` (for LoRA exactly ``s·B·A``);
* a **bottleneck adapter** adds ``up(act(down(h)))`` to a hidden state: its update is that output;
* anything else that trains (full fine-tuning, unfrozen layers, norms, prompts) is a plain tensor ``θ`` with its
  starting value ``θ₀`` (see :mod:`peft_callbacks.forgetting.anchors`).

Scaling the update by ``s`` gives ``W(s) = W₀ + s·ΔW`` for mergeable layers and ``h + s·up(act(down(h)))`` for
adapters; ``s = 0`` is the model before fine-tuning and ``s = 1`` the trained one.

Only this module imports LoRA or adapter classes (in :func:`_library`: the engine's ``AdaptedLayer`` holds named
adapters); everything else
goes through these functions.

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
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from peft_callbacks.core.modules import PEFTModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Library:
    lora: type  # plain LoRA parts: the update is s·B·A, linear in lora_B
    dora: type  # DoRA parts: m·(W₀ + s·B·A)/‖·‖_c
    adapter_layers: Callable[[nn.Module], dict[str, nn.Module]]
    unload: Callable[[nn.Module, list[nn.Module]], None]  # take these layers out (their weight already written)


@functools.cache
def _library() -> _Library:
    """The engine's LoRA/DoRA adapter classes and functions (imported late: the methods import this package)."""
    from peft_callbacks.engine import unload
    from peft_callbacks.methods.bottleneck import adapter_layers
    from peft_callbacks.methods.lora import DoRAAdapter, LoRAAdapter

    def unload_methods(model: nn.Module, layers: list[nn.Module]) -> None:
        for method in sorted({a.method for layer in layers for a in layer.adapters.values()}):
            unload(model, method=method)

    return _Library(LoRAAdapter, DoRAAdapter, adapter_layers, unload_methods)


def _parts(layer: nn.Module) -> list[nn.Module]:
    """The modules whose updates add up to the layer's: its active, unmerged adapters."""
    adapters = getattr(layer, "adapters", None)
    if isinstance(adapters, nn.ModuleDict):
        merged = getattr(layer, "merged_adapters", [])
        return [adapters[n] for n in getattr(layer, "active_adapters", list(adapters)) if n not in merged]
    return [layer]


def _plain_lora_parts(layer: nn.Module) -> list[nn.Module] | None:
    """The layer's parts if every one is plain LoRA (``s·B·A``: scaling ``B`` scales the update), else ``None``."""
    lib = _library()
    parts = _parts(layer)
    plain = parts and all(isinstance(p, lib.lora) and not isinstance(p, lib.dora) for p in parts)
    return parts if plain else None


def is_mergeable(module: nn.Module) -> bool:
    """Does ``module`` follow the mergeable-layer contract (``PEFTModule`` with ``base_layer``/``merged_weight``)?

    Example::

        >>> from peft_callbacks import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), rank=1)
        >>> is_mergeable(net[0]), is_mergeable(net[1])
        (True, False)
    """
    return (
        isinstance(module, PEFTModule)
        and callable(getattr(module, "merged_weight", None))
        and isinstance(getattr(module, "base_layer", None), nn.Module)
        and hasattr(module, "disabled")
    )


def mergeable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: layer}`` of every mergeable PEFT layer inside ``model`` (see :func:`is_mergeable`)."""
    return {name: m for name, m in model.named_modules() if is_mergeable(m)}


def bottleneck_adapters(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: adapter}`` of every bottleneck adapter inside ``model``.

    Example::

        >>> bottleneck_adapters(nn.Linear(2, 2))
        {}
    """
    return _library().adapter_layers(model)


def _dora_weight(part: nn.Module, base: torch.Tensor) -> torch.Tensor:
    """DoRA's ``m·(W₀ + s·B·A)/‖W₀ + s·B·A‖_c`` with the norm a constant, differentiable in ``m``, ``A``, ``B``."""
    rows, scale = part.weight_rows(base + part.delta_weight()), part.magnitude_scale(base)
    return part.weight_from_rows(rows * scale.float()[:, None])  # (out, fan_in) · (out, 1)


def weight_update(layer: nn.Module) -> torch.Tensor:
    """``ΔW = W − W₀`` of a mergeable layer, float32, shaped like ``base_layer.weight``, differentiable.

    For LoRA it is ``s·B·A``; for DoRA ``m·(W₀ + s·B·A)/‖W₀ + s·B·A‖_c − W₀`` with the norm a constant, as in its
    forward pass (so gradients reach ``m``, ``A`` and ``B``); for any other layer of the contract
    ``merged_weight() − W₀``.
    """
    lib = _library()
    base = layer.base_layer.weight.float()
    parts = _parts(layer)
    if any(isinstance(p, lib.dora) for p in parts):
        if len(parts) > 1:
            return layer.merged_weight() - base
        return _dora_weight(parts[0], base) - base
    if _plain_lora_parts(layer):
        return sum((p.delta_weight() for p in parts), torch.zeros_like(base))
    return layer.merged_weight() - base


def bias_update(layer: nn.Module) -> torch.Tensor | None:
    """The change a mergeable layer makes to its base bias (float32), or ``None`` when it leaves the bias alone."""
    merged_bias = getattr(layer, "merged_bias", None)
    bias = getattr(layer.base_layer, "bias", None)
    if not callable(merged_bias) or not isinstance(bias, torch.Tensor):
        return None
    delta = merged_bias() - bias.float()
    return delta if bool(delta.detach().abs().max() > 0) else None


def update_square_norm(layer: nn.Module) -> torch.Tensor:
    """``‖ΔW‖²_F`` of a mergeable layer, differentiable (float32 scalar).

    For plain LoRA it is computed in rank space, ``s²·Σ (BᵀB) ⊙ (AAᵀ)``, without forming the ``out × in`` matrix.

    Example::

        >>> from peft_callbacks import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2)), rank=2)
        >>> _ = nn.init.normal_(next(p for n, p in net.named_parameters() if "lora_B" in n))
        >>> torch.allclose(update_square_norm(net[0]), weight_update(net[0]).pow(2).sum())
        True
    """
    parts = _plain_lora_parts(layer)
    if parts and len(parts) == 1:
        part = parts[0]
        a = part.lora_A.weight.float().flatten(1)  # (r, in·k…)
        b = part.lora_B.weight.float().flatten(1)  # (out, r)
        return (b.t() @ b * (a @ a.t())).sum() * part.scaling**2  # (r, r) ⊙ (r, r)
    return weight_update(layer).pow(2).sum()


@contextlib.contextmanager
def folded_weights(layers: dict[str, nn.Module], scale: float = 1.0, requires_grad: bool = False) -> Iterator[None]:
    """Run mergeable ``layers`` as plain layers with weight ``W₀ + scale·ΔW`` inside the ``with`` block.

    The update is written into each ``base_layer.weight`` (and bias, for methods that change it; cast to their
    dtype) and the layer's ``disabled`` flag set, so the model computes exactly the scaled merged model; afterwards
    ``W₀``, the flags and ``requires_grad`` come back. With ``requires_grad=True`` gradients reach
    ``base_layer.weight``: the gradient in weight space.

    Example::

        >>> from peft_callbacks import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), rank=1)
        >>> _ = nn.init.ones_(next(p for n, p in net.named_parameters() if "lora_B" in n))
        >>> x = torch.randn(4, 3)
        >>> with folded_weights(mergeable_layers(net), scale=0.0):
        ...     torch.equal(net[0](x), net[0].base_layer(x))
        True
    """
    saved = []
    with torch.no_grad():
        targets = {}
        for path, layer in layers.items():
            bias = bias_update(layer)
            targets[path] = (
                layer.base_layer.weight.float() + scale * weight_update(layer),
                None if bias is None else layer.base_layer.bias.float() + scale * bias,
            )
    try:
        for path, layer in layers.items():
            base = layer.base_layer
            weight, bias = targets[path]
            old_bias = None if bias is None else base.bias.detach().clone()
            saved.append((layer, base.weight.detach().clone(), old_bias, layer.disabled, base.weight.requires_grad))
            with torch.no_grad():
                base.weight.copy_(weight.to(base.weight.dtype))
                if bias is not None:
                    base.bias.copy_(bias.to(base.bias.dtype))
            base.weight.requires_grad_(requires_grad or base.weight.requires_grad)
            layer.disabled = True
        yield
    finally:
        with torch.no_grad():
            for layer, weight, bias, disabled, grad in saved:
                layer.base_layer.weight.copy_(weight)
                if bias is not None:
                    layer.base_layer.bias.copy_(bias)
                layer.base_layer.weight.requires_grad_(grad)
                layer.disabled = disabled


@contextlib.contextmanager
def disabled_layers(layers: dict[str, nn.Module]) -> Iterator[None]:
    """Skip the update of every mergeable layer in ``layers`` inside the ``with`` block (``W = W₀``).

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


def scale_adapters(adapters: dict[str, nn.Module], factors: dict[str, tuple[torch.Tensor, torch.Tensor]], s: float):
    """Set each bottleneck adapter's up-projection to ``s ×`` its trained value (``factors``: trained weight, bias),
    so the adapter adds ``s·up(act(down(h)))``."""
    with torch.no_grad():
        for path, adapter in adapters.items():
            weight, bias = factors[path]
            adapter.up.weight.copy_(weight * s)
            if adapter.up.bias is not None:
                adapter.up.bias.copy_(bias * s)


def adapter_factors(adapters: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Copies of each adapter's trained up-projection ``(weight, bias)``, to scale from."""
    return {
        path: (a.up.weight.detach().clone(), None if a.up.bias is None else a.up.bias.detach().clone())
        for path, a in adapters.items()
    }


def commit_scaled_update(model: nn.Module, layers: dict[str, nn.Module], s: float) -> list[str]:
    """Make every mergeable layer compute ``W₀ + s·ΔW`` for good (in place); returns the paths merged here.

    When every layer is plain LoRA, the layers stay LoRA layers with ``B`` scaled by ``s`` (exactly ``s·ΔW``), so an
    adapter file written or a merge done afterwards holds the scaled update. Otherwise (DoRA, or any update that
    does not scale through its own factors) every layer is merged at ``s``: ``W₀ + s·ΔW`` is written into its base
    layer (float32, finite-checked before anything changes, cast back) and the base layer takes its place.
    ``layers`` are paths inside ``model``.

    Raises:
        ValueError: a merged weight would not be finite.
    """
    if s == 1.0 or not layers:
        return []
    plain = {path: _plain_lora_parts(layer) for path, layer in layers.items()}
    if all(plain.values()):
        with torch.no_grad():
            for parts in plain.values():
                for part in parts:
                    part.lora_B.weight.mul_(s)
        return []
    with torch.no_grad():
        merged = {}
        for path, layer in layers.items():
            weight = layer.base_layer.weight.float() + s * weight_update(layer)
            bias = bias_update(layer)
            bias = None if bias is None else layer.base_layer.bias.float() + s * bias
            for tensor in (weight, bias):
                if tensor is not None and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"Refusing to merge {path!r} at s={s:g}: the weight has NaN or Inf values.")
            merged[path] = (weight, bias)
        for path, layer in layers.items():
            weight, bias = merged[path]
            layer.base_layer.weight.copy_(weight.to(layer.base_layer.weight.dtype))
            if bias is not None:
                layer.base_layer.bias.copy_(bias.to(layer.base_layer.bias.dtype))
            layer.disabled = True  # W(s) is in the base weight now: until it is taken out, skip the update
    _library().unload(model, list(layers.values()))
    log.info("Merged %d layer(s) at s=%g (their update does not scale through their own factors).", len(merged), s)
    return list(merged)
