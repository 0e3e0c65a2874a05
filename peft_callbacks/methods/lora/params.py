r"""LoRA on parameters: low-rank factors per expert for the fused 3-D weights of mixture-of-experts blocks.

transformers keeps the experts of a mixture-of-experts block as one parameter per projection, e.g. ``gate_up_proj`` of
shape ``(E, 2·I, H)`` (``(experts, out, in)``; ``(experts, in, out)`` where the module says ``is_transposed``), and
indexes it per routed token. ``LoRAConfig(target_parameters=[...])`` adapts such parameters as HF PEFT's
``target_parameters`` does: expert ``e`` gets its own ``A_e`` (``r × in``) and ``B_e`` (``out × r``), held in PEFT's
layout so that tensors move between the two unchanged::

    lora_A.<param>.weight: (E·r, in)     rows  e·r … e·r+r−1 are A_e
    lora_B.<param>.weight: (out, E·r)    columns i·E + e      are B_e

    W_e' = W_e + s · B_e · A_e           (for every expert at once: one batched matmul, W + s·[B_e]·[A_e])

The module's own forward runs with ``W'`` in place of ``W`` (:class:`~peft_callbacks.engine.AdaptedParameters`), so
routing, activation and the experts implementation are untouched; merging writes ``W'`` into the parameter. A 2-D
parameter is one "expert" (a plain ``(out, in)`` weight). As in PEFT, dropout, DoRA and PiSSA/OLoRA are not defined
here (dropout cannot be factored out of ``W'x``). The adapter's :attr:`~peft_callbacks.engine.scaling.Scalable.scale`
multiplies ``s`` (``W + scale·s·B·A``, linear; absorbed into ``B``).

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine import AdaptedParameters
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> class Experts(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.down_proj = nn.Parameter(torch.randn(4, 8, 16))  # (experts, out, in)
    ...     def forward(self, x, expert):
    ...         return x @ self.down_proj[expert].T
    >>> experts = Experts()
    >>> lora = ParameterLoRA(experts, LoRAConfig(rank=2), parameter_names=["down_proj"])
    >>> tuple(lora.lora_A["down_proj"].weight.shape), tuple(lora.lora_B["down_proj"].weight.shape)
    ((8, 16), (8, 8))
    >>> layer = AdaptedParameters(experts)
    >>> layer.add_adapter("default", lora)
    >>> x = torch.randn(3, 16)
    >>> torch.equal(layer(x, 1), experts(x, 1))  # B = 0 at injection
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from peft_callbacks.engine.parameters import AdaptedParameters, ParameterAdapter
from peft_callbacks.methods.lora.config import check_parameter_options

if TYPE_CHECKING:
    from peft_callbacks.methods.lora.method import LoRAConfig

__all__ = ["LowRankParameters", "ParameterLoRA"]


class LowRankParameters(ParameterAdapter):
    """What LoRA on parameters shares: ``W' = W + s · lhs @ rhs`` for each adapted parameter, from :meth:`factors`.

    Subclasses set ``lora_scaling`` and implement :meth:`factors` and ``store_scale``.
    """

    lora_scaling: float = 1.0

    absorbs_scale = True

    @property
    def scaling(self) -> float:
        """``alpha / r`` (or ``alpha / √r``) times :attr:`scale`."""
        return self.lora_scaling * self.scale

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)`` with ``ΔW = s · lhs @ rhs`` shaped like parameter ``name``."""
        raise NotImplementedError

    def reset_factors(self, lora_A: nn.Linear, lora_B: nn.Linear, init: str, r: int) -> None:
        """``A`` kaiming-uniform (``init="gaussian"``: normal with std ``1/r``), ``B`` zeros, as PEFT starts them."""
        if init == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)

    def adapted_parameter(self, layer: AdaptedParameters, name: str, value: torch.Tensor) -> torch.Tensor:
        lhs, rhs = (t.to(value.dtype) for t in self.factors(name))
        if value.dim() == 2:
            return torch.addmm(value, lhs, rhs, alpha=self.scaling)
        with torch.autocast(device_type=value.device.type, enabled=False):  # W' keeps W's dtype, as PEFT's fold
            return torch.baddbmm(value, lhs, rhs, alpha=self.scaling)

    def delta(self, name: str) -> torch.Tensor:
        """``s · lhs @ rhs`` in float32, shaped like the parameter."""
        lhs, rhs = (t.float() for t in self.factors(name))
        return (lhs @ rhs) * self.scaling

    def delta_weights(self, layer: AdaptedParameters | None = None) -> dict[str, torch.Tensor]:
        """``{parameter: s · lhs @ rhs}`` (no ``layer`` needed)."""
        return {name: self.delta(name) for name in self.parameter_names}

    def update_norm(self, layer: AdaptedParameters | None = None, *, squared: bool = False) -> torch.Tensor:
        """``‖ΔW‖_F`` over every expert of every parameter from per-expert ``r × r`` Gram matrices."""
        square = torch.zeros(())
        for name in self.parameter_names:
            lhs, rhs = (t.float() for t in self.factors(name))  # (…, out, r), (…, r, in)
            gram = lhs.transpose(-2, -1) @ lhs * (rhs @ rhs.transpose(-2, -1))  # (…, r, r) ⊙ (…, r, r)
            square = square.to(gram.device) + gram.sum() * self.scaling**2
        return square if squared else square.clamp_min(0).sqrt()

    def merge_parameter_into(self, layer: AdaptedParameters, name: str, value: torch.Tensor) -> torch.Tensor:
        return value + self.delta(name)

    def unmerge_parameter_from(self, layer: AdaptedParameters, name: str, value: torch.Tensor) -> torch.Tensor:
        return value - self.delta(name)


class ParameterLoRA(LowRankParameters):
    """LoRA factors for named 2-D or 3-D parameters of one module (see the module docstring).

    Args:
        base_layer: the module owning the parameters (e.g. transformers' ``Qwen3MoeExperts``).
        config: a :class:`~peft_callbacks.methods.lora.LoRAConfig`.
        parameter_names: the parameters to adapt, in the module's own order.

    Example::

        >>> from peft_callbacks.methods.lora import LoRAConfig
        >>> experts = nn.Module()
        >>> experts.gate_up_proj = nn.Parameter(torch.randn(4, 6, 3))  # (experts, out, in)
        >>> lora = ParameterLoRA(experts, LoRAConfig(rank=2), parameter_names=["gate_up_proj"])
        >>> lora.features((4, 6, 3)), lora.delta("gate_up_proj").shape  # (experts, in, out); B = 0 at the start
        ((4, 3, 6), torch.Size([4, 6, 3]))
    """

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, parameter_names: Iterable[str]) -> None:
        super().__init__(base_layer, config, parameter_names)
        check_parameter_options(config)
        self.r = config.rank
        self.lora_alpha = config.alpha
        self.lora_scaling = config.alpha / (math.sqrt(config.rank) if config.use_rslora else config.rank)
        self.is_transposed = bool(getattr(base_layer, "is_transposed", False))
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.num_experts: dict[str, int] = {}
        own = dict(base_layer.named_parameters(recurse=False))
        for name in self.parameter_names:
            param = own[name]
            if param.dim() not in (2, 3):
                raise ValueError(
                    f"`parameter_names` entry {name!r} is a {param.dim()}-D parameter {tuple(param.shape)}; LoRA on "
                    f"parameters adapts 2-D weights and 3-D expert stacks."
                )
            experts, in_features, out_features = self.features(param.shape)
            dtype = param.dtype if param.is_floating_point() else None
            lora_A = nn.Linear(in_features, self.r * experts, bias=False, device=param.device, dtype=dtype)
            lora_B = nn.Linear(self.r * experts, out_features, bias=False, device=param.device, dtype=dtype)
            self.reset_factors(lora_A, lora_B, config.init, self.r)
            self.lora_A[name], self.lora_B[name] = lora_A, lora_B
            self.num_experts[name] = experts

    def features(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """``(experts, in_features, out_features)`` of a parameter of ``shape``."""
        if len(shape) == 2:
            return 1, shape[1], shape[0]  # (out, in), as nn.Linear
        experts, first, second = shape
        return (experts, first, second) if self.is_transposed else (experts, second, first)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)`` with ``ΔW = s · lhs @ rhs`` shaped like the parameter (batched over experts for 3-D)."""
        weight_A, weight_B = self.lora_A[name].weight, self.lora_B[name].weight
        if len(self.parameter_shapes[name]) == 2:
            return weight_B, weight_A  # (out, r) @ (r, in)
        experts = self.num_experts[name]
        lora_A = weight_A.reshape(experts, -1, weight_A.shape[-1])  # (E, r, in)
        lora_B = weight_B.reshape(weight_B.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r)
        if self.is_transposed:
            return lora_A.transpose(-2, -1), lora_B.transpose(-2, -1)  # (E, in, r) @ (E, r, out)
        return lora_B, lora_A  # (E, out, r) @ (E, r, in)

    def store_scale(self, scale: float) -> None:
        for lora_B in self.lora_B.values():
            lora_B.weight.mul_(scale)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}{tuple(self.parameter_shapes[n])}" for n in self.parameter_names)
        return f"r={self.r}, lora_alpha={self.lora_alpha:g}, parameters=[{shapes}]"
