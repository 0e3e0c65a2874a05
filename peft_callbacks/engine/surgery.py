"""The one surgery pipeline every method runs through: inject, merge, unload, disable, replay. Plain PyTorch.

:func:`inject` does, for any registered method and in this order: check the arguments, refuse a second copy of the
same adapter, find the task head, resolve the targets (or check recorded ones), freeze the model, insert the
method's modules (sharded alike when the model is sharded with FSDP2, see :mod:`peft_callbacks.core.sharding`),
unfreeze the head (``train_head``) and the method's extras, freeze BatchNorm statistics outside the head (unless
``train_bn``), let gradients reach adapters inside reentrant-checkpointed blocks, record the recipe, and log one line.
It is a transaction: if any step fails, the model is exactly as it was. :func:`merge` gathers a sharded layer at a
time.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.methods.ia3 import IA3Config
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> x = torch.randn(2, 8)
    >>> before = net(x)
    >>> net = inject(net, IA3Config(target_modules=["0", "2"], train_head=False))  # the last layer too
    >>> sorted(peft_layers(net)), torch.equal(net(x), before)
    (['0', '2'], True)
    >>> with torch.no_grad():
    ...     _ = net[2].adapters["default"].ia3_l.fill_(2.0)
    >>> adapted = net(x)
    >>> net = merge(net)  # plain layers again, the update folded in
    >>> type(net[2]).__name__, torch.allclose(net(x), adapted)
    ('Linear', True)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from peft_callbacks._validation import check_adapter_name, check_bool, check_module
from peft_callbacks.core import quantized
from peft_callbacks.core.compat import disable_input_grads_for_checkpointing, enable_input_grads_for_checkpointing
from peft_callbacks.core.heads import find_head
from peft_callbacks.core.kinds import layer_kind
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.params import (
    count_parameters,
    freeze,
    freeze_batchnorm_stats,
    unfreeze,
    unfreeze_batchnorm_stats,
)
from peft_callbacks.core.recipe import clear_surgery, record_surgery, recorded_models
from peft_callbacks.core.sharding import full_parameters, has_sharded_parameters, shard_as, shard_new_modules
from peft_callbacks.core.targets import in_subtree
from peft_callbacks.engine.bias import bias_rule, trained_biases
from peft_callbacks.engine.config import MethodConfig
from peft_callbacks.engine.layers import DEFAULT_ADAPTER, AdaptedLayer, check_finite
from peft_callbacks.engine.method import (
    LayerMethod,
    Method,
    cast_adapter,
    get_method,
    registered_methods,
    replace_module,
)
from peft_callbacks.engine.parallel import split_new_adapters
from peft_callbacks.engine.patterns import select_layers
from peft_callbacks.engine.precision import (
    check_dtype,
    dequantize_model,
    log_requantization,
    refuse_quantized_merge,
    write_merged,
)
from peft_callbacks.engine.transaction import transaction
from peft_callbacks.engine.usage import uncalled_layers, warn_uncalled

__all__ = ["adapt_layer", "disabled", "inject", "merge", "peft_layers", "replay", "unload"]

log = logging.getLogger(__name__)


def check_config(config: Any) -> MethodConfig:
    """Return ``config`` if it is a method config (``LoRAConfig(...)``, ``IA3Config(...)``, …)."""
    if not isinstance(config, MethodConfig):
        raise TypeError(
            f"`config` must be a method config such as LoRAConfig(rank=8), got {type(config).__name__} {config!r}."
        )
    return config


def peft_layers(model: nn.Module, method: str | None = None) -> dict[str, AdaptedLayer]:
    """``{path: AdaptedLayer}`` of every adapted weight layer in ``model`` (of one method, if named)."""
    check_module("model", model)
    if method is not None:
        return dict(get_method(method).modules(model))
    return {path: m for path, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def adapt_layer(base_layer: nn.Module, config: MethodConfig, adapter_name: str = DEFAULT_ADAPTER) -> AdaptedLayer:
    """Wrap one weight layer with one adapter of a layer method (no freezing, no recipe): the building block.

    Example::

        >>> import torch, torch.nn as nn
        >>> from peft_callbacks.methods.lora import LoRAConfig
        >>> layer = adapt_layer(nn.Linear(16, 32), LoRAConfig(rank=4))
        >>> type(layer.adapters["default"]).__name__, layer(torch.randn(2, 16)).shape
        ('LoRALinear', torch.Size([2, 32]))
    """
    check_module("base_layer", base_layer)
    check_config(config)
    check_adapter_name(adapter_name)
    method = get_method(config)
    kind = layer_kind(base_layer)
    if not isinstance(method, LayerMethod) or kind not in method.adapter_classes:
        raise TypeError(f"`base_layer` must be a layer {method.title} can adapt, got {type(base_layer).__name__}.")
    layer = AdaptedLayer(base_layer)
    adapter = method.adapter_class(kind, config)(base_layer, config)
    layer.add_adapter(adapter_name, cast_adapter(adapter, base_layer, config))
    return layer


def inject(
    model: nn.Module,
    config: MethodConfig,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    targets: list[str] | None = None,
) -> nn.Module:
    """Apply a PEFT method to ``model`` in place (see the module docstring for the steps).

    Args:
        model: a timm model, a transformers model, or any ``nn.Module``.
        config: the method and its settings, e.g. ``LoRAConfig(rank=8)``.
        adapter_name: the name of this adapter (several can live in one model).
        targets: exact module paths to adapt instead of the config's patterns (used when replaying a recipe; no
            pattern is evaluated).

    Returns:
        ``model`` itself.

    Raises:
        TypeError/ValueError: a bad argument, a pattern that selects nothing, or an adapter of this name already
            there.
    """
    check_module("model", model)
    check_config(config)
    check_adapter_name(adapter_name)
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise TypeError(f"`targets` must be None or a list of module paths, got {type(targets).__name__} {targets!r}.")
    method = get_method(config)
    existing = method.modules(model, adapter_name)
    if existing:
        named = "" if adapter_name == DEFAULT_ADAPTER else f" named {adapter_name!r}"
        raise ValueError(
            f"{type(model).__name__} already has {method.existing(len(existing))}{named} "
            f"({', '.join(list(existing)[:3])}{', …' if len(existing) > 3 else ''}); injecting it twice would stack "
            f"updates. Call {method.removal} first, or give the new one another `adapter_name`."
        )
    head = find_head(model)
    if config.train_head:
        _refuse_quantized_head(model, head.head)
    with transaction(model):
        if targets is None:  # the patterns, then `layers_to_transform` (a recipe's exact targets hold both)
            layers = getattr(config, "layers_to_transform", None)
            targets = select_layers(method.select(model, config, head), layers, getattr(config, "layers_pattern", None))
        else:
            targets = method.check_targets(model, targets)
        config = method.resolve(model, config, targets)
        sharded = has_sharded_parameters(model)
        before = {id(m) for m in model.modules()}
        freeze(model)
        method.insert(model, targets, config, adapter_name)
        follow_training_mode(model, before)
        if sharded:  # split as tensor parallelism splits their bases; under FSDP2, units of their own, same mesh
            split_new_adapters(model, before, method.title)
            shard_new_modules(model, _inserted(model, before))
        unfreeze(method.trainable_extras(model, config))
        for bias in trained_biases(model, bias_rule(config), method.modules(model, adapter_name)).values():
            bias.requires_grad_(True)
        if config.train_head:
            unfreeze([model.get_submodule(p) for p in head.head])
        apply_batchnorm_rule(model, config, head.head if config.train_head else [])
        enable_input_grads_for_checkpointing(model)
        record_surgery(model, method.name, method.record(config, targets), adapter_name)
        if quantized.holds_quantized(model):
            _prepare_quantized(model)
    log.info(
        "%s%s on %d module(s) of %s%s; head %s (%s); %s",
        method.title,
        f" ({method.describe(config)})" if method.describe(config) else "",
        len(targets) or 1,
        type(model).__name__,
        "" if adapter_name == DEFAULT_ADAPTER else f" as adapter {adapter_name!r}",
        head.head or "none",
        "trainable" if config.train_head else "frozen",
        count_parameters(model),
    )
    return model


def _refuse_quantized_head(model: nn.Module, head: list[str]) -> None:
    """A quantized task head cannot train (its weight is stored in integers): say how to keep it in floating point."""
    found = [
        sub
        for p in head
        for sub, m in model.get_submodule(p).named_modules(prefix=p)
        if quantized.is_quantized(m) and not isinstance(m, PEFTModule)
    ]
    if found:
        raise ValueError(
            f"The task head of {type(model).__name__} ({', '.join(found)}) is a quantized bitsandbytes layer, which "
            f"cannot train, and `train_head=True` would train it. Keep it out of quantization (transformers: "
            f"`BitsAndBytesConfig(llm_int8_skip_modules=[...])`; Lightning: `BitsandbytesPrecision(..., "
            f"ignore_modules={{...}})`), or pass `train_head=False` to leave it frozen."
        )


def _prepare_quantized(model: nn.Module) -> None:
    """A quantized base gets what PEFT's ``prepare_model_for_kbit_training`` does (norms in float32, …)."""
    upcast = quantized.prepare_quantized_base(model)
    layers = quantized.quantized_layers(model)
    if any(m.weight.device.type == "meta" for m in layers.values()):
        return  # a dry run on a shadow of the model (see engine.shadow): nothing to report
    formats = sorted({quantized.quantization_label(m) for m in layers.values()})
    log.info(
        "%s has a quantized base: %d bitsandbytes layer(s) (%s), kept frozen and bit-identical; %d half-precision "
        "parameter(s) put in float32.",
        type(model).__name__,
        len(layers),
        ", ".join(formats) or "none loaded",
        len(upcast),
    )


def follow_training_mode(module: nn.Module, before: set[int]) -> None:
    """Modules inserted since ``before`` take the training mode of the module they went into: an adapter injected
    into a model in ``eval()`` mode does not drop out, as a module built in ``train()`` mode would."""
    for child in module.children():
        if id(child) not in before:
            child.training = module.training
        follow_training_mode(child, before)


def _inserted(model: nn.Module, before: set[int]) -> list[tuple[str, nn.Module]]:
    """The outermost modules inserted since ``before`` that own tensors (adapters, not the wrappers around them)."""
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if id(module) in before or not isinstance(module, PEFTModule) or isinstance(module, AdaptedLayer):
            continue
        if not any(in_subtree(path, [outer]) for outer, _ in found):
            found.append((path, module))
    return found


def apply_batchnorm_rule(model: nn.Module, config: MethodConfig, head: list[str] | None = None) -> None:
    """One rule for every method, with or without a Trainer: BatchNorm layers outside the head keep their running
    statistics unless ``train_bn`` (then they train in full). ``head`` defaults to the model's task head."""
    if head is None:
        head = find_head(model).head if config.train_head else []
    for path, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not in_subtree(path, head):
            if config.train_bn:
                unfreeze(module)
            else:
                freeze_batchnorm_stats(module)


def _methods(model: nn.Module, method: str | None) -> list[Method]:
    """The named method, or every registered method that has modules in ``model``."""
    if method is not None:
        if not isinstance(method, str) or method not in registered_methods():
            raise ValueError(f"`method` must be None or one of {registered_methods()}, got {method!r}.")
        return [get_method(method)]
    return [m for m in map(get_method, registered_methods()) if m.modules(model)]


def _after_removal(model: nn.Module, method: Method, adapter_name: str | None) -> None:
    clear_surgery(model, method.name, adapter_name)
    if not recorded_models(model):  # nothing of ours left: BatchNorm statistics move again, as before surgery
        unfreeze_batchnorm_stats(model)
        disable_input_grads_for_checkpointing(model)  # and no hook of ours stays behind


def _base_tensor(base: nn.Module, name: str) -> torch.Tensor:
    """The base layer's tensor ``name`` (a parameter or a buffer, possibly nested)."""
    try:
        return base.get_parameter(name)
    except AttributeError:
        return base.get_buffer(name)


def merge(
    model: nn.Module,
    method: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    requantize: bool = False,
) -> nn.Module:
    """Fold every mergeable adapter into its base weight and put the original layers back (in place).

    The merged weights are computed in float32 (on quantized bases from the dequantized weights) and cast back to
    each base weight's dtype, so bf16/fp16 models lose no more precision than one rounding. Every merged weight is
    checked for NaN/Inf before any layer changes; afterwards ``model.state_dict()`` has the original keys and module
    types. Calling it again changes nothing. Layers the model never calls (it reads their weight directly, see
    :mod:`peft_callbacks.engine.usage`) are not folded: their adapters never ran; a warning names them.

    A quantized (bitsandbytes) base is never re-rounded silently: merging into it needs ``dtype`` or ``requantize``
    (see :mod:`peft_callbacks.engine.precision`).

    Args:
        model: the adapted model.
        method: merge only this method's adapters (``"lora"``); by default every mergeable one.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or the torch dtype): the whole model becomes a plain
            model in this dtype: merged layers hold their merged weight, quantized layers are replaced by plain
            ``nn.Linear`` layers holding their dequantized weight, every other tensor is cast. ``None`` keeps each
            weight's dtype.
        requantize: on a quantized base, quantize each merged weight again in its layer's format (lossy; the share
            of each update the rounding changes is logged, see
            :func:`~peft_callbacks.engine.precision.requantization_error`).

    Raises:
        ValueError: a merged weight would not be finite (the message names the layer), a layer also holds an adapter
            that cannot be merged, or a quantized base without ``dtype``/``requantize``. The model is then unchanged.
        ImportError: ``requantize`` without an importable bitsandbytes (the message names the extra to install).
    """
    check_module("model", model)
    dtype = check_dtype("dtype", dtype)
    check_bool("requantize", requantize)
    if dtype is not None and requantize:
        raise ValueError(
            f"`dtype={dtype}` and `requantize=True` contradict each other: `dtype` writes plain layers of that dtype, "
            f"`requantize` rounds merged weights back into the quantized format. Choose one."
        )
    if requantize:
        quantized.require_bitsandbytes("re-quantize merged weights (`requantize=True`)")
    methods = [m for m in _methods(model, method) if m.mergeable]
    layers = {p: layer for m in methods for p, layer in m.modules(model).items()}
    uncalled = [p for p in uncalled_layers(model) if p in layers]  # their adapters never ran: never folded
    if uncalled:
        warn_uncalled(uncalled, "merging")
    layers = {p: layer for p, layer in layers.items() if p not in uncalled}
    merged = {}
    for path, layer in layers.items():  # everything is checked before anything changes
        unmergeable = [n for n, a in layer.adapters.items() if not a.mergeable]
        if unmergeable:
            why = "".join(f" ({r})" for n in unmergeable if (r := getattr(layer.adapters[n], "merge_refusal", None)))
            raise ValueError(f"Cannot merge {path!r}: its adapters {unmergeable} cannot be folded into a weight{why}.")
        if quantized.stores_quantized(layer.base_layer) and dtype is None and not requantize:
            refuse_quantized_merge(path, layer)
    for path, layer in layers.items():
        layer.unmerge()
        titles = "/".join(sorted({get_method(a.method).title for a in layer.adapters.values()}))
        with full_parameters(layer), torch.no_grad():  # one layer gathered at a time when sharded
            state = layer.merged_state()
            for tensor in state.values():
                check_finite(f"{titles} into {path!r}", tensor)
        # a sharded base keeps only its own slice of the merged weight until everything is checked
        merged[path] = {key: shard_as(_base_tensor(layer.base_layer, key), t) for key, t in state.items()}
    errors = {}
    for path in uncalled:
        _restore_base(model, path)
    for path, layer in layers.items():
        state = merged.pop(path)
        if set(state) <= {"weight", "bias"} and (dtype is not None or quantized.stores_quantized(layer.base_layer)):
            base, error = write_merged(layer, state["weight"], state.get("bias"), dtype, requantize)
        else:
            layer.write_state(state)
            base, error = layer.base_layer, None
        replace_module(model, path, base)
        if error is not None:
            errors[path] = error
    for m in methods:
        _after_removal(model, m, None)
    if dtype is not None:
        dequantized = dequantize_model(model, dtype)
        log.info(
            "%s is now a plain %s model (%d quantized layer(s) dequantized).", type(model).__name__, dtype, dequantized
        )
    log_requantization(model, errors)
    if layers:
        log.info("Merged %d layer(s) of %s.", len(layers), type(model).__name__)
    return model


def _restore_base(model: nn.Module, path: str) -> None:
    """Put the base layer of the adapted layer at ``path`` back, unchanged (its merged adapters taken out first)."""
    layer = model.get_submodule(path)
    layer.unmerge()
    replace_module(model, path, layer.base_layer)


def unload(model: nn.Module, method: str | None = None, adapter_name: str | None = None) -> nn.Module:
    """Take PEFT modules out without merging: the base model comes back unchanged (in place).

    Args:
        model: the adapted model.
        method: only this method's modules; by default every method's.
        adapter_name: only this adapter's modules; by default all.
    """
    check_module("model", model)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    for m in _methods(model, method):
        for layer in m.modules(model, adapter_name).values():
            if isinstance(layer, AdaptedLayer):
                layer.unmerge()
        m.remove(model, adapter_name)
        _after_removal(model, m, adapter_name)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the ``with`` block: every adapter, adapter module and prompt skipped.

    Example::

        >>> import torch, torch.nn as nn
        >>> from peft_callbacks.methods.lora import LoRAConfig
        >>> net = inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LoRAConfig(rank=2))
        >>> _ = nn.init.ones_(net[0].adapters["default"].lora_B.weight)
        >>> x = torch.randn(3, 4)
        >>> with disabled(net):
        ...     base = net(x)
        >>> torch.equal(base, net[1](net[0].base_layer(x))), torch.equal(base, net(x))
        (True, False)
    """
    modules = [
        m for m in check_module("model", model).modules() if isinstance(m, PEFTModule) and hasattr(m, "disabled")
    ]
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.disabled = was


def replay(model: nn.Module, records: list[dict[str, Any]]) -> nn.Module:
    """Apply recorded surgeries (from :func:`~peft_callbacks.core.recipe.surgery_records` or an adapter file).

    Every record is parsed and checked before anything changes; the targets are exact module paths, so no pattern
    from a file is ever evaluated.

    Raises:
        TypeError/ValueError: a malformed record (the message names the field).
    """
    check_module("model", model)
    if not isinstance(records, list):
        raise TypeError(f"`records` must be a list of surgery records, got {type(records).__name__}.")
    parsed = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise TypeError(f"recipe[{index}] must be an object, got {type(record).__name__}.")
        method = get_method(_field(record, "method", str, index))
        config, targets = method.parse_record(_field(record, "config", dict, index))
        name = check_adapter_name(record.get("adapter_name", DEFAULT_ADAPTER))
        parsed.append((config, targets, name))
    with transaction(model):
        for config, targets, name in parsed:
            inject(model, config, adapter_name=name, targets=targets)
    return model


def _field(record: dict[str, Any], key: str, kind: type, index: int) -> Any:
    if key not in record:
        raise ValueError(f"recipe[{index}] has no {key!r}.")
    value = record[key]
    if not isinstance(value, kind):
        raise TypeError(f"recipe[{index}].{key} must be a {kind.__name__}, got {type(value).__name__}.")
    return value
