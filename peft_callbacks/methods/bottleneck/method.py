"""Bottleneck adapters as a method of the engine: where they go, how they go in and out. Plain PyTorch.

Each adapter becomes a child called ``adapter`` (``adapter_<name>`` for a named second adapter) of the sub-layer it
follows (``blocks.0.mlp.adapter``), and a forward hook on that sub-layer passes its output through it. The sub-layer
keeps its type and the base model keeps all its ``state_dict`` keys, so code that looks for ``LlamaAttention`` or
loads a base checkpoint still works; attention modules that return tuples have only their first item (the hidden
states) adapted.

Example::

    >>> import timm, torch
    >>> model = timm.create_model("test_vit", pretrained=False, num_classes=5)
    >>> x = torch.randn(2, 3, 160, 160)
    >>> before = model(x)
    >>> model = inject_adapters(model, bottleneck=8, placement="pfeiffer")
    >>> torch.equal(model(x), before)  # up-projections start at zero
    True
    >>> sorted(adapter_layers(model))[:2]
    ['blocks.0.mlp.adapter', 'blocks.1.mlp.adapter']
    >>> remove_adapters(model) is model, len(adapter_layers(model))
    (True, 0)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch.nn as nn

from peft_callbacks._validation import check_bool, check_choice, check_module, check_patterns, check_positive_int
from peft_callbacks.core.heads import HeadInfo
from peft_callbacks.core.model_kinds import ANY_MODEL, ModelKind
from peft_callbacks.engine import MethodConfig, ModuleMethod, get_method, inject, not_recorded, register_method, unload
from peft_callbacks.engine.arguments import takes_settings
from peft_callbacks.engine.layers import DEFAULT_ADAPTER
from peft_callbacks.methods.bottleneck.layers import ACTIVATIONS, BottleneckAdapter
from peft_callbacks.methods.bottleneck.points import PLACEMENTS, find_insertion_points, match_modules, output_width

__all__ = ["BottleneckConfig", "adapter_layers", "inject_adapters", "is_norm_layer", "remove_adapters"]

ADAPTER_NAME = "adapter"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BottleneckConfig(MethodConfig, method="adapters"):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) after the sub-layers of transformer blocks.

    Attributes:
        bottleneck: bottleneck width ``m`` (> 0); each adapter has ``2·d·m + d + m`` parameters.
        placement: ``"houlsby"`` (after the attention and the MLP sub-layer of every block) or ``"pfeiffer"``
            (after the MLP only). Ignored when ``modules`` is given.
        activation: ``"gelu"``, ``"relu"``, ``"silu"`` or ``"tanh"``.
        modules: names, dotted suffixes or regexes of the sub-layers whose output passes through an adapter, for
            models whose blocks are not recognised (see :mod:`peft_callbacks.methods.bottleneck.points`).
        train_norms: also train every LayerNorm/RMSNorm (Houlsby et al. train them with the adapters).

    Example::

        >>> BottleneckConfig(bottleneck=16, placement="pfeiffer").to_dict()["placement"]
        'pfeiffer'
    """

    bottleneck: int = 64
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    modules: str | list[str] | None = not_recorded()
    train_norms: bool = False

    def validate(self) -> None:
        super().validate()
        check_positive_int("bottleneck", self.bottleneck)
        check_choice("placement", self.placement, PLACEMENTS)
        check_choice("activation", self.activation, ACTIVATIONS)
        self._set("modules", check_patterns("modules", self.modules))
        check_bool("train_norms", self.train_norms)


def is_norm_layer(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm / GroupNorm, including the transformers classes named ``*LayerNorm`` / ``*RMSNorm``.

    Example::

        >>> is_norm_layer(nn.LayerNorm(4)), is_norm_layer(nn.BatchNorm1d(4))
        (True, False)
    """
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _child_name(adapter_name: str) -> str:
    return ADAPTER_NAME if adapter_name == "default" else f"{ADAPTER_NAME}_{adapter_name}"


class BottleneckMethod(ModuleMethod):
    """Bottleneck adapters: a residual MLP on the output of attention / MLP sub-layers (not mergeable)."""

    name = "adapters"
    title = "Bottleneck adapters"
    config_class = BottleneckConfig
    module_class = BottleneckAdapter
    existing_modules = "{count} bottleneck adapter(s)"
    removal = "remove_adapters(model)"
    examples = {
        "houlsby": BottleneckConfig(bottleneck=4),
        "pfeiffer": BottleneckConfig(bottleneck=4, placement="pfeiffer", activation="relu", train_norms=True),
    }

    def applies_to(self, config: BottleneckConfig) -> ModelKind:
        """Models with transformer blocks of a known layout whose sub-layers end in a Linear projection (any model
        where ``modules`` names the places)."""
        if config.modules is not None:
            return ANY_MODEL

        def matches(model: nn.Module) -> bool:
            try:
                points = find_insertion_points(model, config.placement)  # blocks of the layouts in BLOCK_RULES
                return all(output_width(model.get_submodule(p), p) for p in points)
            except ValueError:
                return False

        return ModelKind(
            "models with transformer blocks of a layout it knows (peft_callbacks.methods.bottleneck.points) whose "
            "sub-layers end in a Linear projection",
            matches,
        )

    def modules(self, model: nn.Module, adapter_name: str | None = None) -> dict[str, BottleneckAdapter]:
        child = None if adapter_name is None else _child_name(adapter_name)
        return {
            path: m
            for path, m in model.named_modules()
            if isinstance(m, BottleneckAdapter) and child in (None, path.rpartition(".")[2])
        }

    def select(self, model: nn.Module, config: BottleneckConfig, head: HeadInfo) -> list[str]:
        if config.modules is None:
            return find_insertion_points(model, config.placement)
        return match_modules(model, config.modules)

    def insert(self, model: nn.Module, targets: list[str], config: BottleneckConfig, adapter_name: str) -> None:
        child = _child_name(adapter_name)
        found = [(path, model.get_submodule(path)) for path in targets]
        for path, target in found:
            if hasattr(target, child):
                raise ValueError(f"{path!r} already has an attribute {child!r}; cannot add an adapter to it.")
        for path, target in found:
            adapter = BottleneckAdapter(output_width(target, path), config.bottleneck, config.activation)
            weight = next(target.parameters(), None)
            if weight is not None:
                adapter.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
            target.add_module(child, adapter)
            target.register_forward_hook(adapter.hook)

    def trainable_extras(self, model: nn.Module, config: BottleneckConfig) -> list[nn.Module]:
        return [m for m in model.modules() if is_norm_layer(m)] if config.train_norms else []

    def record(self, config: BottleneckConfig, targets: list[str]) -> dict[str, Any]:
        return {**config.to_dict(), "modules": list(targets)}  # the key files of format 1 use

    def parse_record(self, record: dict[str, Any]) -> tuple[MethodConfig, list[str] | None]:
        fields = dict(record)
        targets = fields.pop("modules", None)
        return super().parse_record({**fields, "targets": targets})

    def describe(self, config: BottleneckConfig) -> str:
        return f"m={config.bottleneck}, {config.placement if config.modules is None else 'named modules'}"


register_method(BottleneckMethod())


def adapter_layers(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """``{path: adapter}`` of every bottleneck adapter inside ``model``.

    Example::

        >>> adapter_layers(nn.Linear(2, 2))
        {}
    """
    return get_method("adapters").modules(check_module("model", model))


@takes_settings(BottleneckConfig, positional=4)
def inject_adapters(model: nn.Module, config: BottleneckConfig, *, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Add bottleneck adapters after the sub-layers of each transformer block and freeze the rest (in place).

    ``inject(model, BottleneckConfig(...))`` with :class:`BottleneckConfig`'s fields as keywords (the first four also
    by position).

    Args:
        model: a timm ViT-family model, a transformers model (see :mod:`peft_callbacks.methods.bottleneck.points`
            for the blocks found automatically) or any ``nn.Module`` together with ``modules``.
        adapter_name: the adapter's name (several adapters can share a model).

    Returns:
        ``model`` itself, modified in place.

    Example::

        >>> import transformers as hf
        >>> from peft_callbacks.core.params import count_parameters
        >>> cfg = hf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=10)
        >>> gpt2 = inject_adapters(hf.GPT2LMHeadModel(cfg), bottleneck=4)
        >>> count_parameters(gpt2).trainable == 4 * (2 * 16 * 4 + 16 + 4)  # 2 blocks x 2 adapters
        True

    Raises:
        ValueError: bad hyper-parameters, no supported block (the message lists them), a ``modules`` entry that
            matches nothing, or a model that already has adapters.
    """
    return inject(model, config, adapter_name=adapter_name)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take every bottleneck adapter (and its hook) out of ``model``; the base model is as before (in place).

    Parameters keep the ``requires_grad`` the injection gave them; unfreeze what you want to train next.
    See the module docstring for an example.
    """
    return unload(model, method="adapters")
