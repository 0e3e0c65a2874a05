r"""Adapting the named parameters of a module, for modules that are not weight layers.

Some modules keep their weights as plain ``nn.Parameter`` tensors and read them inside their own forward: the fused
experts of transformers' mixture-of-experts blocks hold every expert in one 3-D tensor (``gate_up_proj`` of shape
``(experts, 2·intermediate, hidden)``) and index it per routed token. No output-side update can reproduce "the same
module with ``W + ΔW``" there, so these adapters change the parameter itself, for the duration of the forward::

    AdaptedParameters("model.layers.0.mlp.experts")
    ├── base_layer     the original module, kept as is (frozen), never copied
    └── adapters       one ParameterAdapter per adapter name, for one or more of its parameters

    forward(*args):    base_layer.forward(*args) run with each adapted parameter replaced by its adapted value
                       (torch.func.functional_call): every read of the parameter inside it sees W + ΔW

Merging writes ``W + ΔW`` into the parameter (float32, finite-checked, cast back once), exactly what the forward used.

Example::

    >>> import torch, torch.nn as nn
    >>> class Experts(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.randn(3, 4, 4))
    ...     def forward(self, x, index):
    ...         return torch.einsum("eoi,ni->no", self.w[index][None], x)
    >>> class Doubled(ParameterAdapter):
    ...     def adapted_parameter(self, layer, name, value):
    ...         return value * 2
    ...     def merge_parameter_into(self, layer, name, value):
    ...         return value * 2
    ...     def unmerge_parameter_from(self, layer, name, value):
    ...         return value / 2
    >>> from peft_callbacks.engine.config import MethodConfig
    >>> experts = Experts()
    >>> layer = AdaptedParameters(experts)
    >>> layer.add_adapter("default", Doubled(experts, MethodConfig(), parameter_names=["w"]))
    >>> x = torch.randn(2, 4)
    >>> torch.allclose(layer(x, 1), 2 * experts(x, 1)), tuple(layer.w.shape)  # attributes pass through
    (True, (3, 4, 4))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.engine.config import MethodConfig
from peft_callbacks.engine.layers import AdaptedLayer, Adapter

__all__ = ["AdaptedParameters", "ParameterAdapter"]

PARAMETERS_KIND = "parameters"


class ParameterAdapter(Adapter):
    """One method's update of named parameters of one module, under one adapter name.

    Subclasses create their tensors in ``__init__`` and implement :meth:`adapted_parameter` (differentiable, used by
    the forward) and, for merging, :meth:`merge_parameter_into` / :meth:`unmerge_parameter_from` (float32).

    Args:
        base_layer: the module that owns the parameters (read for shapes, device and dtype; not stored).
        config: the method's config.
        parameter_names: the names of the parameters of ``base_layer`` this adapter changes (its own, or dotted
            paths into its children such as ``"out_proj.weight"``, as ``named_parameters()`` gives them).

    Example::

        >>> ParameterAdapter(nn.Linear(2, 3), MethodConfig(), parameter_names=["weight"]).parameter_shapes
        {'weight': (3, 2)}
    """

    def __init__(self, base_layer: nn.Module, config: MethodConfig, parameter_names: Iterable[str]) -> None:
        super().__init__(base_layer, config)
        names = list(parameter_names) if isinstance(parameter_names, (list, tuple)) else None
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"`parameter_names` must be a non-empty list of names, got {parameter_names!r}.")
        own = dict(base_layer.named_parameters())
        missing = [n for n in names if n not in own]
        if missing:
            raise ValueError(
                f"`parameter_names` {missing} are not parameters of {type(base_layer).__name__}; it has {list(own)}."
            )
        self.parameter_names = tuple(names)
        self.parameter_shapes = {n: tuple(own[n].shape) for n in names}

    @classmethod
    def kind_of(cls, base_layer: Any) -> str | None:
        return PARAMETERS_KIND if isinstance(base_layer, nn.Module) else None

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return result  # the update lives in the parameters the base forward reads

    def adapted_parameter(self, layer: AdaptedParameters, name: str, value: torch.Tensor) -> torch.Tensor:
        """The value the base forward reads for parameter ``name``, given its value so far."""
        raise NotImplementedError

    def merge_parameter_into(self, layer: AdaptedParameters, name: str, value: torch.Tensor) -> torch.Tensor:
        """Parameter ``name`` (float32) with this adapter folded in."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base module.")

    def unmerge_parameter_from(self, layer: AdaptedParameters, name: str, value: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merge_parameter_into`."""
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged from its base module.")

    # -- the update ---------------------------------------------------------------------------------------------
    def delta_weight(self, layer: AdaptedLayer | None = None) -> torch.Tensor:
        raise TypeError(
            f"{type(self).__name__} changes parameters {list(self.parameter_names)}, not one weight; use "
            f"delta_weights(layer)."
        )

    def delta_weights(self, layer: AdaptedParameters) -> dict[str, torch.Tensor]:
        """``{parameter name: ΔP}`` at the current :attr:`scale`, float32, shaped like each parameter; by default
        ``merge_parameter_into(layer, name, P) − P``."""
        out = {}
        for name in self.parameter_names:
            value = layer.base_layer.get_parameter(name).float()
            out[name] = self.merge_parameter_into(layer, name, value) - value
        return out


class AdaptedParameters(AdaptedLayer):
    """A module plus adapters that change some of its parameters (see the module docstring).

    Attributes:
        base_layer: the wrapped original module.
        adapters: ``{adapter name: ParameterAdapter}``.

    Example::

        >>> layer = AdaptedParameters(nn.Linear(2, 3))
        >>> layer.adapted_names(), torch.equal(layer(torch.ones(1, 2)), layer.base_layer(torch.ones(1, 2)))
        ([], True)
    """

    @classmethod
    def check_base_layer(cls, base_layer: Any) -> None:
        if not isinstance(base_layer, nn.Module) or isinstance(base_layer, PEFTModule):
            raise TypeError(f"`base_layer` must be a module of the model, got {type(base_layer).__name__}.")

    def add_adapter(self, name: str, adapter: Adapter, *, active: bool = True) -> None:
        if not isinstance(adapter, ParameterAdapter):
            raise TypeError(f"`adapter` must be a ParameterAdapter here, got {type(adapter).__name__}.")
        super().add_adapter(name, adapter, active=active)

    def adapted_names(self, names: Iterable[str] | None = None) -> list[str]:
        """The parameters the adapters ``names`` (default: all) change, in the module's own order."""
        chosen = self.adapters.keys() if names is None else names
        wanted = {p for n in chosen for p in self.adapters[n].parameter_names}
        return [p for p, _ in self.base_layer.named_parameters() if p in wanted]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]
        adapters = [self.adapters[n] for n in active if self.adapters[n].scale != 0.0]  # scale 0: no change
        if not adapters:
            return self.base_layer(*args, **kwargs)
        values = {}
        for name in self.adapted_names():
            value = self.base_layer.get_parameter(name)
            for adapter in adapters:
                if name in adapter.parameter_names:
                    value = adapter.adapted_parameter(self, name, value)
            values[name] = value
        return torch.func.functional_call(self.base_layer, values, args, kwargs)

    # -- weights ----------------------------------------------------------------------------------------------
    def merged_state(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        names = list(self.active_adapters if names is None else names)
        state = {}
        for param in self.adapted_names(names):
            value = self.base_layer.get_parameter(param).float()
            for name in names:
                if param in self.adapters[name].parameter_names:
                    value = self.adapters[name].merge_parameter_into(self, param, value)
            state[param] = value
        return state

    def unmerged_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for param in self.adapted_names(self.merged_adapters):
            value = self.base_layer.get_parameter(param).float()
            for name in reversed(self.merged_adapters):
                if param in self.adapters[name].parameter_names:
                    value = self.adapters[name].unmerge_parameter_from(self, param, value)
            state[param] = value
        return state

    def tell_merged(self, names: list[str]) -> None:
        """Parameter adapters keep no state about the weight they were merged into."""

    def write_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in tensors.items():
                target = self.base_layer.get_parameter(name)
                target.copy_(value.to(target.dtype))

    def merged_weight(self, names: Iterable[str] | None = None) -> torch.Tensor:
        raise TypeError(
            f"{type(self.base_layer).__name__} has no single weight: its adapters change {self.adapted_names()}; "
            f"use merged_state()."
        )

    def merged_bias(self, names: Iterable[str] | None = None) -> torch.Tensor | None:
        return None

    def weight_names(self, names: Iterable[str] | None = None) -> list[str]:
        return self.adapted_names(names)
