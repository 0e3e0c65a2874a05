r"""The learned update of a fine-tune, read and scaled layer by layer: the one place that knows PEFT layer kinds.

Forgetting control works on the *update* a fine-tune made, not on its parameters:

* a **mergeable PEFT layer** (LoRA, DoRA, and every layer that keeps the same contract) is found structurally: a
  :class:`~peft_callbacks.core.modules.PEFTModule` with ``.base_layer`` (the wrapped original layer),
  ``.merged_weight()`` (float32, shaped like ``base_layer.weight``) and a ``.disabled`` flag. Its update lives in
  weight space: ``ΔW = W_merged − W₀`` (for LoRA exactly ``s·B·A``, ``LoRALayer.delta_weight``);
* a **bottleneck adapter** adds ``up(act(down(h)))`` to a hidden state: its update is that output;
* anything else that trains (full fine-tuning, unfrozen layers, norms, prompts) is a plain tensor ``θ`` with its
  starting value ``θ₀`` (see :mod:`peft_callbacks.forgetting.anchors`).

Scaling the update by ``s`` gives ``W(s) = W₀ + s·ΔW`` for mergeable layers and ``h + s·up(act(down(h)))`` for
adapters; ``s = 0`` is the model before fine-tuning and ``s = 1`` the trained one.

Only this module imports LoRA or adapter internals; everything else goes through these functions.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.lora.inject import inject_lora
    >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), rank=2)  # the head trains
    >>> _ = nn.init.ones_(net[0].lora_B.weight)
    >>> list(mergeable_layers(net))
    ['0']
    >>> torch.allclose(weight_update(net[0]), net[0].delta_weight())
    True
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn as nn

from peft_callbacks.core.modules import PEFTModule

log = logging.getLogger(__name__)


def is_mergeable(module: nn.Module) -> bool:
    """Does ``module`` follow the mergeable-layer contract (``PEFTModule`` with ``base_layer``/``merged_weight``)?

    Example::

        >>> from peft_callbacks.lora.layers import LoRALinear
        >>> is_mergeable(LoRALinear(nn.Linear(3, 3), r=1, lora_alpha=1)), is_mergeable(nn.Linear(3, 3))
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
    from peft_callbacks.adapters.inject import adapter_layers

    return adapter_layers(model)


def _lora_kinds() -> tuple[type, type]:
    from peft_callbacks.lora.dora import DoRALayer
    from peft_callbacks.lora.layers import LoRALayer

    return LoRALayer, DoRALayer


def weight_update(layer: nn.Module) -> torch.Tensor:
    """``ΔW = W − W₀`` of a mergeable layer, float32, shaped like ``base_layer.weight``, differentiable.

    For LoRA it is ``s·B·A``; for DoRA ``m·(W₀ + s·B·A)/‖W₀ + s·B·A‖_c − W₀`` with the norm a constant, as in its
    forward pass (so gradients reach ``m``, ``A`` and ``B``); for any other layer of the contract
    ``merged_weight() − W₀``.
    """
    lora, dora = _lora_kinds()
    base = layer.base_layer.weight.float()
    if isinstance(layer, dora):
        rows = layer.weight_rows(layer.merged_lora_weight())  # (out, fan_in)
        scale = layer.magnitude_scale().float()  # (out,), differentiable in m
        return layer.weight_from_rows(rows * scale[:, None]) - base
    if isinstance(layer, lora):
        return layer.delta_weight()
    return layer.merged_weight() - base


def update_square_norm(layer: nn.Module) -> torch.Tensor:
    """``‖ΔW‖²_F`` of a mergeable layer, differentiable (float32 scalar).

    For plain LoRA it is computed in rank space, ``s²·Σ (BᵀB) ⊙ (AAᵀ)``, without forming the ``out × in`` matrix.

    Example::

        >>> from peft_callbacks.lora.layers import LoRALinear
        >>> layer = LoRALinear(nn.Linear(6, 5), r=2, lora_alpha=4)
        >>> _ = nn.init.normal_(layer.lora_B.weight)
        >>> torch.allclose(update_square_norm(layer), layer.delta_weight().pow(2).sum())
        True
    """
    lora, dora = _lora_kinds()
    if isinstance(layer, lora) and not isinstance(layer, dora):
        a = layer.lora_A.weight.float().flatten(1)  # (r, in·k…)
        b = layer.lora_B.weight.float().flatten(1)  # (out, r)
        return (b.t() @ b * (a @ a.t())).sum() * layer.scaling**2  # (r, r) ⊙ (r, r)
    return weight_update(layer).pow(2).sum()


@contextlib.contextmanager
def folded_weights(layers: dict[str, nn.Module], scale: float = 1.0, requires_grad: bool = False) -> Iterator[None]:
    """Run mergeable ``layers`` as plain layers with weight ``W₀ + scale·ΔW`` inside the ``with`` block.

    The update is written into each ``base_layer.weight`` (cast to its dtype) and the layer's ``disabled`` flag set,
    so the model computes exactly the scaled merged model; afterwards ``W₀``, the flags and ``requires_grad`` come
    back. With ``requires_grad=True`` gradients reach ``base_layer.weight``: the gradient in weight space.

    Example::

        >>> from peft_callbacks.lora.layers import LoRALinear
        >>> layer = LoRALinear(nn.Linear(3, 2), r=1, lora_alpha=1)
        >>> _ = nn.init.ones_(layer.lora_B.weight)
        >>> x = torch.randn(4, 3)
        >>> with folded_weights({"": layer}, scale=0.0):
        ...     torch.equal(layer(x), layer.base_layer(x))
        True
    """
    saved = []
    with torch.no_grad():
        targets = {
            path: layer.base_layer.weight.float() + scale * weight_update(layer) for path, layer in layers.items()
        }
    try:
        for path, layer in layers.items():
            weight = layer.base_layer.weight
            saved.append((layer, weight.detach().clone(), layer.disabled, weight.requires_grad))
            with torch.no_grad():
                weight.copy_(targets[path].to(weight.dtype))
            weight.requires_grad_(requires_grad or weight.requires_grad)
            layer.disabled = True
        yield
    finally:
        with torch.no_grad():
            for layer, original, disabled, grad in saved:
                layer.base_layer.weight.copy_(original)
                layer.base_layer.weight.requires_grad_(grad)
                layer.disabled = disabled


@contextlib.contextmanager
def disabled_layers(layers: dict[str, nn.Module]) -> Iterator[None]:
    """Skip the update of every mergeable layer in ``layers`` inside the ``with`` block (``W = W₀``).

    Example::

        >>> from peft_callbacks.lora.layers import LoRALinear
        >>> layer = LoRALinear(nn.Linear(3, 2), r=1, lora_alpha=1)
        >>> with disabled_layers({"": layer}):
        ...     layer.disabled
        True
        >>> layer.disabled
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


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def commit_scaled_update(model: nn.Module, layers: dict[str, nn.Module], s: float) -> list[str]:
    """Make every mergeable layer compute ``W₀ + s·ΔW`` for good (in place); returns the paths merged here.

    LoRA layers stay LoRA layers with ``B`` scaled by ``s`` (exactly ``s·ΔW``), so an adapter file written or a merge
    done afterwards holds the scaled update. A layer whose update does not scale through its own parameters (DoRA)
    is merged at ``s``: ``W₀ + s·ΔW`` is written into its base layer (float32, finite-checked, cast back) and the
    base layer takes its place. ``layers`` are paths inside ``model``.

    Raises:
        ValueError: a merged weight would not be finite.
    """
    lora, dora = _lora_kinds()
    if s == 1.0:
        return []
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for path, layer in layers.items():
            if isinstance(layer, lora) and not isinstance(layer, dora):
                continue
            weight = layer.base_layer.weight.float() + s * weight_update(layer)
            if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
                raise ValueError(f"Refusing to merge {path!r} at s={s:g}: the weight has NaN or Inf values.")
            merged[path] = weight
        for path, layer in layers.items():
            if path in merged:
                layer.base_layer.weight.copy_(merged[path].to(layer.base_layer.weight.dtype))
                _replace(model, path, layer.base_layer)
            else:
                layer.lora_B.weight.mul_(s)
    if merged:
        from peft_callbacks.core.recipe import clear_surgery

        if not mergeable_layers(model):
            clear_surgery(model, "lora")
        log.info("Merged %d layer(s) at s=%g (their update does not scale through their own factors).", len(merged), s)
    return list(merged)
