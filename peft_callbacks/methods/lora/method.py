"""LoRA as a method of the engine: its config, its dispatch table, its HF PEFT mapping, and the LoRA functions.

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
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from peft_callbacks._validation import check_module
from peft_callbacks.core.heads import HeadInfo, find_head
from peft_callbacks.core.kinds import layer_kind
from peft_callbacks.core.model_kinds import ModelKind
from peft_callbacks.core.params import count_parameters
from peft_callbacks.engine import (
    DEFAULT_ADAPTER,
    AdaptedLayer,
    AdaptedParameters,
    LayerMethod,
    PeftMapping,
    disabled,
    get_method,
    inject,
    merge,
    register_method,
    replace_module,
    unload,
)
from peft_callbacks.engine.arguments import takes_settings
from peft_callbacks.engine.layers import Adapter
from peft_callbacks.engine.patterns import PerLayerSettings, resolve_rank_alpha
from peft_callbacks.methods.lora import interop
from peft_callbacks.methods.lora.config import LoRAConfig
from peft_callbacks.methods.lora.dora import DoRAConv, DoRAConv1D, DoRALinear
from peft_callbacks.methods.lora.embedding import LoRAEmbedding, check_plain_lora
from peft_callbacks.methods.lora.init import (
    DATA_INITS,
    ResidualLoRAConv,
    ResidualLoRAConv1D,
    ResidualLoRALinear,
    is_residual_init,
)
from peft_callbacks.methods.lora.layers import LoRAAdapter, LoRAConv, LoRAConv1D, LoRALinear
from peft_callbacks.methods.lora.mha import LoRAMultiheadAttention
from peft_callbacks.methods.lora.params import ParameterLoRA
from peft_callbacks.methods.lora.targets import group_parameters, parameter_at, select_parameters, split_targets
from peft_callbacks.methods.lora.tokens import TrainableTokens, insert_trainable_tokens, resolve_token_layers

__all__ = [
    "LoRAConfig",
    "count_parameters",
    "inject_lora",
    "lora_adapters",
    "lora_disabled",
    "lora_layers",
    "merge_lora",
    "unload_lora",
]


class LoRAMethod(PerLayerSettings, LayerMethod):
    """LoRA: ``W₀x + s·B·A·x`` on Linear, Conv and ``Conv1D`` layers and on bitsandbytes 4-/8-bit Linear layers
    (QLoRA) (DoRA when ``use_dora``, PiSSA/OLoRA with ``init``), on embeddings that ``target_modules`` names and on
    ``nn.MultiheadAttention`` (``in_proj`` and ``out_proj``), and ``W + s·B·A`` on the parameters
    ``target_parameters`` names (per expert for 3-D stacks)."""

    name = "lora"
    title = "LoRA"
    config_class = LoRAConfig
    existing_modules = "LoRA on {count} layer(s)"
    removal = "merge_lora(model) or unload_lora(model)"
    examples = {
        "plain": LoRAConfig(rank=4, alpha=8),
        "dora": LoRAConfig(rank=4, alpha=8, use_dora=True),
        "rslora-dropout": LoRAConfig(rank=4, alpha=8, use_rslora=True, dropout=0.1),
        "gaussian": LoRAConfig(rank=4, alpha=8, init="gaussian"),
        "pissa": LoRAConfig(rank=4, alpha=8, init="pissa"),
        "pissa-niter": LoRAConfig(rank=4, alpha=8, init="pissa_niter_2"),
        "olora": LoRAConfig(rank=4, alpha=8, init="olora"),
        "orthogonal": LoRAConfig(rank=4, alpha=8, init="orthogonal"),
        "bias": LoRAConfig(rank=4, alpha=8, bias="lora_only", lora_bias=True),
        "experts": LoRAConfig(rank=2, alpha=8, target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    }
    identity_tolerance = 1e-5  # PiSSA/OLoRA: the base weight becomes W - s·B·A, the identity holds up to rounding
    adapter_classes = {
        "linear": LoRALinear,
        "conv": LoRAConv,
        "hf_conv1d": LoRAConv1D,
        "linear_4bit": LoRALinear,  # QLoRA: the branch is added to the quantized layer's output
        "linear_8bit": LoRALinear,
        "embedding": LoRAEmbedding,  # only where target_modules names it (as in PEFT)
        "mha": LoRAMultiheadAttention,  # in_proj and out_proj, inside an AdaptedParameters
    }
    dora_classes = {
        "linear": DoRALinear,
        "conv": DoRAConv,
        "hf_conv1d": DoRAConv1D,
        "linear_4bit": DoRALinear,  # its norm reads the dequantized weight
        "linear_8bit": DoRALinear,
    }
    residual_classes = {
        "linear": ResidualLoRALinear,
        "conv": ResidualLoRAConv,
        "hf_conv1d": ResidualLoRAConv1D,
        "linear_4bit": ResidualLoRALinear,  # PiSSA/OLoRA: factors from the dequantized weight
        "linear_8bit": ResidualLoRALinear,
    }
    peft = PeftMapping(
        "LORA",
        interop.to_peft,
        interop.from_peft,
        keys=interop.KEYS,
        export_layer=interop.export_layer,
        import_layer=interop.import_layer,
        targets=interop.peft_targets,
    )

    def applies_to(self, config: LoRAConfig) -> ModelKind:
        """Layers outside the head; with ``target_parameters`` alone, models holding the parameters it names; with
        ``lora_bias``, models whose adapted layers all have a bias to merge ``lora_B``'s into (elsewhere the adapter
        trains, and merging is refused naming the layer)."""
        if config.init == "orthogonal":
            return self._every_target(config, _is_linear, "all of them linear (init='orthogonal')")
        if config.lora_bias:
            return self._every_target(config, _has_bias, "each with a bias (lora_bias merges into it)")
        if not config.target_parameters or config.target_modules is not None:
            return super().applies_to(config)

        def matches(model: nn.Module) -> bool:  # every pattern selects a parameter
            try:
                return bool(select_parameters(model, config.target_parameters))
            except ValueError:
                return False

        return ModelKind(f"models with 2-D/3-D parameters matching {config.target_parameters}", matches)

    def _every_target(self, config: LoRAConfig, fits: Callable[[nn.Module], bool], words: str) -> ModelKind:
        """Models with layers to adapt, every one of which ``fits`` (the layers ``config`` selects there)."""
        layers = super().applies_to(config)

        def matches(model: nn.Module) -> bool:
            targets = self.select(model, config, find_head(model)) if layers(model) else []
            return bool(targets) and all(fits(model.get_submodule(p)) for p in targets)

        return ModelKind(f"{layers.description}, {words}", matches)

    def adapter_class(self, kind: str, config: LoRAConfig) -> type[Adapter]:
        if kind not in self.dora_classes:
            check_plain_lora(kind, config)
            return self.adapter_classes[kind]
        if config.use_dora:
            return self.dora_classes[kind]
        return (self.residual_classes if is_residual_init(config.init) else self.adapter_classes)[kind]

    def all_adapter_classes(self) -> list[type[Adapter]]:
        return [
            *self.adapter_classes.values(),
            *self.dora_classes.values(),
            *self.residual_classes.values(),
            ParameterLoRA,
            TrainableTokens,
        ]

    # -- parameter targets beside module targets --------------------------------------------------------------
    def select(self, model: nn.Module, config: LoRAConfig, head: HeadInfo) -> list[str]:
        if config.init == "eva":  # replays (exact targets) skip select: their tensors are loaded afterwards
            raise ValueError(
                "`init`='eva' needs data: it takes A from the layers' inputs on a few batches. Call "
                "`eva_init(model, dataloader, config)` (peft_callbacks.methods.lora.eva), or use "
                "LoRACallback(init='eva'), which uses the training data; got no data here."
            )
        if config.init == "loftq":  # the base is quantized by LoftQ itself, or its original weights are needed
            raise ValueError(
                "`init`='loftq' quantizes the base (or needs its original weights): call "
                "`loftq_quantize(model, config)` on a full-precision model, or `loftq_init(model, original, config)` "
                "on a quantized one (peft_callbacks.methods.lora.loftq), or use LoRACallback(init='loftq')."
            )
        if config.init in DATA_INITS:
            entry = {
                "corda": "corda_init(model, dataloader, config)",
                "lora_ga": "lora_ga_init(model, loss_fn, config, batches=dataloader)",
            }[config.init]
            raise ValueError(
                f"`init`={config.init!r} needs data: it starts the factors from the layers' "
                f"{'inputs' if config.init == 'corda' else 'loss gradients'} on a few batches. Call `{entry}` "
                f"(peft_callbacks.methods.lora.{config.init.replace('_', '')}), or use LoRACallback(init="
                f"{config.init!r}), which uses the training data; got no data here."
            )
        only_parameters = config.target_modules is None and config.target_parameters
        modules = [] if only_parameters else super().select(model, config, head)
        parameters = select_parameters(model, config.target_parameters) if config.target_parameters else []
        both = [p for p in parameters if p.rpartition(".")[0] in modules]
        if both:
            raise ValueError(
                f"`target_parameters` selects {both[:3]}, whose modules `target_modules` adapts as layers too; "
                f"adapt each module one way (exclude it with `exclude_modules`, or narrow `target_parameters`)."
            )
        return modules + parameters

    def check_targets(self, model: nn.Module, targets: list[str]) -> list[str]:
        modules, parameters = split_targets(model, targets)
        if modules or not parameters:
            super().check_targets(model, modules)
        bad = [p for p in parameters if (found := parameter_at(model, p)) is None or found[3].dim() not in (2, 3)]
        if bad:
            raise ValueError(
                f"`targets` (from a recipe) names {bad[:5]}, neither a module nor a 2-D/3-D parameter of "
                f"{type(model).__name__}."
            )
        return targets

    def insert(self, model: nn.Module, targets: list[str], config: LoRAConfig, adapter_name: str) -> None:
        modules, parameters = split_targets(model, targets)
        for path in modules:  # attention reads its weights itself: its update goes into them (AdaptedParameters)
            if layer_kind(model.get_submodule(path)) == "mha":
                replace_module(model, path, AdaptedParameters(model.get_submodule(path)))
        if modules:
            super().insert(model, modules, config, adapter_name)
        if config.trainable_token_indices:
            insert_trainable_tokens(model, config.trainable_token_indices, config, adapter_name)
        for path, names in group_parameters(model, parameters).items():
            module = model.get_submodule(path)
            layer = module if isinstance(module, AdaptedParameters) else AdaptedParameters(module)
            param = getattr(layer.base_layer, names[0])
            with torch.device(param.device):
                layer.add_adapter(adapter_name, ParameterLoRA(layer.base_layer, config, parameter_names=names))
            if layer is not module:
                replace_module(model, path, layer)

    def resolve(self, model: nn.Module, config: LoRAConfig, targets: list[str]) -> LoRAConfig:
        """The per-layer ranks and alphas, and ``trainable_token_indices``, with exact module paths (checked against
        the model), for the recipe."""
        modules = split_targets(model, targets)[0]
        if config.init == "orthogonal":
            _refuse_orthogonal_off_linear(model, modules)
        if config.init == "loftq":  # a replayed recipe or adapter file: only onto the quantized base
            from peft_callbacks.methods.lora.loftq import check_loftq_targets

            check_loftq_targets(model, modules)
        config = resolve_rank_alpha(config, modules)  # the patterns set layers only
        if config.trainable_token_indices is None:
            return config
        tokens = resolve_token_layers(model, config.trainable_token_indices, targets)
        return config.replace(trainable_token_indices=tokens)

    def describe(self, config: LoRAConfig) -> str:
        variant = "DoRA " if config.use_dora else ""
        init = "" if config.init in ("default", "gaussian") else f" init={config.init}"
        return f"{variant}r={config.rank} alpha={config.alpha:g}{init}"


register_method(LoRAMethod())


@takes_settings(LoRAConfig, positional=3)
def inject_lora(model: nn.Module, config: LoRAConfig, *, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Wrap the selected layers of ``model`` with LoRA and freeze everything else (in place).

    ``inject(model, LoRAConfig(...))`` with :class:`LoRAConfig`'s fields as keywords (``rank``, ``alpha`` and
    ``dropout`` also by position); see :func:`peft_callbacks.engine.inject` for what happens.

    Args:
        model: a timm model, a transformers model, or any ``nn.Module``.
        adapter_name: the adapter's name (several adapters can share a model).

    Returns:
        ``model`` itself, modified in place.

    Raises:
        ValueError: bad hyper-parameters, a pattern that selects nothing, or a model that already has this adapter.
    """
    return inject(model, config, adapter_name=adapter_name)


def lora_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """``{path: AdaptedLayer}`` of every layer of ``model`` that holds a LoRA (or DoRA) adapter."""
    return get_method("lora").modules(check_module("model", model))


def lora_adapters(model: nn.Module) -> dict[str, LoRAAdapter]:
    """``{path: adapter}`` of every LoRA (or DoRA) adapter inside ``model``, keyed by its own module path
    (``"blocks.0.attn.qkv.adapters.default"``), for code that works on the factors (LoRA+, LoRA-Pro)."""
    return {path: m for path, m in check_module("model", model).named_modules() if isinstance(m, LoRAAdapter)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put the original layers back (in place).

    :func:`peft_callbacks.engine.merge` for LoRA: float32, finite-checked before any layer changes, original keys
    and module types afterwards, idempotent.
    """
    return merge(model, method="lora")


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every LoRA layer without merging: the base layers come back unchanged (in place)."""
    return unload(model, method="lora")


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the ``with`` block (:func:`peft_callbacks.engine.disabled`)."""
    with disabled(model):
        yield model


_LINEAR = ("linear", "hf_conv1d", "linear_4bit", "linear_8bit")  # the layers init='orthogonal' is defined for


def _is_linear(layer: nn.Module) -> bool:
    return layer_kind(layer) in _LINEAR


def _has_bias(layer: nn.Module) -> bool:
    return getattr(layer, "bias", None) is not None


def _refuse_orthogonal_off_linear(model: nn.Module, targets: list[str]) -> None:
    """``init='orthogonal'`` is PEFT's for linear layers only (it refuses convolutions too): name the convolutions
    (embeddings and attention say so for every init but the default, in their own words)."""
    others = [p for p in targets if layer_kind(model.get_submodule(p)) == "conv"]
    if others:
        raise ValueError(
            f"`init`='orthogonal' is defined for linear layers (HF PEFT refuses the others too); "
            f"{type(model).__name__} has {len(others)} convolution target(s): {others[:5]}. Leave them out of "
            f"`target_modules` (or add them to `exclude_modules`), or use init='default'."
        )
