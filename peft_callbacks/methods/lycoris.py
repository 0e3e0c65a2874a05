r"""What LoHa and LoKr share (the LyCORIS family, as HF PEFT's ``lycoris_utils``): settings, dropouts, forward, merge.

Both methods build a full-size update ``ΔW`` of the base weight from a few small tensors (a Hadamard product of two
low-rank matrices for LoHa, a Kronecker product for LoKr), scaled by ``alpha / rank``, and add what ``ΔW`` computes::

    h = W₀x + b + ΔW·x                       (Linear, transformers Conv1D)
    h = conv(x, W₀) + b + conv(x, ΔW)        (convolutions: the base layer's stride, padding, dilation)

During training two dropouts act on the update (as in PEFT, only in training mode): ``module_dropout`` skips the
whole update of a layer for one step, ``rank_dropout`` zeroes whole output rows of ``ΔW`` (LoHa rescales the kept
rows by the inverse of the kept fraction; LoKr only with ``rank_dropout_scale``). Random numbers are drawn in the
same order as PEFT does, so with the same seed both libraries drop the same rows.

``ΔW`` is built in PEFT's layout (``(out, in, *kernel)``), so transformers ``Conv1D`` layers (stored ``(in, out)``)
hold the same tensors as an ``nn.Linear`` of the same width; the merge transposes.

The adapter's :attr:`~peft_callbacks.engine.scaling.Scalable.scale` multiplies ``alpha / rank``: the layer computes
``W₀ + scale·ΔW``, linear in ``scale``; absorbing it scales the one factor the update is linear in (LoHa's
``hada_w2_b``, LoKr's ``W1``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_bool, check_float, check_positive_float, check_positive_int
from peft_callbacks.core.kinds import base_weight, conv_with_weight, is_hf_conv1d
from peft_callbacks.engine import AdaptedLayer, AdditiveAdapter, LayerConfig, LayerMethod, PeftMapping
from peft_callbacks.engine.patterns import PerLayerSettings, check_pattern_dict

__all__ = [
    "LycorisAdapter",
    "LycorisConfig",
    "LycorisMethod",
    "from_peft_fields",
    "kind_classes",
    "peft_layer_check",
    "peft_mapping",
    "to_peft_fields",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LycorisConfig(LayerConfig):
    """Settings LoHa and LoKr share (HF PEFT's names in brackets).

    Attributes:
        rank: the rank ``r`` of the low-rank factors (> 0) [``r``].
        alpha: scaling numerator (> 0); the update is multiplied by ``alpha / rank`` [``alpha``].
        rank_dropout: probability of zeroing each output row of the update during training, in ``[0, 1)``.
        module_dropout: probability of skipping a layer's whole update for one training step, in ``[0, 1)``.
        use_effective_conv2d: factor the kernel of convolutions with a kernel larger than 1 through a small core
            tensor (FedPara's "Proposition 3") instead of flattening it into the input dimension.
        rank_pattern: per-layer ranks, ``{key: rank}``, keys as in HF PEFT (a regex matched against the end of a
            module's path; :mod:`peft_callbacks.engine.patterns`) [``rank_pattern``]; recorded as exact paths.
        alpha_pattern: per-layer ``alpha``, ``{key: alpha}`` [``alpha_pattern``].
    """

    rank: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None

    def validate(self) -> None:
        super().validate()
        check_positive_int("rank", self.rank)
        self._set("alpha", check_positive_float("alpha", self.alpha))
        self._set(
            "rank_dropout", check_float("rank_dropout", self.rank_dropout, low=0.0, high=1.0, high_inclusive=False)
        )
        self._set(
            "module_dropout",
            check_float("module_dropout", self.module_dropout, low=0.0, high=1.0, high_inclusive=False),
        )
        check_bool("use_effective_conv2d", self.use_effective_conv2d)
        self._set("rank_pattern", check_pattern_dict("rank_pattern", self.rank_pattern, integer=True))
        self._set("alpha_pattern", check_pattern_dict("alpha_pattern", self.alpha_pattern, integer=False))


class LycorisAdapter(AdditiveAdapter):
    """A LoHa or LoKr update of one layer: subclasses create their tensors and say how they make ``ΔW``.

    Attributes:
        r, alpha, scaling: the rank, ``alpha`` and ``alpha / r`` times :attr:`scale`.
        out_features, in_features, kernel_size: the base layer's widths and kernel (``()`` for linear layers).
        effective_conv: the kernel is factored through a core tensor (``use_effective_conv2d`` on a conv whose
            kernel is larger than 1; PEFT ignores the option on 1×1 kernels, and so do we).
    """

    scale_rank_dropout: bool = True  # divide the kept rows by the kept fraction (LoKr: only with rank_dropout_scale)
    absorbs_scale = True

    def __init__(self, base_layer: nn.Module, config: LycorisConfig) -> None:
        super().__init__(base_layer, config)
        weight = base_weight(base_layer)
        self.r = config.rank
        self.alpha = config.alpha
        self.lycoris_scaling = config.alpha / config.rank
        self.rank_dropout = config.rank_dropout
        self.module_dropout = config.module_dropout
        if self.kind == "hf_conv1d":
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape[:2]
        self.kernel_size = tuple(weight.shape[2:])
        self.effective_conv = config.use_effective_conv2d and any(k != 1 for k in self.kernel_size)
        dtype = weight.dtype if weight.is_floating_point() else None
        for name, shape in self.parameter_shapes(config).items():
            setattr(self, name, nn.Parameter(torch.empty(shape, device=weight.device, dtype=dtype)))
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        """``alpha / rank`` times :attr:`scale`: what the update is multiplied by."""
        return self.lycoris_scaling * self.scale

    # -- what a method gives --------------------------------------------------------------------------------------
    def parameter_shapes(self, config: LycorisConfig) -> dict[str, tuple[int, ...]]:
        """``{tensor name: shape}`` in PEFT's names and shapes."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """PEFT's default initialisation: the update is zero at injection."""
        raise NotImplementedError

    def kernel_delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``ΔW`` (scaled) in PEFT's layout ``(out, in, *kernel)``, computed in ``dtype`` (default: the tensors')."""
        raise NotImplementedError

    def update_factor(self) -> torch.Tensor:
        """The tensor ``ΔW`` is linear in (scaled by :meth:`absorb_scale`)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------------
    def _core_shape(self) -> tuple[int, ...]:
        """The kernel dims of an effective-conv core tensor; PEFT keeps a Conv1d kernel as ``(k, 1)``."""
        return (*self.kernel_size, 1) if len(self.kernel_size) == 1 else self.kernel_size

    def kaiming_(self, *names: str) -> None:
        """PEFT's (and ``nn.Linear``'s) default initialisation for the named tensors: Kaiming-uniform, ``a = √5``."""
        for name in names:
            nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))

    def _tensor(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        tensor = getattr(self, name)
        return tensor if dtype is None else tensor.to(dtype)

    def _rank_dropout_mask(self, delta: torch.Tensor) -> torch.Tensor:
        keep = (torch.rand(delta.size(0)) > self.rank_dropout).to(delta.dtype)  # drawn on the CPU, as PEFT does
        if self.scale_rank_dropout and bool(keep.any()):  # every row dropped: no update (PEFT divides 0 by 0: NaN)
            keep = keep / keep.mean()
        return keep.view(-1, *[1] * (delta.dim() - 1)).to(delta.device)  # (out, 1, …): one value per output row

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # PEFT draws this number at every training forward, even at p = 0: drawing it too keeps the random streams
        # of both libraries aligned (the model's own dropout layers then drop the same units).
        if self.training and not bool(torch.rand(1) > self.module_dropout):
            return result
        delta = self.kernel_delta()  # (out, in, *kernel)
        if self.training and self.rank_dropout:
            delta = delta * self._rank_dropout_mask(delta)
        x = x.to(delta.dtype)
        if self.kind == "conv":
            return result + conv_with_weight(layer.base_layer, x, delta).to(result.dtype)
        if delta.dtype != result.dtype:
            return result + nn.functional.linear(x, delta).to(result.dtype)
        flat = result.reshape(-1, result.shape[-1])  # (N, out): one addmm adds x·ΔWᵀ onto the base output
        return torch.addmm(flat, x.reshape(-1, x.shape[-1]), delta.t()).view(result.shape)

    def _stored(self, delta: torch.Tensor) -> torch.Tensor:
        """``ΔW`` shaped like the stored base weight (transformers ``Conv1D`` stores ``(in, out)``)."""
        return delta.t() if self.kind == "hf_conv1d" else delta.reshape(self.weight_shape)

    def delta_weight(self, layer: AdaptedLayer | None = None) -> torch.Tensor:
        """``ΔW`` in float32, shaped like the stored base weight (no ``layer`` needed)."""
        return self._stored(self.kernel_delta(torch.float32))

    def store_scale(self, scale: float) -> None:
        self.update_factor().mul_(scale)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def kind_classes(adapter: type[LycorisAdapter], title: str) -> tuple[type[LycorisAdapter], ...]:
    """``adapter`` on each layer kind it adapts: its ``Linear``, ``Conv`` and ``Conv1D`` subclasses (one
    ``base_kind`` each, so a layer gets the class of its kind and ``isinstance`` tells them apart), named
    ``{title}Linear`` … in ``adapter``'s module."""
    docs = {
        "Linear": ("linear", f"{title} on an ``nn.Linear``."),
        "Conv": (
            "conv",
            f"{title} on ``nn.Conv1d/2d/3d`` (``groups=1``): ``ΔW`` is convolved with the base layer's stride, "
            f"padding and dilation. (HF PEFT's {title} has Conv1d and Conv2d.)",
        ),
        "Conv1D": (
            "hf_conv1d",
            f"{title} on transformers' ``Conv1D`` (GPT-2): the tensors of an ``nn.Linear`` of the same width; the "
            f"merge transposes ``ΔW`` to the stored ``(in, out)`` layout. (HF PEFT's {title} does not adapt "
            f"``Conv1D``.)",
        ),
    }
    return tuple(
        type(
            f"{title}{suffix}",
            (adapter,),
            {"base_kind": kind, "__doc__": doc, "__module__": adapter.__module__, "__qualname__": f"{title}{suffix}"},
        )
        for suffix, (kind, doc) in docs.items()
    )


class LycorisMethod(PerLayerSettings, LayerMethod):
    """What LoHa's and LoKr's methods share: the layer kinds (a subclass sets :attr:`adapter_classes` from
    :func:`kind_classes`) and the one-line description."""

    def describe(self, config: LycorisConfig) -> str:
        return f"r={config.rank} alpha={config.alpha:g}"


def peft_layer_check(title: str, layers: dict[str, AdaptedLayer], conv_dims: tuple[int, ...]) -> None:
    """Refuse an export that ``peft.PeftModel.from_pretrained`` could not load: HF PEFT's LoHa and LoKr adapt
    ``nn.Linear`` and convolutions with ``conv_dims`` spatial dims only (not transformers ``Conv1D``)."""
    refused = []
    for path, layer in layers.items():
        base = layer.base_layer
        if is_hf_conv1d(base) or (isinstance(base, nn.modules.conv._ConvNd) and len(base.kernel_size) not in conv_dims):
            refused.append(f"{path} ({type(base).__name__})")
    if refused:
        convs = " and ".join(f"nn.Conv{d}d" for d in conv_dims)
        raise ValueError(
            f"HF PEFT's {title} adapts nn.Linear and {convs} layers only, so peft.PeftModel.from_pretrained would "
            f"refuse this adapter: it also covers {', '.join(refused[:4])}{', …' if len(refused) > 4 else ''}. "
            f"Leave those layers out (`exclude_modules`) to export, or keep the adapter in this library's format "
            f"(save_adapter)."
        )


def to_peft_fields(config: LycorisConfig) -> dict[str, Any]:
    """The ``adapter_config.json`` fields PEFT's LoHa and LoKr share, for ``config``."""
    return {
        "r": config.rank,
        "alpha": config.alpha,
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
        "use_effective_conv2d": config.use_effective_conv2d,
        "init_weights": True,
        "rank_pattern": dict(config.rank_pattern or {}),  # exact layer paths, longest first
        "alpha_pattern": dict(config.alpha_pattern or {}),
    }


def from_peft_fields(peft_config: dict[str, Any], title: str) -> dict[str, Any]:
    """Our config's shared fields for a PEFT LoHa/LoKr config (``layers_to_transform``: the tensors name the
    layers it chose)."""
    return {
        "rank": peft_config.get("r", 8),
        "alpha": peft_config.get("alpha", 8),
        "rank_dropout": peft_config.get("rank_dropout") or 0.0,
        "module_dropout": peft_config.get("module_dropout") or 0.0,
        "use_effective_conv2d": bool(peft_config.get("use_effective_conv2d", False)),
        "rank_pattern": peft_config.get("rank_pattern") or None,
        "alpha_pattern": peft_config.get("alpha_pattern") or None,
        "train_head": False,
    }


def peft_mapping(
    peft_type: str, title: str, config_class: type[LycorisConfig], extra_fields: tuple[str, ...] = ()
) -> PeftMapping:
    """HF PEFT's format for LoHa or LoKr: the shared fields (:func:`to_peft_fields`, :func:`from_peft_fields`)
    plus ``extra_fields``, config fields PEFT stores under the same name (a missing one gets our default; a bool
    field reads as a bool). Exports on layers PEFT cannot load are refused (:func:`peft_layer_check`)."""
    defaults = {field.name: field.default for field in dataclasses.fields(config_class)}

    def to_peft(config: LycorisConfig, layers: dict[str, AdaptedLayer]) -> dict[str, Any]:
        peft_layer_check(title, layers, conv_dims=(1, 2))
        return {**to_peft_fields(config), **{name: getattr(config, name) for name in extra_fields}}

    def read(peft_config: dict[str, Any], name: str) -> Any:
        value = peft_config.get(name, defaults[name])
        return bool(value) if isinstance(defaults[name], bool) else value

    def from_peft(peft_config: dict[str, Any]) -> LycorisConfig:
        extra = {name: read(peft_config, name) for name in extra_fields}
        return config_class(**from_peft_fields(peft_config, title), **extra)

    return PeftMapping(peft_type, to_peft, from_peft)
