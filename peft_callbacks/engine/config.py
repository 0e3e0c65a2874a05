"""Method configurations: the one place where each setting of a PEFT method is named, defaulted, checked and saved.

A method's config is a frozen dataclass. Each field has a docstring line in the class's ``Attributes``, a default,
and one check in :meth:`MethodConfig.validate` that names the field, the value received and what is allowed. The
same object is what a callback hands to the surgery, what the recipe of an adapter file stores
(:meth:`~MethodConfig.to_dict`) and what replaying that file rebuilds (:meth:`~MethodConfig.from_dict`); a field marked
``recorded=False`` (say a tokenizer used only to initialise a prompt) is used at injection time and not saved.

Example::

    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> config = LoRAConfig(rank=4, alpha=8)
    >>> config.to_dict()["rank"], LoRAConfig.from_dict(config.to_dict()) == config
    (4, True)
    >>> LoRAConfig(rank=0)
    Traceback (most recent call last):
    ...
    ValueError: `rank` must be an int >= 1, got 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from peft_callbacks._validation import check_bool, check_choice, check_patterns
from peft_callbacks.engine.arguments import shared_settings
from peft_callbacks.engine.patterns import check_layer_indices

__all__ = ["ADAPTER_DTYPES", "LayerConfig", "MethodConfig", "not_recorded"]

ADAPTER_DTYPES = ("float32", "bfloat16", "float16")


def not_recorded(default: Any = None) -> Any:
    """A dataclass field used at injection time only: not saved in recipes, adapter files or callback state."""
    return dataclasses.field(default=default, metadata={"recorded": False}, compare=False)


@shared_settings
@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Settings every PEFT method shares. Subclasses add their own fields and extend :meth:`validate`, and name
    their method where they are declared (``class LoRAConfig(LayerConfig, method="lora")``): the name
    :func:`~peft_callbacks.engine.register_method` checks and :func:`~peft_callbacks.engine.get_method` looks up.

    Attributes:
        train_head: keep the model's task head (``get_classifier()``, the transformers task head) fully trainable.
        train_bn: let BatchNorm layers outside the head train (weights and running statistics). By default they stay
            frozen, running statistics included, so the frozen base really is unchanged.
    """

    method: ClassVar[str] = ""  # the method's registry name, declared with the class (``method="lora"``)

    train_head: bool = True
    train_bn: bool = False

    def __init_subclass__(cls, method: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method is not None:
            if not isinstance(method, str) or not method:
                raise ValueError(f"{cls.__name__}: `method` must be a method's name (a non-empty str), got {method!r}.")
            cls.method = method

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``TypeError``/``ValueError`` naming the first bad one."""
        check_bool("train_head", self.train_head)
        check_bool("train_bn", self.train_bn)

    def _set(self, name: str, value: Any) -> None:
        """Normalise a field inside :meth:`validate` (e.g. an int ``alpha`` becomes a float)."""
        object.__setattr__(self, name, value)

    @classmethod
    def recorded_fields(cls) -> list[str]:
        """Names of the fields that recipes and checkpoints store."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("recorded", True)]

    def to_dict(self, *, all_fields: bool = False) -> dict[str, Any]:
        """The recorded fields as plain JSON values (lists, not tuples).

        Args:
            all_fields: also the fields used at injection time only (target patterns, a prompt's ``init``), where
                their value is plain data: what a callback's checkpoint state shows.
        """
        names = [f.name for f in dataclasses.fields(self)] if all_fields else self.recorded_fields()
        out = {name: _plain(getattr(self, name)) for name in names}
        return {name: value for name, value in out.items() if _is_plain(value)}

    @classmethod
    def from_dict(cls, data: Any) -> MethodConfig:
        """Rebuild a config from :meth:`to_dict`'s output, checking it as if a user had typed it.

        Raises:
            TypeError: ``data`` is not a dict, or a field has the wrong type.
            ValueError: an unknown field, or a value out of range.
        """
        if not isinstance(data, dict):
            raise TypeError(f"a {cls.__name__} must be stored as a dict of fields, got {type(data).__name__}.")
        known = set(cls.recorded_fields())
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    def replace(self, **changes: Any) -> MethodConfig:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)


@shared_settings
@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerConfig(MethodConfig):
    """Settings of methods that wrap weight layers (LoRA and its relatives): which layers to adapt.

    Attributes:
        target_modules: ``None`` (every supported layer outside the task head, so CNNs work too), ``"all-linear"``,
            a module name (exact or dotted suffix), a regex, or a list of these
            (see :mod:`peft_callbacks.core.targets`).
        exclude_modules: patterns of modules (and everything inside them) to leave alone.
        adapter_dtype: the dtype of the adapters' tensors: ``None`` keeps each base weight's dtype, and float32 on
            quantized (bitsandbytes) layers, as QLoRA does; ``"bfloat16"`` or ``"float16"`` halve their memory
            (e.g. to match a quantized layer's compute dtype), ``"float32"`` trains them in full precision around a
            half-precision base.
        layers_to_transform: adapt only the selected modules inside these numbered layers (an int or a list), as
            in HF PEFT: a module's layer is the first numbered segment of its path (``model.layers.3.mlp.up_proj``
            is in layer 3); a number no selected module is in is refused.
        layers_pattern: the name(s) before the layer number when the first numbered segment is not the layer
            (``"blocks"`` for timm's ``blocks.3.attn.qkv``, ``"h"`` for GPT-2); only with ``layers_to_transform``.
    """

    target_modules: str | list[str] | None = not_recorded()
    exclude_modules: str | list[str] | None = not_recorded()
    adapter_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    layers_to_transform: int | list[int] | None = not_recorded()
    layers_pattern: str | list[str] | None = not_recorded()

    def validate(self) -> None:
        super().validate()
        if self.adapter_dtype is not None:
            check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        if self.target_modules != "all-linear":
            self._set("target_modules", check_patterns("target_modules", self.target_modules))
        self._set("exclude_modules", check_patterns("exclude_modules", self.exclude_modules))
        self._set("layers_to_transform", check_layer_indices("layers_to_transform", self.layers_to_transform))
        self._set("layers_pattern", check_patterns("layers_pattern", self.layers_pattern))
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"`layers_pattern`={self.layers_pattern!r} needs `layers_to_transform` (the layer numbers to adapt), "
                f"got None."
            )


def _is_plain(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):  # e.g. {module path: token ids}
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return value is None or isinstance(value, (str, int, float, bool))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
