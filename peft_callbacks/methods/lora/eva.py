r"""EVA: LoRA's ``A`` from the principal components of each layer's inputs (Paischer et al. 2024, "One Initialization
to Rule them All: Fine-tuning via Explained Variance Adaptation"; HF PEFT's ``init_lora_weights="eva"``).

A few batches go through the frozen base model; for each adapted layer the inputs ``x`` (one row per token, padding
and ``labels == -100`` left out as PEFT does) give the covariance ``C = cov(x)`` and its eigenvectors::

    C = V Λ Vᵀ                      (in, in), λ₁ ≥ λ₂ ≥ …
    A₀ = Vᵀ[:k]                      (k, in)   the top-k input directions     (whitened: Vᵀ[:k] / (λ·(n−1))^¼)
    B₀ = 0                           (out, k)  so the model starts as the base

**Ranks** are redistributed by explained variance, as PEFT's ``EvaConfig(rho)``: each layer offers its top
``round(ρ·r)`` components, all layers' explained-variance ratios ``λᵢ / tr C`` are ranked together, and the best ``Σ r``
of them are kept: a layer gets ``k`` components, ``0 ≤ k ≤ ρ·r`` (``ρ = 1``: every layer keeps ``r``). PEFT then stores
each layer at its own rank ``k`` with ``alpha·k/r`` (so the scaling stays ``alpha/r``). Here every layer is stored at
rank ``R = round(ρ·r)`` with ``alpha·R/r`` (the same scaling ``alpha/r``) and its ``R − k`` unused rows of ``A`` and
columns of ``B`` zero: such a row/column pair gets no gradient (each one's gradient is a product with the other), so it
stays zero under any optimizer and the adapter computes, and trains, as PEFT's rank-``k`` one. The recorded config is
that uniform one (``rank=R``, ``alpha·R/r``, ``init="eva"``), so adapter files reload and merge exactly.

**Against PEFT.** PEFT runs an incremental, randomised PCA (``torch.svd_lowrank``, seed 42) over the batches until
consecutive estimates agree to a cosine of ``tau`` (0.99), cycling the batches if needed; here the covariance of the
``eva_batches`` probe batches is accumulated (each batch's centred product in float32, the totals in float64) and
decomposed exactly once. On one batch the two agree to rounding (up to each component's sign, which changes nothing:
``B = 0``) wherever PEFT's randomised SVD keeps as many directions as the layer has inputs (``2·round(rho·r) ≥ in``);
otherwise, and on several batches, PEFT's estimate approximates this exact one, and near-equal explained variances
may then give a layer a component more or less than here. PEFT's ``adjust_scaling_factors=False`` is not offered.
Layers that are not linear (convolutions) keep the default initialisation at rank ``r``, as in PEFT. Memory: one
``in × in`` float64 matrix per distinct layer input (layers fed the same tensor, like ``q``, ``k``, ``v``, share one).

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> from peft_callbacks.methods.lora.method import lora_adapters
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))  # 4: the head
    >>> batches = [torch.randn(16, 8) for _ in range(4)]
    >>> x = batches[0]
    >>> before = model(x)
    >>> model = eva_init(model, batches, LoRAConfig(rank=2, target_modules=["0", "2"]), EVAOptions(eva_rho=1.0))
    >>> torch.equal(model(x), before)  # B = 0
    True
    >>> a = lora_adapters(model)["0.adapters.default"].lora_A.weight
    >>> torch.allclose(a @ a.T, torch.eye(2), atol=1e-5)  # orthonormal input directions
    True
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import (
    check_adapter_name,
    check_batches,
    check_bool,
    check_callable,
    check_float,
    check_instance,
    check_int,
    check_module,
    check_positive_int,
)
from peft_callbacks.core.heads import find_head
from peft_callbacks.core.kinds import layer_kind
from peft_callbacks.engine import DEFAULT_ADAPTER, get_method, inject
from peft_callbacks.engine.patterns import select_layers
from peft_callbacks.methods.lora.batches import default_forward, read_layer_inputs, token_mask
from peft_callbacks.methods.lora.config import LoRAConfig

log = logging.getLogger(__name__)

__all__ = ["EVA_KINDS", "EVAOptions", "default_forward", "eva_components", "eva_init", "eva_ranks", "eva_stored_config"]

EVA_KINDS = ("linear", "hf_conv1d", "linear_4bit", "linear_8bit")  # layers whose input is (…, in_features)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EVAOptions:
    """How ``init="eva"`` reads its data (HF PEFT's ``EvaConfig``, and how many batches to read).

    Attributes:
        eva_batches: how many batches EVA reads (from ``LoRACallback``: the first batches of the training
            dataloader, at ``setup``); their inputs' covariance is decomposed exactly once. PEFT instead reads until
            its incremental estimate settles. A few batches of a few thousand tokens are plenty for ranks ≤ 64.
        eva_rho: PEFT's ``rho`` (≥ 1): a layer may take up to ``round(eva_rho·rank)`` components where its inputs
            explain more variance than other layers' (the total stays ``rank`` per layer); ``1.0``: every layer
            keeps ``rank``.
        eva_whiten: PEFT's ``whiten``: divide each component of ``A`` by the square root of its singular value.

    Example::

        >>> EVAOptions(eva_batches=4).eva_rho
        2.0
        >>> EVAOptions(eva_rho=0.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `eva_rho` must be ...
    """

    eva_batches: int = 8
    eva_rho: float = 2.0
    eva_whiten: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "eva_batches", check_positive_int("eva_batches", self.eva_batches))
        object.__setattr__(self, "eva_rho", check_float("eva_rho", self.eva_rho, low=1.0))
        check_bool("eva_whiten", self.eva_whiten)


class _Moments:
    """Running count, mean and scatter ``Σ(x−μ)(x−μ)ᵀ`` of one layer's input rows: each batch's centred product in
    float32 (the costly part), merged into float64 totals by Chan et al.'s pairwise update."""

    def __init__(self) -> None:
        self.n, self.mean, self.scatter = 0, None, None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float()  # (n_b, in)
        n_b = rows.shape[0]
        if n_b == 0:
            return
        mean_b = rows.sum(0, dtype=torch.float64) / n_b  # (in,)
        centred = rows - mean_b.float()
        scatter_b = (centred.T @ centred).double()  # (in, n_b) @ (n_b, in)
        if self.mean is None:
            self.n, self.mean, self.scatter = n_b, mean_b, scatter_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.scatter += scatter_b + torch.outer(delta, delta) * (self.n * n_b / n)
        self.mean += delta * (n_b / n)
        self.n = n

    def principal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(λ, Vᵀ)`` of the scatter matrix ``Σ(x−μ)(x−μ)ᵀ``, largest first, signs as PEFT's ``svd_flip``."""
        values, vectors = torch.linalg.eigh(self.scatter)  # ascending
        values, rows = values.flip(0).clamp_min(0), vectors.flip(1).T  # (in,), (in, in)
        signs = torch.sign(rows.gather(1, rows.abs().argmax(1, keepdim=True)))  # largest entry of each row positive
        return values, rows * signs


def _redistribute(ratios: dict[str, torch.Tensor], rank: int, offered: int, groups: dict[str, str]) -> dict[str, int]:
    """PEFT's ``_get_rank_distribution``: the best ``rank·len(layers)`` ratios over all layers, counted per layer;
    layers sharing an input give the most components to the first of them (the one PEFT measures)."""
    keys, values = zip(*[(name, v) for name in groups for v in ratios[groups[name]][:offered]])
    order = torch.stack(list(values)).argsort(descending=True)
    counts = Counter(keys[i] for i in order[: rank * len(groups)].tolist())
    counts = {name: counts.get(name, 0) for name in groups}
    for name, first in groups.items():
        if name != first and counts[first] < counts[name]:
            counts[first], counts[name] = counts[name], counts[first]
    return counts


@torch.no_grad()
def eva_components(
    model: nn.Module,
    dataloader: Iterable,
    targets: list[str],
    *,
    num_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    use_label_mask: bool = True,
    label_mask_value: int = -100,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, int]], dict[str, str]]:
    """Run the probe batches and decompose each target layer's input covariance.

    Returns:
        ``({first: (λ, Vᵀ, n)}, {path: first})``: one decomposition per distinct input, and for every target the
        first target fed the same tensor.

    Raises:
        ValueError: no batches, or a target that never ran.
    """
    moments: dict[str, _Moments] = {}

    def record(path: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        rows = x[mask] if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]) else x.reshape(-1, x.shape[-1])
        moments.setdefault(path, _Moments()).add(rows)

    groups = read_layer_inputs(
        model,
        dataloader,
        targets,
        record,
        what="EVA",
        num_batches=num_batches,
        forward_fn=forward_fn,
        mask_fn=lambda batch: token_mask(batch, use_label_mask, label_mask_value),
    )
    empty = [p for p, m in moments.items() if m.n == 0]
    if empty:
        raise ValueError(f"EVA: layers {empty[:5]} saw no token on the probe batches (all padding or masked labels).")
    decomposed = {p: (*m.principal(), m.n) for p, m in moments.items()}
    return decomposed, groups


def _check_options(eva: EVAOptions, config: LoRAConfig) -> None:
    if config.use_rslora and eva.eva_rho != 1.0:
        raise ValueError(
            f"`eva_rho`={eva.eva_rho:g} cannot be combined with `use_rslora=True`: PEFT's redistributed ranks then get "
            f"scalings that no single stored rank reproduces. Use eva_rho=1.0 with rsLoRA."
        )
    if config.target_parameters:
        raise ValueError(
            "init='eva' adapts layers from their inputs; `target_parameters` has none. Use init='default'."
        )
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError(
            "init='eva' redistributes the ranks itself (by explained variance); it cannot be combined with "
            f"`rank_pattern`={config.rank_pattern!r} / `alpha_pattern`={config.alpha_pattern!r}. Leave them empty."
        )


@torch.no_grad()
def eva_init(
    model: nn.Module,
    dataloader: Iterable,
    config: LoRAConfig,
    eva: EVAOptions | None = None,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    use_label_mask: bool = True,
    label_mask_value: int = -100,
) -> nn.Module:
    """Inject LoRA with EVA's data-driven ``A`` (module docstring); the plain-PyTorch entry for ``init="eva"``.

    Args:
        model: the model to adapt (not yet adapted by this adapter).
        dataloader: the probe batches (any iterable): mappings of model inputs (``input_ids``, ``attention_mask``,
            ``labels``, …), ``(inputs, targets)`` tuples or tensors (see ``forward_fn``).
        config: LoRA's settings (``init`` is taken as ``"eva"``).
        eva: how many batches to read, ``rho`` and ``whiten`` (:class:`EVAOptions`; ``None``: its defaults).
        adapter_name: the adapter's name.
        forward_fn: ``forward_fn(model, batch)`` runs one batch (:func:`default_forward`).
        use_label_mask: leave out tokens whose ``labels`` equal ``label_mask_value`` (PEFT's default).
        label_mask_value: see ``use_label_mask``.

    Returns:
        ``model``, adapted in place (recorded as ``LoRAConfig(rank=R, alpha=alpha·R/rank, init="eva")`` with
        ``R = round(eva_rho·rank)``).

    Raises:
        ValueError: bad options, an empty ``dataloader``, or layers that never ran.
    """
    check_module("model", model)
    check_batches("dataloader", dataloader)
    check_instance("config", config, LoRAConfig)
    check_instance("eva", eva, EVAOptions, optional=True)
    check_adapter_name(adapter_name)
    check_callable("forward_fn", forward_fn)
    check_bool("use_label_mask", use_label_mask)
    check_int("label_mask_value", label_mask_value)
    eva = EVAOptions() if eva is None else eva
    _check_options(eva, config)
    method = get_method("lora")
    if method.modules(model, adapter_name):
        raise ValueError(f"{type(model).__name__} already has LoRA adapter {adapter_name!r}; unload or merge it first.")
    selected = method.select(model, dataclasses.replace(config, init="default"), find_head(model))
    targets = select_layers(selected, config.layers_to_transform, config.layers_pattern)
    linear = [p for p in targets if layer_kind(model.get_submodule(p)) in EVA_KINDS]
    others = [p for p in targets if p not in linear]
    if others:
        log.warning(
            "EVA: %s are not linear layers; they keep the default initialisation at rank %d", others[:5], config.rank
        )
    offered = round(eva.eva_rho * config.rank)
    decomposed, groups = eva_components(
        model,
        dataloader,
        linear,
        num_batches=eva.eva_batches,
        forward_fn=forward_fn,
        use_label_mask=use_label_mask,
        label_mask_value=label_mask_value,
    )
    ratios = {p: values / values.sum().clamp_min(1e-30) for p, (values, _, _) in decomposed.items()}
    counts = _redistribute(ratios, config.rank, offered, groups) if linear else {}
    inject(model, eva_stored_config(config, eva), adapter_name=adapter_name, targets=targets)
    for path in targets:
        lora = model.get_submodule(path).adapters[adapter_name]
        weight = lora.lora_A.weight  # (R, in…)
        k = counts.get(path, config.rank)
        if path in counts:
            values, rows, _ = decomposed[groups[path]]
            a = rows[:k]  # (k, in)
            if eva.eva_whiten:  # PEFT: / √(singular value of the centred inputs) = / λ^¼
                a = a / values[:k].clamp_min(1e-30).pow(0.25).unsqueeze(1)
            weight.zero_()
            weight[:k].copy_(a.to(weight))
        else:
            weight[k:].zero_()
    log.info("EVA ranks: %s", {p: counts.get(p, config.rank) for p in targets})
    return model


def eva_stored_config(config: LoRAConfig, eva: EVAOptions | None = None) -> LoRAConfig:
    """The config an EVA adapter is stored with: rank ``R = round(eva_rho·rank)``, ``alpha·R/rank`` (the scaling stays
    ``alpha/rank``), ``init="eva"``.

    Example::

        >>> stored = eva_stored_config(LoRAConfig(rank=8, alpha=16), EVAOptions(eva_rho=2))
        >>> stored.rank, stored.alpha
        (16, 32.0)
    """
    offered = round((EVAOptions() if eva is None else eva).eva_rho * config.rank)
    return dataclasses.replace(config, rank=offered, alpha=config.alpha * offered / config.rank, init="eva")


def eva_ranks(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, int]:
    """``{layer path: k}``: the rank each layer's EVA adapter uses (its non-zero rows of ``A``).

    Example::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> data = [torch.randn(64, 6) * torch.tensor([9.0, 1, 1, 1, 1, 1])]  # one direction dominates layer 0's input
        >>> model = eva_init(model, data, LoRAConfig(rank=2, target_modules=["0", "2"]), EVAOptions(eva_rho=2))
        >>> sorted(eva_ranks(model).items())  # 2 + 2 components, shared by explained variance
        [('0', 1), ('2', 3)]
    """
    return {
        path: int((layer.adapters[adapter_name].lora_A.weight.flatten(1).abs().sum(1) > 0).sum())
        for path, layer in get_method("lora").modules(model, adapter_name).items()
    }
