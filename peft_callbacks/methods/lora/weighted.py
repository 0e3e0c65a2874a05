r"""A new LoRA adapter made from others: HF PEFT's ``add_weighted_adapter``, the same combinations and maths.

===================================  ==============================================================================
``combination_type``                 the new adapter (rank), for weights ``wᵢ`` and scalings ``sᵢ``
===================================  ==============================================================================
``"cat"``                            ``A = [w₁s₁A₁; w₂s₂A₂; …]``, ``B = [B₁ B₂ …]``: exactly ``Σ wᵢsᵢBᵢAᵢ`` (Σ ranks)
``"svd"``                            the best rank-``svd_rank`` approximation of ``Σ wᵢ·ΔWᵢ`` (SVD)
``"linear"``                         ``A = Σ √|wᵢsᵢ|·sign·Aᵢ``, ``B = Σ √|wᵢsᵢ|·Bᵢ`` (same ranks; rough)
``"ties"`` / ``"dare_linear"`` /     the same on ``A`` and on ``B`` with TIES / DARE / magnitude pruning
``"dare_ties"`` /                    (:mod:`peft_callbacks.engine.merge_utils`; ``density`` kept)
``"magnitude_prune"``
``"ties_svd"``, ``"dare_linear_svd"``,  TIES / DARE / pruning on the full updates ``ΔWᵢ``, then the SVD
``"dare_ties_svd"``,
``"magnitude_prune_svd"``
===================================  ==============================================================================

The new adapter has ``alpha = rank`` (scaling 1, with the first adapter's other settings, as in PEFT), is added on
every layer that holds one of the adapters, and is neither active nor trainable: :func:`~peft_callbacks.set_adapter`
switches to it. It is recorded like any other adapter (adapter files, PEFT export, merging).

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks import inject_lora, set_adapter
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> for name in ("a", "b"):
    ...     net = inject_lora(net, rank=2, target_modules=["0"], train_head=False, adapter_name=name)
    >>> for p in net.parameters():
    ...     _ = nn.init.normal_(p)
    >>> add_weighted_adapter(net, ["a", "b"], [0.5, 0.5], "ab", combination_type="cat")
    >>> x = torch.randn(3, 4)
    >>> expected = net[0].base_layer(x) + 0.5 * (net[0].adapters["a"].branch(x) + net[0].adapters["b"].branch(x))
    >>> set_adapter(net, "ab")
    >>> torch.allclose(net[0](x), expected, atol=1e-5)
    True
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn

from peft_callbacks._validation import check_adapter_name, check_choice, check_float, check_module, check_positive_int
from peft_callbacks.core.params import has_frozen_batchnorm_stats, unfreeze_batchnorm_stats
from peft_callbacks.engine import merge_utils
from peft_callbacks.engine.adapters import adapter_names
from peft_callbacks.engine.layers import AdaptedLayer
from peft_callbacks.engine.surgery import inject
from peft_callbacks.engine.transaction import transaction
from peft_callbacks.io.checks import check_tensors
from peft_callbacks.methods.lora.dora import DoRAAdapter
from peft_callbacks.methods.lora.layers import LoRAAdapter, LoRAConv, LoRAConv1D
from peft_callbacks.methods.lora.method import LoRAConfig

__all__ = ["COMBINATIONS", "add_weighted_adapter"]

_SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = ("cat", *_SAME_RANK, *_SVD)
_NEED_DENSITY = ("ties", "dare_ties", "dare_linear", "magnitude_prune", *_SVD[1:])


def _combine(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density, sign_method) -> torch.Tensor:
    if kind in ("linear", "svd"):
        return merge_utils.task_arithmetic(tensors, weights)
    if kind.startswith("ties"):
        return merge_utils.ties(tensors, weights, density, sign_method)
    if kind.startswith("dare_linear"):
        return merge_utils.dare_linear(tensors, weights, density)
    if kind.startswith("dare_ties"):
        return merge_utils.dare_ties(tensors, weights, density, sign_method)
    return merge_utils.magnitude_prune(tensors, weights, density)


def _lora_adapters(model: nn.Module, adapters: list[str]) -> dict[str, dict[str, LoRAAdapter]]:
    """``{layer path: {adapter name: adapter}}`` of the layers holding any of ``adapters``, in model order."""
    found: dict[str, dict[str, LoRAAdapter]] = {}
    for path, layer in model.named_modules():
        if isinstance(layer, AdaptedLayer):
            held = {n: layer.adapters[n] for n in adapters if n in layer.adapters}
            for name, adapter in held.items():
                if not isinstance(adapter, LoRAAdapter) or isinstance(adapter, DoRAAdapter):
                    raise ValueError(
                        f"`adapters` entry {name!r} is a {type(adapter).__name__} on {path!r}; add_weighted_adapter "
                        f"combines LoRA adapters (not DoRA)."
                    )
            if held:
                found[path] = held
    return found


def _check_finite(found: dict[str, dict[str, LoRAAdapter]]) -> None:
    """Refuse an input adapter holding NaN or Inf: it would spread into every value of the combination."""
    for path, held in found.items():
        for name, adapter in held.items():
            tensors = {f"{path}.{key}": t.detach() for key, t in adapter.state_dict(keep_vars=True).items()}
            check_tensors(tensors, f"`adapters` entry {name!r}", action="combine", targets=tensors)


def _ranks(found: dict[str, dict[str, LoRAAdapter]], adapters: list[str]) -> list[int]:
    ranks = []
    for name in adapters:
        held = {a.r for layer in found.values() for n, a in layer.items() if n == name}
        if len(held) != 1:
            raise ValueError(f"`adapters` entry {name!r} has ranks {sorted(held)} on different layers; it needs one.")
        ranks.append(held.pop())
    return ranks


def _new_rank(kind: str, ranks: list[int], svd_rank: int | None) -> int:
    if kind in _SAME_RANK:
        if len(set(ranks)) != 1:
            raise ValueError(
                f"`combination_type`={kind!r} needs adapters of one rank, got ranks {ranks}; use 'cat' or 'svd'."
            )
        return ranks[0]
    if kind == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def _factors(kind, held, adapters, weights, new, density, sign_method, svd) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` of the new adapter on one layer (shaped like ``new``'s)."""
    names = [n for n in adapters if n in held]
    scaled = [weights[adapters.index(n)] * held[n].scaling for n in names]
    if kind == "cat":
        a = torch.cat([held[n].lora_A.weight.data * w for n, w in zip(names, scaled)], dim=0)
        b = torch.cat([held[n].lora_B.weight.data for n in names], dim=1)
        lora_a, lora_b = torch.zeros_like(new.lora_A.weight), torch.zeros_like(new.lora_B.weight)
        lora_a[: a.shape[0]], lora_b[:, : b.shape[1]] = a, b
        return lora_a, lora_b
    if kind in _SAME_RANK:
        device = new.lora_A.weight.device
        weights_a = torch.tensor([math.copysign(math.sqrt(abs(w)), w) for w in scaled], device=device)
        weights_b = torch.tensor([math.sqrt(abs(w)) for w in scaled], device=device)
        a, b = (
            _combine(kind, [getattr(held[n], factor).weight.data for n in names], w, density, sign_method)
            for factor, w in (("lora_A", weights_a), ("lora_B", weights_b))
        )
        return a, b
    deltas = [held[n].delta_weight() for n in names]  # s·B·A, shaped like the base weight, float32
    delta = _combine(
        kind,
        deltas,
        torch.tensor([weights[adapters.index(n)] for n in names]).to(deltas[0].device),
        density,
        sign_method,
    )
    conv = isinstance(new, LoRAConv) and delta.dim() == 4
    if conv:
        delta = delta.squeeze() if delta.shape[2:4] == (1, 1) else delta.flatten(start_dim=1)
    if isinstance(new, LoRAConv1D):
        delta = delta.T  # Conv1D stores (in, out)
    clamp, full_matrices, driver, rank = svd
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :rank] @ torch.diag(s[:rank])  # (out, r)
    vh = vh[:rank, :]  # (r, in·k…)
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh.reshape(new.lora_A.weight.shape), u.reshape(new.lora_B.weight.shape)


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: Literal[
        "svd",
        "linear",
        "cat",
        "ties",
        "ties_svd",
        "dare_ties",
        "dare_linear",
        "dare_ties_svd",
        "dare_linear_svd",
        "magnitude_prune",
        "magnitude_prune_svd",
    ] = "svd",  # fmt: skip
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> None:
    """Add the LoRA adapter ``adapter_name`` combined from ``adapters`` with ``weights`` (see the module docstring).

    Args:
        model: a model holding the LoRA adapters ``adapters``.
        adapters: names of the adapters to combine.
        weights: one weight per adapter (negative weights subtract).
        adapter_name: the new adapter's name (not in the model yet).
        combination_type: see the module docstring; with one adapter, ``"linear"``.
        svd_rank: rank of the new adapter for the SVD types (default: the largest rank combined).
        svd_clamp: clamp the SVD factors at this quantile of their values (``None``: no clamping).
        svd_full_matrices: ``torch.linalg.svd``'s ``full_matrices``.
        svd_driver: ``torch.linalg.svd``'s ``driver`` (CUDA only).
        density: fraction of values kept by TIES, DARE and magnitude pruning, in ``[0, 1]``.
        majority_sign_method: how TIES elects signs, ``"total"`` or ``"frequency"``.

    Raises:
        TypeError/ValueError: an argument out of range (the message names it), unknown or non-LoRA adapters,
            ranks that the combination cannot mix, or a name that is taken.
    """
    check_module("model", model)
    known = adapter_names(model)
    if not isinstance(adapters, (list, tuple)) or not adapters or not all(isinstance(a, str) for a in adapters):
        raise TypeError(f"`adapters` must be a non-empty list of adapter names, got {adapters!r}.")
    missing = [a for a in adapters if a not in known]
    if missing:
        raise ValueError(f"`adapters` names {missing}, which {type(model).__name__} does not hold; it has {known}.")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise TypeError(f"`weights` must be a list of {len(adapters)} numbers (one per adapter), got {weights!r}.")
    weights = [check_float("weights", w) for w in weights]
    check_adapter_name(adapter_name)
    if adapter_name in known:
        raise ValueError(f"`adapter_name`={adapter_name!r} is taken; {type(model).__name__} has {known}.")
    kind = check_choice("combination_type", combination_type, COMBINATIONS)
    kind = "linear" if len(adapters) == 1 else kind
    if svd_rank is not None:
        check_positive_int("svd_rank", svd_rank)
    if svd_clamp is not None:
        svd_clamp = check_float("svd_clamp", svd_clamp, low=0.0, high=1.0)
    if not isinstance(svd_full_matrices, bool):
        raise TypeError(f"`svd_full_matrices` must be a bool, got {svd_full_matrices!r}.")
    if svd_driver is not None:
        check_choice("svd_driver", svd_driver, ("gesvd", "gesvdj", "gesvda"))
    if kind in _NEED_DENSITY and density is None:
        raise ValueError(f"`density` is needed by combination_type={kind!r}: a fraction in [0, 1], got None.")
    if density is not None:
        density = check_float("density", density, low=0.0, high=1.0)
    check_choice("majority_sign_method", majority_sign_method, ("total", "frequency"))
    found = _lora_adapters(model, list(adapters))
    _check_finite(found)
    rank = _new_rank(kind, _ranks(found, list(adapters)), svd_rank)
    first = next(a for layer in found.values() for n, a in layer.items() if n == adapters[0]).config
    config = LoRAConfig(rank=rank, alpha=rank, dropout=first.dropout, use_rslora=first.use_rslora, train_head=False)
    _insert(model, config, adapter_name, list(found))
    svd = (svd_clamp, svd_full_matrices, svd_driver, rank)
    with torch.no_grad():
        for path, held in found.items():
            new = model.get_submodule(path).adapters[adapter_name]
            lora_a, lora_b = _factors(kind, held, list(adapters), weights, new, density, majority_sign_method, svd)
            new.lora_A.weight.copy_(lora_a.to(new.lora_A.weight.dtype))
            new.lora_B.weight.copy_(lora_b.to(new.lora_B.weight.dtype))


def _insert(model: nn.Module, config: LoRAConfig, adapter_name: str, targets: list[str]) -> None:
    """Inject the new adapter without changing what was active, trainable or frozen (it is neither active nor
    trainable itself)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    frozen_stats = {id(m) for m in model.modules() if has_frozen_batchnorm_stats(m)}
    active = {id(m): list(m.active_adapters) for m in model.modules() if isinstance(m, AdaptedLayer)}
    with transaction(model):
        inject(model, config, adapter_name=adapter_name, targets=targets)
    for p, flag in flags:
        p.requires_grad_(flag)
    for m in model.modules():
        if isinstance(m, AdaptedLayer):
            m.active_adapters = active.get(id(m), [])
            m.adapters[adapter_name].requires_grad_(False)
        elif has_frozen_batchnorm_stats(m) and id(m) not in frozen_stats:
            unfreeze_batchnorm_stats(m)
