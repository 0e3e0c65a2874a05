"""A PEFT method as the engine sees it, and the registry of methods.

A method is one :class:`Method` object, registered once with :func:`register_method`. It names its config class and
says how to choose targets, put its modules in and take them out. Methods that adapt weight layers (LoRA, DoRA, IA3,
LoHa, …) are :class:`LayerMethod` objects: they only give a dispatch table from the base layer's kind
(:func:`~peft_callbacks.core.kinds.layer_kind`) to their :class:`~peft_callbacks.engine.layers.Adapter` class; target
selection, wrapping, merging and unloading are shared. Methods that insert modules elsewhere (bottleneck adapters
after sub-layers, soft prompts) subclass :class:`Method` and implement :meth:`~Method.select`, :meth:`~Method.insert`
and :meth:`~Method.remove`.

Everything else every method gets from the engine (:mod:`peft_callbacks.engine.surgery`): argument checks, freezing,
the task head, BatchNorm statistics, gradient checkpointing, the recipe that adapter files replay, adapter files,
slim checkpoints, the callbacks, and the HF PEFT format where the method declares a :class:`PeftMapping`.

Example::

    >>> from peft_callbacks.engine import get_method, registered_methods
    >>> "lora" in registered_methods()
    True
    >>> method = get_method("lora")
    >>> method.title, method.mergeable, sorted(method.adapter_classes)
    ('LoRA', True, ['conv', 'embedding', 'hf_conv1d', 'linear', 'linear_4bit', 'linear_8bit', 'mha'])
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks.core import quantized
from peft_callbacks.core.heads import HeadInfo
from peft_callbacks.core.kinds import NAMED_ONLY_KINDS, kinds_description, layer_kind
from peft_callbacks.core.model_kinds import ANY_MODEL, ModelKind, layers_outside_head
from peft_callbacks.core.modules import PEFTModule, modules_at
from peft_callbacks.core.targets import in_subtree, resolve_targets
from peft_callbacks.core.tensor_parallel import move_parallel_hooks
from peft_callbacks.engine.config import LayerConfig, MethodConfig
from peft_callbacks.engine.hooks import remove_hooks_of
from peft_callbacks.engine.layers import AdaptedLayer, Adapter

__all__ = [
    "LayerMethod",
    "Method",
    "ModuleMethod",
    "PeftMapping",
    "get_method",
    "peft_version",
    "register_method",
    "registered_methods",
]

log = logging.getLogger(__name__)

_METHODS: dict[str, Method] = {}


def peft_version(peft_config: dict[str, Any]) -> tuple[int, ...]:
    """The release of HF PEFT that wrote ``peft_config`` (an ``adapter_config.json``), as up to three numbers; ``()``
    where the file does not say (PEFT < 0.18 wrote no ``peft_version``). A dev version's commit hash is ignored.

    Example::

        >>> peft_version({"peft_version": "0.22.0"}), peft_version({"peft_version": "0.23.0.dev0@1a2b3c"})
        ((0, 22, 0), (0, 23, 0))
        >>> peft_version({})
        ()
    """
    written = str(peft_config.get("peft_version") or "").partition("@")[0].split(".")
    return tuple(int(v) for v in written[:3] if v.isdigit())


@dataclasses.dataclass(frozen=True)
class PeftMapping:
    """How a method's adapters map onto HF PEFT's directory format (``adapter_config.json`` + safetensors).

    Attributes:
        peft_type: PEFT's ``peft_type`` (``"LORA"``, ``"IA3"``, …).
        to_peft: ``(config, layers) -> dict``: the ``adapter_config.json`` fields for our config and adapted layers
            (``{path: AdaptedLayer}``); the format code adds ``peft_type``, ``target_modules`` and
            ``modules_to_save``.
        from_peft: ``(peft config dict) -> MethodConfig``: our config for a PEFT config (raising ``ValueError`` for
            options we do not support).
        keys: ``{our per-adapter key: PEFT's key}`` where they differ (``lora_magnitude_vector`` vs
            ``lora_magnitude_vector.weight`` …); PEFT's file keys are ``base_model.model.<path>.<PEFT key>``.

    The optional hooks below are for methods whose tensors are not one-to-one with PEFT's (each defaults to the
    renaming by ``keys``):

    Attributes:
        export_layer: ``(path, adapter) -> {PEFT key under the layer's path: tensor}`` (e.g. LoRA on parameters nests
            one PEFT wrapper per parameter, PiSSA leaves its frozen initial factors out).
        import_layer: ``(peft config, path, adapter, {PEFT key: tensor}) -> {our key: tensor}``, for the adapter just
            injected at ``path`` (it may fill tensors PEFT does not store from the adapter itself, or pad trimmed
            ones).
        export_shared: ``(config, {path: adapter}) -> {key: tensor}``: tensors stored once per model, under
            ``base_model.<key>`` (VeRA's projections).
        import_shared: ``(peft config, {path: adapter}, {key: tensor}) -> None``: check (or load) those tensors;
            raises ``ValueError`` when they cannot be held.
        targets: ``(model, peft config, module paths) -> targets``: the targets to inject for the modules that hold
            tensors in PEFT's file (e.g. the parameters a module's tensors adapt).
    """

    peft_type: str
    to_peft: Callable[[MethodConfig, dict[str, AdaptedLayer]], dict[str, Any]]
    from_peft: Callable[[dict[str, Any]], MethodConfig]
    keys: dict[str, str] = dataclasses.field(default_factory=dict)
    export_layer: Callable[[str, Adapter], dict[str, torch.Tensor]] | None = None
    import_layer: Callable[[dict[str, Any], str, Adapter, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = (
        None
    )
    export_shared: Callable[[MethodConfig, dict[str, Adapter]], dict[str, torch.Tensor]] | None = None
    import_shared: Callable[[dict[str, Any], dict[str, Adapter], dict[str, torch.Tensor]], None] | None = None
    targets: Callable[[nn.Module, dict[str, Any], list[str]], list[str]] | None = None


class Method:
    """A PEFT method: its config and how its modules go in and out (see the module docstring).

    Attributes:
        name: the registry key, stored in recipes (``"lora"``).
        title: the name in messages (``"LoRA"``).
        config_class: its :class:`~peft_callbacks.engine.config.MethodConfig` subclass.
        module_class: the class of the modules it inserts (found by ``isinstance``).
        mergeable: whether its update folds into the base weights.
        peft: its HF PEFT mapping, if PEFT has the method.
        starts_as_identity: whether the model computes exactly what it did until training moves the new tensors
            (prompts add tokens, so they do not).
        existing_modules: how messages name modules of this method already in a model.
        removal: the call that takes the method out again, for messages.
        examples: ``{name: config}``: small configs, one per variant of the method (DoRA, an init, …), that the
            contract test (``tests/test_contract.py``) runs on every model of its zoo; by default the default config.
        identity_tolerance: how far the injected model's outputs may be from the base model's (for methods that
            start as the identity), relative to the largest output.
        merge_tolerance: how far the merged model's outputs may be from the adapted model's, relative to the
            largest output.
        shardable: whether the method trains under a strategy that shards parameters (FSDP2); methods that need
            whole tensors (AdaLoRA's rank allocator) refuse it.
    """

    name: str = ""
    title: str = ""
    config_class: type[MethodConfig] = MethodConfig
    module_class: type[PEFTModule] = PEFTModule
    mergeable: bool = False
    peft: PeftMapping | None = None
    starts_as_identity: bool = True  # the model computes what it did until training moves the new tensors
    existing_modules: str = ""  # e.g. "LoRA on {count} layer(s)"; by default "<title> on {count} module(s)"
    removal: str = "unload(model)"  # the call that takes the method out again, for messages
    examples: dict[str, MethodConfig] = {}  # small configs, one per variant; empty: the default config
    identity_tolerance: float = 1e-6  # relative to the largest output
    merge_tolerance: float = 1e-4  # relative to the largest output
    shardable: bool = True

    def applies_to(self, config: MethodConfig) -> ModelKind:
        """The models the method goes into with ``config``: it refuses the others with a ``ValueError`` naming the
        model. By default every model."""
        return ANY_MODEL

    def example_configs(self) -> dict[str, MethodConfig]:
        """``{name: config}`` of :attr:`examples`, or ``{"default": config_class()}`` where none are declared."""
        return dict(self.examples) or {"default": self.config_class()}

    # -- what a method implements -------------------------------------------------------------------------------
    def select(self, model: nn.Module, config: MethodConfig, head: HeadInfo) -> list[str]:
        """The module paths to adapt, from the config's patterns (errors say what exists)."""
        return []

    def check_targets(self, model: nn.Module, targets: list[str]) -> list[str]:
        """Check recorded target paths (from a recipe) before replaying them: no pattern is evaluated."""
        modules_at(
            model,
            targets,
            lambda missing: ValueError(
                f"`targets` (from a recipe) names {len(missing)} module(s) that {type(model).__name__} does not "
                f"have: {missing[:5]}."
            ),
        )
        return targets

    def resolve(self, model: nn.Module, config: MethodConfig, targets: list[str]) -> MethodConfig:
        """The config to insert and record, with any other pattern it holds resolved to exact paths (e.g. IA3's
        ``feedforward_modules``), so a recipe never evaluates a pattern. By default ``config`` itself."""
        return config

    def insert(self, model: nn.Module, targets: list[str], config: MethodConfig, adapter_name: str) -> None:
        """Put the method's modules into ``model`` (already frozen) at ``targets``."""
        raise NotImplementedError

    def remove(self, model: nn.Module, adapter_name: str | None = None) -> None:
        """Take the method's modules (of one adapter name, or all) out of ``model``."""
        raise NotImplementedError

    def modules(self, model: nn.Module, adapter_name: str | None = None) -> dict[str, PEFTModule]:
        """``{path: module}`` of the method's inserted modules inside ``model``."""
        return {path: m for path, m in model.named_modules() if isinstance(m, self.module_class)}

    def trainable_extras(self, model: nn.Module, config: MethodConfig) -> list[nn.Module]:
        """Base modules the method trains besides its own (e.g. norms with ``train_norms``)."""
        return []

    def record(self, config: MethodConfig, targets: list[str]) -> dict[str, Any]:
        """What the recipe stores: the recorded config fields and the resolved targets."""
        return {**config.to_dict(), "targets": list(targets)}

    def parse_record(self, record: dict[str, Any]) -> tuple[MethodConfig, list[str] | None]:
        """Inverse of :meth:`record` (values checked as if a user had typed them)."""
        fields = dict(record)
        targets = fields.pop("targets", None)
        return self.config_class.from_dict(fields), _check_paths(targets)

    def describe(self, config: MethodConfig) -> str:
        """A few words for the log line (``"r=8 alpha=16"``)."""
        return ""

    def existing(self, count: int) -> str:
        """How messages name ``count`` modules of this method already in a model (``"LoRA on 12 layer(s)"``)."""
        return (self.existing_modules or f"{self.title} on {{count}} module(s)").format(count=count)


class LayerMethod(Method):
    """A method that wraps weight layers with :class:`~peft_callbacks.engine.layers.AdaptedLayer`.

    Attributes:
        adapter_classes: ``{layer kind: Adapter subclass}``; the kinds are those of
            :func:`~peft_callbacks.core.kinds.layer_kind`.
    """

    config_class: type[LayerConfig] = LayerConfig
    module_class = AdaptedLayer
    mergeable = True
    adapter_classes: dict[str, type[Adapter]] = {}

    def applies_to(self, config: MethodConfig) -> ModelKind:
        """Models with a layer of a kind the method adapts by default outside their task head."""
        return layers_outside_head(tuple(k for k in self.adapter_classes if k not in NAMED_ONLY_KINDS))

    def adapter_class(self, kind: str, config: MethodConfig) -> type[Adapter]:
        """The Adapter class for a base layer of ``kind`` (a variant may pick another, e.g. DoRA)."""
        return self.adapter_classes[kind]

    def all_adapter_classes(self) -> list[type[Adapter]]:
        """Every Adapter class this method can insert (variants included)."""
        return list(self.adapter_classes.values())

    def owns(self, adapter: nn.Module) -> bool:
        """Is ``adapter`` one of this method's?"""
        return isinstance(adapter, Adapter) and getattr(type(adapter), "method", None) == self.name

    def modules(self, model: nn.Module, adapter_name: str | None = None) -> dict[str, AdaptedLayer]:
        return {
            path: m
            for path, m in model.named_modules()
            if isinstance(m, AdaptedLayer)
            and any(self.owns(a) and adapter_name in (None, n) for n, a in m.adapters.items())
        }

    def select(self, model: nn.Module, config: MethodConfig, head: HeadInfo) -> list[str]:
        kinds = tuple(self.adapter_classes)
        selection = resolve_targets(
            model,
            config.target_modules,
            config.exclude_modules,
            protected=head.head if config.train_head else [],
            always_protected=head.all_paths,
            kind_filter=lambda kind: kind in kinds,
            method=self.title,
            supported=kinds_description(kinds),
        )
        targets = _once_per_module(model, selection.targets)
        if self.mergeable:
            tied = _tied(model, targets)
            named = config.target_modules not in (None, "all-linear")
            if tied and named:
                path, shared = next(iter(tied.items()))
                raise ValueError(
                    f"{self.title} on {path!r}: its weight is the same tensor as {', '.join(map(repr, shared))}'s "
                    f"(tied weights), so merging the update would change those layers too. Leave it out "
                    f"(exclude_modules={[path]!r}) or untie the weights before adapting it."
                )
            if tied:
                log.info(
                    "%s: left out %d layer(s) whose weight is tied to another layer's: %s",
                    self.title,
                    len(tied),
                    ", ".join(list(tied)[:8]),
                )
                targets = [p for p in targets if p not in tied]
        return targets

    def check_targets(self, model: nn.Module, targets: list[str]) -> list[str]:
        if not targets:
            raise ValueError(f"`targets` is empty: {self.title} needs at least one module path to adapt.")
        super().check_targets(model, targets)
        for path in targets:
            module = model.get_submodule(path)
            base = module.base_layer if isinstance(module, AdaptedLayer) else module
            if layer_kind(base) not in self.adapter_classes:
                raise ValueError(
                    f"the recipe puts {self.title} on {path!r}, a {type(base).__name__}; {self.title} adapts "
                    f"{kinds_description(tuple(self.adapter_classes))}."
                )
        return targets

    def shared(self, model: nn.Module, targets: list[str], config: MethodConfig, adapter_name: str) -> Any:
        """State shared by all the adapters of one injection (VeRA's random projections), handed to each adapter as
        ``shared=``; ``None`` (the default) for methods whose adapters are independent."""
        return None

    def create_adapter(
        self, model: nn.Module, path: str, base: nn.Module, config: MethodConfig, shared: Any
    ) -> Adapter:
        """One adapter for the base layer at ``path`` (override to pass per-layer choices, e.g. IA3's)."""
        adapter_type = self.adapter_class(layer_kind(base), config)
        return adapter_type(base, config) if shared is None else adapter_type(base, config, shared=shared)

    def insert(self, model: nn.Module, targets: list[str], config: MethodConfig, adapter_name: str) -> None:
        shared = self.shared(model, targets, config, adapter_name)
        for path in targets:
            module = model.get_submodule(path)
            layer = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module)
            base = layer.base_layer
            with torch.device(_device_of(base)):  # created where the base weight lives (free on `meta`)
                adapter = self.create_adapter(model, path, base, config, shared)
            layer.add_adapter(adapter_name, cast_adapter(adapter, base, config))
            if layer is not module:
                replace_module(model, path, layer)

    def remove(self, model: nn.Module, adapter_name: str | None = None) -> None:
        for path, layer in self.modules(model, adapter_name).items():
            for name in [n for n, a in layer.adapters.items() if self.owns(a) and adapter_name in (None, n)]:
                layer.delete_adapter(name)
            if not layer.adapters:
                replace_module(model, path, layer.base_layer)


class ModuleMethod(Method):
    """A method that inserts modules beside the model's own (a child plus forward hooks the module owns), instead of
    wrapping weight layers: bottleneck adapters, soft and visual prompts. Removing one takes its hooks out, wherever
    they were registered, and deletes the child.

    Attributes:
        one_per_model: the method holds one set of modules per model (prompts): only the default adapter name.
    """

    one_per_model: bool = False

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model the method cannot go into (the message says which models it supports)."""

    def select(self, model: nn.Module, config: MethodConfig, head: HeadInfo) -> list[str]:
        self.check_model(model)
        return []

    def modules(self, model: nn.Module, adapter_name: str | None = None) -> dict[str, PEFTModule]:
        if self.one_per_model and adapter_name not in (None, "default"):
            raise ValueError(f"{self.title} holds one set of modules per model: `adapter_name` must be 'default'.")
        return super().modules(model, adapter_name)

    def remove(self, model: nn.Module, adapter_name: str | None = None) -> None:
        for path, module in self.modules(model, adapter_name).items():
            remove_hooks_of(model, module)
            parent, _, name = path.rpartition(".")
            delattr(model.get_submodule(parent), name)

    def record(self, config: MethodConfig, targets: list[str]) -> dict[str, Any]:
        return super().record(config, targets) if targets else config.to_dict()


def cast_adapter(adapter: Adapter, base: nn.Module, config: MethodConfig) -> Adapter:
    """Put ``adapter``'s tensors in ``config.adapter_dtype``; on a quantized base layer in float32 by default (its
    stored weight is integer, and QLoRA trains the adapter in full precision around it)."""
    name = getattr(config, "adapter_dtype", None)
    if name is not None:
        return adapter.to(getattr(torch, name))
    if quantized.is_quantized(base):
        return adapter.to(torch.float32)
    return adapter


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` inside ``model``; it takes over the tensor-parallel layout hooks of the module it
    replaces (:func:`~peft_callbacks.core.tensor_parallel.move_parallel_hooks`)."""
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent)
    move_parallel_hooks(getattr(owner, name), new)
    setattr(owner, name, new)


def _device_of(base: nn.Module) -> torch.device:
    """Where a base layer's weight lives (for other modules: their first parameter)."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(iter(base.parameters()), torch.empty(0)).device


def _check_paths(targets: Any) -> list[str] | None:
    if targets is None:
        return None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"`targets` must be a list of module paths, got {type(targets).__name__}.")
    return targets


def _once_per_module(model: nn.Module, paths: list[str]) -> list[str]:
    """The first path of each module object: a module registered under two paths (a layer shared between blocks)
    is adapted once, and its adapter serves both uses."""
    seen: set[int] = set()
    out = []
    for path in paths:
        module = model.get_submodule(path)
        if id(module) not in seen:
            seen.add(id(module))
            out.append(path)
    return out


def _tied(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """``{target: [other layers holding the same weight tensor]}``: distinct modules sharing one weight."""
    owners: dict[int, dict[int, str]] = {}
    for path, module in model.named_modules():
        weight = module._parameters.get("weight") if not isinstance(module, PEFTModule) else None
        if weight is not None:
            owners.setdefault(id(weight), {}).setdefault(id(module), path)
    tied = {}
    for path in targets:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        others = [p for key, p in owners.get(id(base._parameters.get("weight")), {}).items() if key != id(base)]
        if others:
            tied[path] = others
    return tied


def register_method(method: Method) -> Method:
    """Register ``method`` under ``method.name``; its adapter classes learn the name.

    The config class names its method where it is declared (``class LoRAConfig(LayerConfig, method="lora")``), and
    that name must be ``method.name``. A name is taken once: registering another method under it is refused, as HF
    PEFT refuses it. The same method class registered again (its module re-imported, ``importlib.reload``) replaces
    the earlier object.

    Raises:
        ValueError: no name or title, a config class that names another method, or a name another method holds.

    Example::

        >>> from peft_callbacks.methods.lora.method import LoRAMethod
        >>> class Impostor(LoRAMethod):
        ...     pass
        >>> register_method(Impostor())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the method name 'lora' is taken by peft_callbacks.methods.lora.method.LoRAMethod; cannot ...
    """
    if not method.name or not method.title:
        raise ValueError(f"A method needs a name and a title, got {method.name!r} / {method.title!r}.")
    declared = method.config_class.method
    if declared != method.name:
        config = method.config_class.__name__
        raise ValueError(
            f"{_qualified(method)} is named {method.name!r}, but its config class {config} names method "
            f"{declared!r}; declare it as `class {config}(..., method={method.name!r})`."
        )
    taken = _METHODS.get(method.name)
    if taken is not None and _qualified(taken) != _qualified(method):
        raise ValueError(
            f"the method name {method.name!r} is taken by {_qualified(taken)}; cannot register {_qualified(method)} "
            f"under it: give it another name (and its config class method=...)."
        )
    _METHODS[method.name] = method
    for adapter_class in method.all_adapter_classes() if isinstance(method, LayerMethod) else []:
        adapter_class.method = method.name
    return method


def _qualified(method: Method) -> str:
    """``module.Class`` of a method object: the same after its module is imported again."""
    return f"{type(method).__module__}.{type(method).__qualname__}"


def _load_methods() -> None:
    importlib.import_module("peft_callbacks.methods")


def registered_methods() -> list[str]:
    """Names of every registered method."""
    _load_methods()
    return sorted(_METHODS)


def get_method(key: str | MethodConfig) -> Method:
    """The registered method for a name (``"lora"``) or a config instance.

    Raises:
        ValueError: no method of that name.
    """
    name = key.method if isinstance(key, MethodConfig) else key
    if name not in _METHODS:
        _load_methods()
    if name not in _METHODS:
        raise ValueError(f"Unknown PEFT method {name!r}; registered methods: {', '.join(sorted(_METHODS))}.")
    return _METHODS[name]


def method_of_module(module: nn.Module) -> Method | None:
    """The method that inserted ``module`` (an Adapter or a hook module), if any."""
    name = getattr(type(module), "method", None)
    return _METHODS.get(name) if isinstance(name, str) else None


def in_head(path: str, head: HeadInfo) -> bool:
    """Is ``path`` inside the task head?"""
    return in_subtree(path, head.head)
