r"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", §3.1): the update
in SVD form, so that rank can be moved between layers during training.

::

    h = W₀x + s/(r₀ + 1e-5) · P · Λ · Q · x      Q = lora_A: (r₀, in)    right singular vectors
                                                 Λ = lora_E: (r₀, 1)     singular values, start at 0
                                                 P = lora_B: (out, r₀)   left singular vectors
                                                 s = alpha,  r₀ = init_r (``ranknum``, fixed)

The adapter's :attr:`~peft_callbacks.engine.scaling.Scalable.scale` multiplies the factor ``s/(r₀ + 1e-5)``
(``W₀ + scale·ΔW``, linear; absorbed into ``Λ``, which keeps masked triplets at zero).

Each triplet ``(Pᵢ, λᵢ, Qᵢ)`` can be switched off by zeroing ``λᵢ``. The rank allocator
(:class:`~peft_callbacks.methods.adalora.allocator.RankAllocator`) scores every triplet from the sensitivity of its
tensors and zeroes the least important ones until the total rank meets a budget that shrinks from ``init_r`` to
``target_r`` per layer over the schedule (``tinit``, ``tfinal``, ``deltaT``, ``total_step``); an orthogonality
regulariser keeps ``P`` and ``Q`` near orthonormal. Under Lightning, :class:`~peft_callbacks.AdaLoRACallback` drives
both from its hooks; without a Trainer, call the allocator and add the regulariser yourself.

Tensors are kept in HF PEFT's names and shapes (convolutions flatten the kernel into ``Q``: ``(r₀, in·k…)``), so the
same tensors give the same outputs as ``peft.AdaLoraConfig`` and directories move between the two. Masked triplets are
exact zeros, so merging folds exactly what the forward computes.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine import inject, merge
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> x = torch.randn(2, 8)
    >>> before = net(x)
    >>> net = inject(net, AdaLoRAConfig(init_r=6, target_r=2, target_modules=["0", "2"], train_head=False))
    >>> ada = net[0].adapters["default"]
    >>> tuple(ada.lora_A.shape), tuple(ada.lora_E.shape), tuple(ada.lora_B.shape), ada.ranknum
    ((6, 8), (6, 1), (16, 6), 6.0)
    >>> torch.equal(net(x), before)  # λ = 0 at injection
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_float, check_int, check_positive_float, check_positive_int
from peft_callbacks.engine import AdaptedLayer, AdditiveAdapter, LayerConfig, LayerMethod, PeftMapping, register_method

__all__ = ["AdaLoRA", "AdaLoRAConfig", "check_schedule"]

RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoRAConfig(LayerConfig, method="adalora"):
    """AdaLoRA: SVD-form low-rank updates whose ranks a budget schedule allocates across layers.

    The schedule (PEFT's, Zhang et al. §3.3): for the first ``tinit`` steps every layer keeps ``init_r``; then the
    total budget falls cubically to ``target_r`` per layer until step ``total_step − tfinal``, masking every
    ``deltaT`` steps; the last ``tfinal`` steps fine-tune the final allocation.

    Attributes:
        init_r: the rank each layer starts with (> 0).
        target_r: the average rank per layer at the end (> 0, <= ``init_r``).
        alpha: ``lora_alpha`` (> 0); the update is scaled by ``alpha / (init_r + 1e-5)``.
        dropout: dropout on the branch input, in ``[0, 1)``.
        tinit: steps of warm-up before the budget starts falling (>= 0).
        tfinal: steps of final fine-tuning at the target budget (>= 0).
        deltaT: steps between two budget allocations (> 0).
        beta1: EMA factor of the sensitivity, in ``(0, 1)``.
        beta2: EMA factor of the uncertainty, in ``(0, 1)``.
        orth_reg_weight: weight of the orthogonality regulariser added to the loss (>= 0).
        total_step: the number of training steps of the schedule (> ``tinit + tfinal``); ``None`` lets
            :class:`~peft_callbacks.AdaLoRACallback` take the Trainer's ``estimated_stepping_batches``.

    Example::

        >>> AdaLoRAConfig(init_r=12, target_r=4, total_step=1000, tinit=100, tfinal=200).to_dict()["target_r"]
        4
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def validate(self) -> None:
        super().validate()
        check_positive_int("init_r", self.init_r)
        check_positive_int("target_r", self.target_r)
        if self.target_r > self.init_r:
            raise ValueError(
                f"`target_r` must be <= `init_r` (ranks only shrink), got target_r={self.target_r}, "
                f"init_r={self.init_r}."
            )
        self._set("alpha", check_positive_float("alpha", self.alpha))
        self._set("dropout", check_float("dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False))
        check_int("tinit", self.tinit, minimum=0)
        check_int("tfinal", self.tfinal, minimum=0)
        check_positive_int("deltaT", self.deltaT)
        for name in ("beta1", "beta2"):
            bounds = {"low": 0.0, "high": 1.0, "low_inclusive": False, "high_inclusive": False}
            self._set(name, check_float(name, getattr(self, name), **bounds))
        self._set("orth_reg_weight", check_float("orth_reg_weight", self.orth_reg_weight, low=0.0))
        if self.total_step is not None:
            check_schedule(self.total_step, self.tinit, self.tfinal)


def check_schedule(total_step: Any, tinit: int, tfinal: int) -> int:
    """Return ``total_step`` if the schedule leaves a budgeting phase: ``tinit < total_step − tfinal``.

    Example::

        >>> check_schedule(10, tinit=5, tfinal=5)
        Traceback (most recent call last):
        ...
        ValueError: `total_step`=10 leaves no budgeting phase: it must exceed tinit + tfinal = 10.
    """
    check_positive_int("total_step", total_step)
    if tinit >= total_step - tfinal:
        raise ValueError(
            f"`total_step`={total_step} leaves no budgeting phase: it must exceed tinit + tfinal = {tinit + tfinal}."
        )
    return total_step


class AdaLoRA(AdditiveAdapter):
    """The SVD-form triplets of one Linear, ``Conv1D`` or ``groups=1`` convolution.

    Args:
        base_layer: the layer to adapt.
        config: an :class:`AdaLoRAConfig`.

    Example::

        >>> ada = AdaLoRA(nn.Conv2d(3, 8, 3), AdaLoRAConfig(init_r=4, target_r=2))
        >>> tuple(ada.lora_A.shape), tuple(ada.lora_B.shape), ada.rank()  # Q flattens the kernel; Λ = 0: rank 0
        ((4, 27), (8, 4), 0)
    """

    def __init__(self, base_layer: nn.Module, config: AdaLoRAConfig) -> None:
        super().__init__(base_layer, config)
        weight, shape = base_layer.weight, self.weight_shape  # as stored (device, dtype); the full shape, unread
        if self.kind == "hf_conv1d":
            fan_in, out_features = shape  # Conv1D stores (in, out)
        else:
            out_features, fan_in = shape[0], math.prod(shape[1:])  # a kernel flattens into Q: (r, in·k…)
        r = config.init_r
        dtype = weight.dtype if weight.is_floating_point() else None
        self.lora_A = nn.Parameter(torch.empty(r, fan_in, device=weight.device, dtype=dtype))  # Q
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=weight.device, dtype=dtype))  # Λ
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=weight.device, dtype=dtype))  # P
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.ranknum = float(r)
        self.scaling = config.alpha
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    absorbs_scale = True

    @property
    def factor(self) -> float:
        """``alpha / (init_r + 1e-5)`` times :attr:`scale`: what the product ``P·Λ·Q`` is multiplied by."""
        return self.scaling / (self.ranknum + RANKNUM_EPS) * self.scale

    def store_scale(self, scale: float) -> None:
        self.lora_E.mul_(scale)

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        if self.kind == "conv":
            delta = (self.lora_B @ (self.lora_A * self.lora_E)).reshape(self.weight_shape) * self.factor
            update = layer.base_layer._conv_forward(x, delta, None)
        else:
            update = (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.factor  # (…, in) -> (…, out)
        return result + update.to(result.dtype)

    def delta_weight(self, layer: AdaptedLayer | None = None) -> torch.Tensor:
        """``s/(r₀+1e-5) · P·Λ·Q`` in float32, shaped like the stored base weight (no ``layer`` needed)."""
        delta = self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float()) * self.factor  # (out, in·k…)
        return delta.T if self.kind == "hf_conv1d" else delta.reshape(self.weight_shape)

    def rank(self) -> int:
        """The triplets in use: those whose singular value is not zero."""
        return int((self.lora_E.detach() != 0).sum())

    def extra_repr(self) -> str:
        return f"init_r={int(self.ranknum)}, lora_alpha={self.scaling:g}"


def _to_peft(config: AdaLoRAConfig, layers: dict[str, AdaptedLayer]) -> dict[str, Any]:
    if config.total_step is None:
        raise ValueError(
            "PEFT's AdaLoraConfig needs `total_step`; this adapter was injected without one (AdaLoRACallback sets it "
            "from the Trainer). Inject with AdaLoRAConfig(total_step=...) to export it."
        )
    return {
        "init_r": config.init_r,
        "target_r": config.target_r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "tinit": config.tinit,
        "tfinal": config.tfinal,
        "deltaT": config.deltaT,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight,
        "total_step": config.total_step,
        "rank_pattern": None,
        "fan_in_fan_out": any(a.kind == "hf_conv1d" for layer in layers.values() for a in layer.adapters.values()),
        "bias": "none",
        "init_lora_weights": True,
    }


def _from_peft(peft_config: dict[str, Any]) -> AdaLoRAConfig:
    used = [name for name in ("target_parameters",) if peft_config.get(name)]  # layers_to_transform: by tensors
    if peft_config.get("bias", "none") != "none":
        used.append(f"bias={peft_config['bias']!r}")
    if not peft_config.get("lora_alpha", 8) or peft_config.get("lora_alpha", 8) <= 0:
        used.append(f"lora_alpha={peft_config.get('lora_alpha')!r} (the scale then depends on each layer's rank)")
    if used:
        raise ValueError(f"uses PEFT AdaLoRA options that peft_callbacks does not support: {', '.join(used)}")
    names = [f.name for f in dataclasses.fields(AdaLoRAConfig)]
    fields = {k: peft_config[k] for k in names if k in peft_config and peft_config[k] is not None}
    fields.pop("target_modules", None)
    fields.pop("exclude_modules", None)
    return AdaLoRAConfig(
        **fields,
        alpha=peft_config.get("lora_alpha", 8),
        dropout=peft_config.get("lora_dropout") or 0.0,
        train_head=False,
    )


def _import_layer(peft_config: dict[str, Any], path: str, adapter: AdaLoRA, tensors: dict[str, torch.Tensor]) -> dict:
    """PEFT trims the triplets a rank pattern masked; put them back as zeros (an exact no-op) where they were."""
    kept = (peft_config.get("rank_pattern") or {}).get(f"{path}.lora_E")
    r = adapter.lora_A.shape[0]
    if kept is None or "lora_A" not in tensors or tensors["lora_A"].shape[0] == r:
        return tensors
    if not isinstance(kept, list) or len(kept) != r or sum(map(bool, kept)) != tensors["lora_A"].shape[0]:
        raise ValueError(f"rank_pattern[{path + '.lora_E'!r}] does not fit the stored tensors of {path!r}.")
    index = torch.tensor([i for i, keep in enumerate(kept) if keep], dtype=torch.long)
    out = {}
    for key, tensor in tensors.items():
        dim = 1 if key == "lora_B" else 0
        shape = list(tensor.shape)
        shape[dim] = r
        out[key] = torch.zeros(shape, dtype=tensor.dtype).index_copy_(dim, index, tensor)
    return out


class AdaLoRAMethod(LayerMethod):
    """AdaLoRA: SVD-form updates on Linear, ``Conv1D`` and convolution layers, ranks allocated during training."""

    name = "adalora"
    title = "AdaLoRA"
    config_class = AdaLoRAConfig
    # P and Q start at N(0, 0.02²) and Λ at 0: a larger alpha makes the first step's change measurable
    examples = {"plain": AdaLoRAConfig(init_r=4, target_r=2, alpha=32.0, dropout=0.1)}
    shardable = False  # its rank allocator reads every triplet and gradient whole
    adapter_classes = {
        "linear": AdaLoRA,
        "conv": AdaLoRA,
        "hf_conv1d": AdaLoRA,
        "linear_4bit": AdaLoRA,  # on a quantized base, as PEFT's AdaLoRA (its bnb layers)
        "linear_8bit": AdaLoRA,
    }
    peft = PeftMapping("ADALORA", _to_peft, _from_peft, import_layer=_import_layer)

    def describe(self, config: AdaLoRAConfig) -> str:
        return f"r={config.init_r}->{config.target_r} alpha={config.alpha:g}"


register_method(AdaLoRAMethod())
