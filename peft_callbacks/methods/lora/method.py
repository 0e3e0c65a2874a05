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
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch.nn as nn

from peft_callbacks._validation import check_bool, check_float, check_module, check_positive_float, check_positive_int
from peft_callbacks.core.params import count_parameters
from peft_callbacks.engine import (
    AdaptedLayer,
    LayerConfig,
    LayerMethod,
    PeftMapping,
    disabled,
    get_method,
    inject,
    merge,
    register_method,
    unload,
)
from peft_callbacks.engine.layers import Adapter
from peft_callbacks.methods.lora.dora import DoRAConv, DoRAConv1D, DoRALinear
from peft_callbacks.methods.lora.layers import LoRAAdapter, LoRAConv, LoRAConv1D, LoRALinear

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(LayerConfig):
    """LoRA (Hu et al. 2021) and its variants rsLoRA and DoRA.

    Attributes:
        rank: the rank ``r`` of the update (> 0; Hu et al. §4.1).
        alpha: ``lora_alpha`` (> 0); ``scaling = alpha / rank`` (or ``alpha / sqrt(rank)`` with ``use_rslora``).
        dropout: dropout on the LoRA branch input, in ``[0, 1)``.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)`` (Kalajdzievski 2023).
        use_dora: weight-decomposed LoRA (DoRA, Liu et al. 2024): a trainable magnitude per output unit on top of
            the low-rank direction update.

    Example::

        >>> config = LoRAConfig(rank=8, alpha=16, target_modules=["qkv"])
        >>> config.to_dict()["alpha"], config.target_modules  # patterns are used, the exact targets recorded
        (16.0, ['qkv'])
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False

    def validate(self) -> None:
        super().validate()
        check_positive_int("rank", self.rank)
        self._set("alpha", check_positive_float("alpha", self.alpha))
        self._set("dropout", check_float("dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False))
        check_bool("use_rslora", self.use_rslora)
        check_bool("use_dora", self.use_dora)


def _to_peft(config: LoRAConfig, layers: dict[str, AdaptedLayer]) -> dict[str, Any]:
    return {
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": any(isinstance(a, LoRAConv1D) for layer in layers.values() for a in layer.adapters.values()),
        "bias": "none",
        "init_lora_weights": True,
    }


_UNSUPPORTED_PEFT = (
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
)


def _from_peft(peft_config: dict[str, Any]) -> LoRAConfig:
    used = [name for name in _UNSUPPORTED_PEFT if peft_config.get(name)]
    if peft_config.get("bias", "none") != "none":
        used.append(f"bias={peft_config['bias']!r}")
    if used:
        raise ValueError(f"uses PEFT LoRA options that peft_callbacks does not support: {', '.join(used)}")
    return LoRAConfig(
        rank=peft_config.get("r"),
        alpha=peft_config.get("lora_alpha"),
        dropout=peft_config.get("lora_dropout") or 0.0,
        use_rslora=bool(peft_config.get("use_rslora", False)),
        use_dora=bool(peft_config.get("use_dora", False)),
        train_head=False,
    )


class LoRAMethod(LayerMethod):
    """LoRA: ``W₀x + s·B·A·x`` on Linear, Conv and ``Conv1D`` layers, and on bitsandbytes 4-/8-bit Linear layers
    (QLoRA); DoRA when ``use_dora``."""

    name = "lora"
    title = "LoRA"
    config_class = LoRAConfig
    existing_modules = "LoRA on {count} layer(s)"
    removal = "merge_lora(model) or unload_lora(model)"
    adapter_classes = {
        "linear": LoRALinear,
        "conv": LoRAConv,
        "hf_conv1d": LoRAConv1D,
        "linear_4bit": LoRALinear,  # QLoRA: the branch is added to the quantized layer's output
        "linear_8bit": LoRALinear,
    }
    dora_classes = {
        "linear": DoRALinear,
        "conv": DoRAConv,
        "hf_conv1d": DoRAConv1D,
        "linear_4bit": DoRALinear,  # its norm reads the dequantized weight
        "linear_8bit": DoRALinear,
    }
    peft = PeftMapping("LORA", _to_peft, _from_peft, keys={"lora_magnitude_vector": "lora_magnitude_vector.weight"})

    def adapter_class(self, kind: str, config: LoRAConfig) -> type[Adapter]:
        return (self.dora_classes if config.use_dora else self.adapter_classes)[kind]

    def all_adapter_classes(self) -> list[type[Adapter]]:
        return [*self.adapter_classes.values(), *self.dora_classes.values()]

    def describe(self, config: LoRAConfig) -> str:
        return f"{'DoRA ' if config.use_dora else ''}r={config.rank} alpha={config.alpha:g}"


register_method(LoRAMethod())


def inject_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: str | list[str] | None = None,
    exclude_modules: str | list[str] | None = None,
    *,
    train_head: bool = True,
    train_bn: bool = False,
    use_rslora: bool = False,
    use_dora: bool = False,
    adapter_name: str = "default",
    adapter_dtype: str | None = None,
) -> nn.Module:
    """Wrap the selected layers of ``model`` with LoRA and freeze everything else (in place).

    ``inject(model, LoRAConfig(...))`` with the same arguments; see :class:`LoRAConfig` for each of them and
    :func:`peft_callbacks.engine.inject` for what happens.

    Args:
        model: a timm model, a transformers model, or any ``nn.Module``.
        rank: LoRA rank ``r`` (> 0).
        alpha: ``lora_alpha`` (> 0).
        dropout: dropout on the LoRA branch input, in ``[0, 1)``.
        target_modules: which layers to adapt; ``None`` (every Linear/Conv/``Conv1D``, quantized ones too, outside
            the head), ``"all-linear"``, names, regexes or a list (see :mod:`peft_callbacks.core.targets`).
        exclude_modules: patterns of modules to leave alone.
        train_head: keep the task head trainable.
        train_bn: let BatchNorm layers outside the head train; by default their running statistics stay frozen.
        use_rslora: scale by ``alpha / sqrt(rank)``.
        use_dora: DoRA (:mod:`peft_callbacks.methods.lora.dora`).
        adapter_name: the adapter's name (several adapters can share a model).
        adapter_dtype: dtype of the factors (``"float32"``, ``"bfloat16"``, ``"float16"``); ``None``: the base
            weight's dtype, float32 on quantized (bitsandbytes) layers.

    Returns:
        ``model`` itself, modified in place.

    Raises:
        ValueError: bad hyper-parameters, a pattern that selects nothing, or a model that already has this adapter.
    """
    return inject(model, LoRAConfig.from_arguments(locals()), adapter_name=adapter_name)


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
