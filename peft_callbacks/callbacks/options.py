"""What a PEFT callback does around its method, declared once, and the typed callback of a method's config.

Every PEFT callback takes the same options besides its method's settings: which adapter it trains, on which
submodule, whether it merges when training ends, where it writes the adapter and the merged model.
:class:`CallbackOptions` declares them once; :class:`~peft_callbacks.PEFTCallback` and every typed callback take them
as flat keywords next to the config's fields, with the types, defaults and docs declared here
(:func:`~peft_callbacks.engine.arguments.takes_settings`).

A typed callback is :class:`~peft_callbacks.PEFTCallback` with its method's config fields as ``__init__`` keywords,
which is what LightningCLI needs to check a YAML file line by line. :func:`typed_callback` makes one from a config
class: the class statement holds only its docstring (and any behaviour of its own).

Example::

    >>> import inspect
    >>> from peft_callbacks import LoRAConfig, PEFTCallback
    >>> @typed_callback(LoRAConfig)
    ... class MyLoRACallback(PEFTCallback):
    ...     '''LoRA, as a typed callback.'''
    >>> callback = MyLoRACallback(rank=4, merge_on_train_end=False)
    >>> callback.config.rank, callback.merge_on_train_end
    (4, False)
    >>> list(inspect.signature(MyLoRACallback).parameters)[:3]
    ['rank', 'alpha', 'dropout']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, TypeVar

from peft_callbacks._validation import check_adapter_name, check_bool, check_optional_str
from peft_callbacks.callbacks.verify import MergeCheck, check_verify
from peft_callbacks.engine import DEFAULT_ADAPTER, MethodConfig, get_method
from peft_callbacks.engine.arguments import takes_settings
from peft_callbacks.engine.precision import check_dtype

__all__ = ["CallbackOptions", "typed_callback"]

C = TypeVar("C", bound=type)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CallbackOptions:
    """The options every PEFT callback takes besides its method's settings.

    Attributes:
        adapter_name: the name of the adapter this callback trains (several can share a model; methods that hold
            one set of modules per model, the prompts, take only ``"default"``).
        module: dotted path of the submodule to adapt (``"model"``); by default every timm/transformers model found.
        merge_on_train_end: fold a mergeable method (LoRA, DoRA, …) into the base weights when training ends (on a
            quantized base only with ``merged_dtype``); methods that stay in the model (adapters, prompts) ignore it.
        save_adapter_to: directory for the adapter file (trained tensors + recipe), written when training ends,
            before the merge.
        save_merged_to: directory for the model's full weights, written when training ends, after the merge.
        merged_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: merge into a plain model of this dtype (every
            tensor cast, quantized layers dequantized; e.g. a bfloat16 model merged in float32, or a 4-bit base
            merged into bfloat16). ``None`` keeps each weight's dtype, and keeps adapters on quantized bases unmerged.
        verify: check the merge before it replaces the adapter: a ``MergeCheck(new_task=..., base_task=...,
            tolerance=...)`` scores the merged model against the adapted one on both tasks and keeps the adapter
            (saved, with a message) when a score moves by more than ``tolerance``. ``None``: no check, no cost.

    Example::

        >>> CallbackOptions(save_adapter_to="runs/adapter").merge_on_train_end
        True
        >>> CallbackOptions(merged_dtype="int8")
        Traceback (most recent call last):
        ...
        ValueError: `merged_dtype` must be None or one of 'float32', 'bfloat16', 'float16' (or the torch dtype), got \
str 'int8'.
    """

    adapter_name: str = DEFAULT_ADAPTER
    module: str | None = None
    merge_on_train_end: bool = True
    save_adapter_to: str | None = None
    save_merged_to: str | None = None
    merged_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    verify: MergeCheck | None = None

    def __post_init__(self) -> None:
        check_adapter_name(self.adapter_name)
        check_optional_str("module", self.module)
        check_bool("merge_on_train_end", self.merge_on_train_end)
        check_optional_str("save_adapter_to", self.save_adapter_to)
        check_optional_str("save_merged_to", self.save_merged_to)
        check_dtype("merged_dtype", self.merged_dtype)
        check_verify(self.verify)

    def check_for(self, config: MethodConfig) -> None:
        """Refuse options the method of ``config`` cannot have (another adapter name for a one-per-model method)."""
        method = get_method(config)
        if getattr(method, "one_per_model", False) and self.adapter_name != DEFAULT_ADAPTER:
            raise ValueError(
                f"{method.title} holds one set of modules per model: `adapter_name` must be {DEFAULT_ADAPTER!r}, "
                f"got {self.adapter_name!r}."
            )
        if self.verify is not None and not (method.mergeable and self.merge_on_train_end):
            why = "is not merged at the end" if method.mergeable else "stays in the model (it has no merge)"
            raise ValueError(
                f"`verify` checks the merge at the end of training, but {method.title} {why}: leave `verify=None`"
                + (", or set `merge_on_train_end=True`." if method.mergeable else ".")
            )


def typed_callback(config_class: type[MethodConfig], *extra: type) -> Callable[[C], C]:
    """Make the decorated subclass of :class:`~peft_callbacks.PEFTCallback` the typed callback of ``config_class``.

    Its ``__init__`` takes the fields of ``config_class``, then those of each ``extra`` settings dataclass, then
    :class:`CallbackOptions`, as keyword arguments typed, defaulted and documented as the dataclasses declare them
    (:func:`~peft_callbacks.engine.arguments.takes_settings`; the class docstring gains an ``Args`` entry each).
    A class without an ``__init__`` of its own gets one that builds the config and the options; a class with one
    writes it against the dataclasses, ``__init__(self, config: LoRAConfig, training: LoRATrainingOptions,
    options: CallbackOptions)``, and calls ``self._configure(config, options)``.

    Args:
        config_class: the method's config class (``LoRAConfig``).
        extra: further settings dataclasses the callback takes (``LoRATrainingOptions``).
    """

    def decorate(cls: C) -> C:
        if "__init__" not in cls.__dict__:
            cls.__init__ = _configuring_init(cls, config_class)  # type: ignore[misc]
        cls.config_class = config_class  # type: ignore[attr-defined]
        return takes_settings(config_class, *extra, CallbackOptions)(cls)

    return decorate


def _configuring_init(cls: type, config_class: type[MethodConfig]) -> Callable[..., None]:
    def __init__(self, config, options) -> None:  # noqa: ANN001 (annotated below, with the classes themselves)
        self._configure(config, options)

    __init__.__annotations__ = {"config": config_class, "options": CallbackOptions, "return": None}
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    __init__.__doc__ = f"The typed callback of {config_class.__name__}: its fields and the options as keywords."
    return __init__
