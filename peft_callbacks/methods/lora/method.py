"""Put LoRA into a model, fold it back out, or take it away. Plain PyTorch: no Trainer needed.

Example::

    >>> import timm, torch
    >>> model = timm.create_model("test_vit", pretrained=False, num_classes=5)
    >>> x = torch.randn(2, 3, 160, 160)
    >>> before = model(x)
    >>> model = inject_lora(model, rank=4)
    >>> torch.equal(model(x), before)  # B starts at zero
    True
    >>> print(count_parameters(model))  # LoRA factors + the 5-class head
    trainable 25,157 / total 331,397 (7.59%)
    >>> model = merge_lora(model)  # a plain timm model again, same keys and module types
    >>> len(lora_layers(model))
    0
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn as nn

from peft_callbacks._validation import check_bool, check_float, check_module, check_positive_float, check_positive_int
from peft_callbacks.core.compat import enable_input_grads_for_checkpointing
from peft_callbacks.core.heads import find_head
from peft_callbacks.core.modules import peft_modules
from peft_callbacks.core.params import count_parameters, freeze, unfreeze
from peft_callbacks.core.recipe import clear_surgery, record_surgery, register_surgery
from peft_callbacks.core.targets import exact_patterns, resolve_targets
from peft_callbacks.lora.dora import dora_layer_for
from peft_callbacks.lora.layers import LoRALayer, lora_layer_for

__all__ = ["count_parameters", "inject_lora", "lora_disabled", "lora_layers", "merge_lora", "unload_lora"]

log = logging.getLogger(__name__)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """``{path: layer}`` of every LoRA layer inside ``model``."""
    return peft_modules(check_module("model", model), LoRALayer)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def inject_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: str | list[str] | None = None,
    exclude_modules: str | list[str] | None = None,
    *,
    train_head: bool = True,
    use_rslora: bool = False,
    use_dora: bool = False,
) -> nn.Module:
    """Wrap the selected layers of ``model`` with LoRA and freeze everything else (in place).

    Args:
        model: a timm model, a transformers model, or any ``nn.Module``.
        rank: LoRA rank ``r`` (> 0).
        alpha: LoRA ``lora_alpha`` (> 0); ``scaling = alpha / rank``.
        dropout: dropout on the LoRA branch input, in ``[0, 1)``.
        target_modules: which layers to adapt; ``None`` (every Linear/Conv/``Conv1D`` outside the head),
            ``"all-linear"``, names, regexes or a list (see :mod:`peft_callbacks.core.targets`).
        exclude_modules: patterns of modules to leave alone.
        train_head: keep the task head (found via ``get_classifier()`` / the transformers task head) fully
            trainable. ``False`` freezes it too.
        use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
        use_dora: weight-decomposed LoRA (DoRA, :mod:`peft_callbacks.lora.dora`): a trainable magnitude per output
            unit on top of the low-rank direction update.

    Returns:
        ``model`` itself, modified in place.

    Raises:
        ValueError: bad hyper-parameters, a pattern that selects nothing, or a model that already has LoRA.
    """
    check_module("model", model)
    check_positive_int("rank", rank)
    check_positive_float("alpha", alpha)
    check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
    check_bool("train_head", train_head)
    check_bool("use_rslora", use_rslora)
    check_bool("use_dora", use_dora)
    existing = lora_layers(model)
    if existing:
        raise ValueError(
            f"{type(model).__name__} already has LoRA on {len(existing)} layer(s) ({', '.join(list(existing)[:3])}, "
            f"…); injecting twice would stack adapters. Call merge_lora(model) or unload_lora(model) first."
        )

    head = find_head(model)
    selection = resolve_targets(
        model,
        target_modules,
        exclude_modules,
        protected=head.head if train_head else [],
        always_protected=head.all_paths,
    )
    freeze(model)
    for path in selection.targets:
        base = model.get_submodule(path)
        layer_type = dora_layer_for(base) if use_dora else lora_layer_for(base)
        with torch.device(base.weight.device):  # factors are created where the base weight lives (free on `meta`)
            _replace(model, path, layer_type(base, rank, alpha, lora_dropout=dropout, use_rslora=use_rslora))
    if train_head:
        unfreeze([model.get_submodule(p) for p in head.head])
    enable_input_grads_for_checkpointing(model)
    record_surgery(
        model,
        "lora",
        dict(
            targets=selection.targets,
            rank=rank,
            alpha=float(alpha),
            dropout=float(dropout),
            train_head=train_head,
            use_rslora=use_rslora,
            use_dora=use_dora,
        ),
    )
    log.info(
        "%s r=%d alpha=%g on %d layer(s) of %s; head %s (%s); %s",
        "DoRA" if use_dora else "LoRA",
        rank,
        alpha,
        len(selection.targets),
        type(model).__name__,
        head.head or "none",
        "trainable" if train_head else "frozen",
        count_parameters(model),
    )
    return model


def _check_finite(path: str, weight: torch.Tensor) -> None:
    if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
        raise ValueError(
            f"Refusing to merge LoRA into {path!r}: the merged weight has NaN or Inf values (the LoRA factors "
            f"diverged during training). The model was left unmerged."
        )


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put the original layers back (in place).

    The sum ``W₀ + s·B·A`` is computed in float32 and cast back to the base weight's dtype, so bf16/fp16 models lose
    no more precision than one rounding. Every merged weight is checked for NaN/Inf before any layer is changed.
    Afterwards ``model.state_dict()`` has exactly the original keys and module types: zero inference overhead.
    Calling it again (or on a model without LoRA) changes nothing.

    Raises:
        ValueError: a merged weight would not be finite (the message names the layer).
    """
    layers = lora_layers(model)
    merged = {}
    for path, layer in layers.items():  # check all before touching any, so a failure leaves the model whole
        weight = layer.merged_weight()
        _check_finite(path, weight)
        merged[path] = weight
    with torch.no_grad():
        for path, layer in layers.items():
            layer.base_layer.weight.copy_(merged[path].to(layer.base_layer.weight.dtype))
            _replace(model, path, layer.base_layer)
    clear_surgery(model, "lora")
    if layers:
        log.info("Merged LoRA into %d layer(s) of %s.", len(layers), type(model).__name__)
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every LoRA layer without merging: the base layers come back unchanged (in place)."""
    for path, layer in lora_layers(model).items():
        _replace(model, path, layer.base_layer)
    clear_surgery(model, "lora")
    return model


def _replay_lora(model: nn.Module, targets: list[str], **config) -> nn.Module:
    return inject_lora(model, target_modules=exact_patterns(targets), **config)


register_surgery("lora", _replay_lora)


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model (LoRA branches skipped) inside the ``with`` block.

    Example::

        >>> import torch, torch.nn as nn
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
        >>> nn.init.ones_(net[0].lora_B.weight)  # doctest: +ELLIPSIS
        Parameter containing:...
        >>> x = torch.randn(3, 4)
        >>> with lora_disabled(net):
        ...     base = net(x)
        >>> torch.equal(base, net[1](net[0].base_layer(x))), torch.equal(base, net(x))
        (True, False)
    """
    layers = list(lora_layers(model).values())
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was
