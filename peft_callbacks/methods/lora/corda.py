r"""CorDA: LoRA factors from the SVD of the weight times the covariance of its inputs (Yang et al. 2024, "CorDA:
Context-Oriented Decomposition Adaptation of Large Language Models"; HF PEFT's ``init_lora_weights="corda"``).

A few batches go through the frozen base model; for each adapted linear layer every sample's inputs ``X`` (``(T, in)``,
one row per token, padding left out) give ``XᵀX / |max X|``, averaged over the samples into ``C``. Then, as PEFT::

    C' = C + d·mean(diag C)·I          d = 0.01, doubled until ‖C'·C'⁻¹ − I‖ < 0.05
    W·C' = U S Vᵀ                       (out, in) = (out, k)(k,)(k, in)
    ipm:  the top-r components          B₀ = U[:, :r]·√(S[:r]/s)     A₀ = √(S[:r]/s)·(Vᵀ·C'⁻¹)[:r]
    kpm:  the bottom-r components       the same with [−r:]                                   (s = the LoRA scaling)

so ``s·B₀A₀`` is the part of ``W`` that matters most (ipm) or least (kpm) to these inputs, and the model computes
``(W − s·B₀A₀)x + s·BAx`` with ``B``, ``A`` trained from ``B₀``, ``A₀`` (the residual base kept as PiSSA's:
:mod:`peft_callbacks.methods.lora.init`; the base weight is never written, the adapter file holds ``A₀``, ``B₀``).

**Which mode.** IPM ("instruction-previewed") reads data of the *new* task: the adapter starts from the directions
that task uses, which speeds up fine-tuning. KPM ("knowledge-preserved") reads data of what the model should *keep*
(e.g. question answering on world knowledge): the directions that data uses stay in the frozen residual and the
adapter trains the least used ones, which forgets less.

**Against PEFT.** PEFT hooks each layer for every forward call and expects one sample per call (batch size 1; it
squeezes the batch dimension); here each sample of a batch (the first dimension of a ``(B, T, in)`` input) counts
as one such call, with its padding tokens (``attention_mask == 0``) left out; a ``(N, in)`` input (no sequence)
counts as one sample, as in PEFT. On batches of one unpadded sample the two give the same ``C`` and the same factors.
Covariances are summed in float32 as PEFT does (``use_float16_for_covariance`` is not offered); layers fed the same
tensor (``q``, ``k``, ``v``) share one. Memory: one ``in × in`` float32 matrix per distinct layer input.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> batches = [torch.randn(16, 8) for _ in range(4)]
    >>> before = model(batches[0])
    >>> model = corda_init(model, batches, LoRAConfig(rank=2, target_modules=["0"]), CorDAOptions(corda_method="kpm"))
    >>> torch.allclose(model(batches[0]), before, atol=1e-5)  # the adapter starts as the part it takes out
    True
    >>> model[0].base_layer.weight.requires_grad  # the base weight untouched, frozen
    False
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn as nn

from peft_callbacks._validation import (
    check_adapter_name,
    check_batches,
    check_callable,
    check_choice,
    check_instance,
    check_module,
    check_positive_int,
)
from peft_callbacks.engine import DEFAULT_ADAPTER
from peft_callbacks.methods.lora.batches import default_forward, read_layer_inputs, token_mask
from peft_callbacks.methods.lora.config import LoRAConfig
from peft_callbacks.methods.lora.data_inits import data_targets, inject_started, weight_rows

log = logging.getLogger(__name__)

__all__ = ["CORDA_METHODS", "CorDAOptions", "corda_covariances", "corda_factors", "corda_init"]

CORDA_METHODS = ("ipm", "kpm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorDAOptions:
    """How ``init="corda"`` reads its data and which components it trains (HF PEFT's ``CordaConfig``).

    Attributes:
        corda_method: ``"ipm"`` (PEFT's default): the adapter starts from the top-``rank`` components of ``W·C``,
            ``C`` read on data of the new task (faster, better fine-tuning); ``"kpm"``: from the bottom-``rank``
            components, ``C`` read on data of what the model should keep (less forgetting).
        corda_batches: how many batches CorDA reads (from ``LoRACallback``: the first batches of
            ``corda_dataloader``, else of the training dataloader, at ``setup``).
        corda_dataloader: the batches ``LoRACallback`` reads instead of the training data: for ``"kpm"``, data of
            the knowledge to keep (the base task); ``None``: the fit's training dataloader (what ``"ipm"`` wants).
            Not recorded with the callback's settings.

    Example::

        >>> CorDAOptions().corda_method
        'ipm'
        >>> CorDAOptions(corda_method="svd")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `corda_method` must be one of ...
    """

    corda_method: Literal["ipm", "kpm"] = "ipm"
    corda_batches: int = 8
    corda_dataloader: Any = None

    def __post_init__(self) -> None:
        check_choice("corda_method", self.corda_method, CORDA_METHODS)
        object.__setattr__(self, "corda_batches", check_positive_int("corda_batches", self.corda_batches))
        loader = self.corda_dataloader
        single = (str, bytes, torch.Tensor, Mapping)  # iterable, but one batch (or several loaders), not batches
        if loader is not None and (isinstance(loader, single) or not isinstance(loader, Iterable)):
            raise TypeError(
                f"`corda_dataloader` must be None or an iterable of batches (a DataLoader), got "
                f"{type(loader).__name__}."
            )

    def recorded(self) -> dict[str, Any]:
        """The settings a checkpoint records (not the data)."""
        return {"corda_method": self.corda_method, "corda_batches": self.corda_batches}


def _samples(x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """One ``(T, in)`` block per sample of a layer input: PEFT's unit, one forward call of batch size 1."""
    if x.dim() <= 2:
        return [x.reshape(-1, x.shape[-1])]
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        return [x[b][mask[b]] for b in range(x.shape[0])]
    return [x[b].reshape(-1, x.shape[-1]) for b in range(x.shape[0])]


@torch.no_grad()
def corda_covariances(
    model: nn.Module,
    dataloader: Iterable,
    targets: list[str],
    *,
    num_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
) -> dict[str, torch.Tensor]:
    """``{path: C}``: each target layer's input covariance by PEFT's rule (module docstring), in float32.

    Raises:
        ValueError: no batches, a target that never ran or saw no token, or non-finite inputs.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(path: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        for rows in _samples(x, mask):
            if rows.shape[0] == 0:
                continue
            rows = rows.float()
            rows = rows / torch.max(rows).abs()  # PEFT's normalisation, per sample
            if not torch.isfinite(rows).all():
                raise ValueError(
                    f"CorDA: layer {path!r} got an input whose largest value is 0 or that is not finite; its "
                    f"covariance is undefined. Check the batches, or leave the layer out of the targets."
                )
            product = rows.t() @ rows  # (in, T) @ (T, in)
            sums[path] = product if path not in sums else sums[path] + product
            counts[path] = counts.get(path, 0) + 1

    groups = read_layer_inputs(
        model,
        dataloader,
        targets,
        record,
        what="CorDA",
        num_batches=num_batches,
        forward_fn=forward_fn,
        mask_fn=lambda batch: token_mask(batch, use_label_mask=False),  # padding only: every real token is an input
    )
    empty = [p for p in targets if groups[p] not in counts]
    if empty:
        raise ValueError(f"CorDA: layers {empty[:5]} saw no token on the batches (all padding).")
    means = {first: total / counts[first] for first, total in sums.items()}  # one per distinct input
    return {p: means[groups[p]] for p in targets}


def corda_factors(
    weight: torch.Tensor, covariance: torch.Tensor, rank: int, scaling: float, corda_method: str = "ipm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A₀, B₀)`` for a weight ``(out, in)`` and its input covariance ``(in, in)``, by HF PEFT's ``collect_eigens``
    and ``corda_init`` (module docstring), in float32.

    Raises:
        ValueError: a zero covariance, one no damping makes invertible, or an unknown ``corda_method``.

    Example::

        >>> w, x = torch.randn(6, 5), torch.randn(40, 5)
        >>> a, b = corda_factors(w, x.T @ x / 40, 5, 1.0)
        >>> torch.allclose(b @ a, w, atol=1e-4)  # all components: the whole weight
        True
    """
    check_choice("corda_method", corda_method, CORDA_METHODS)
    weight, covariance = weight.float(), covariance.float()
    mean_diag = torch.mean(torch.diag(covariance))
    if not mean_diag > 0:
        raise ValueError("CorDA: the inputs' covariance is zero (the layer only ever saw zeros); it has no direction.")
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    damp = 0.01
    for _ in range(64):  # PEFT's damping: doubled until the inverse is accurate
        fixed = covariance + torch.diag(torch.ones(covariance.shape[0], device=covariance.device) * mean_diag * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise ValueError("CorDA: no damping made the inputs' covariance invertible (non-finite values?).")
    u, s, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)  # (out, k), (k,), (k, in)
    v = (vh @ inverse).t()  # (in, k)
    keep = slice(None, rank) if corda_method == "ipm" else slice(-rank, None)
    u, s, v = u[:, keep], s[keep] / scaling, v[:, keep]
    lora_A = v.t().mul(s.sqrt().view(-1, 1)).contiguous()  # (r, in)
    lora_B = u.mul(s.sqrt()).contiguous()  # (out, r)
    return lora_A, lora_B


@torch.no_grad()
def corda_init(
    model: nn.Module,
    dataloader: Iterable,
    config: LoRAConfig,
    corda: CorDAOptions | None = None,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
) -> nn.Module:
    """Inject LoRA started by CorDA (module docstring); the plain-PyTorch entry for ``init="corda"``.

    Args:
        model: the model to adapt (not yet adapted by this adapter).
        dataloader: the batches (any iterable): mappings of model inputs (``input_ids``, ``attention_mask``, …),
            ``(inputs, targets)`` tuples or tensors (see ``forward_fn``). For ``"ipm"`` data of the new task, for
            ``"kpm"`` data of the knowledge to keep. Its first ``corda.corda_batches`` batches are read.
        config: LoRA's settings (``init`` is taken as ``"corda"``; ``rank_pattern``, ``alpha_pattern`` and
            ``use_rslora`` apply per layer as in PEFT).
        corda: ``corda_method`` and how many batches to read (:class:`CorDAOptions`; ``None``: its defaults).
        adapter_name: the adapter's name.
        forward_fn: ``forward_fn(model, batch)`` runs one batch
            (:func:`~peft_callbacks.methods.lora.batches.default_forward`).

    Returns:
        ``model``, adapted in place (recorded as ``init="corda"``; the adapter holds ``A₀``, ``B₀``, so a saved
        adapter reloads without data).

    Raises:
        ValueError: a target that is not linear, a ``rank`` above ``min(out, in)``, an empty ``dataloader``, layers
            that never ran.
    """
    check_module("model", model)
    check_batches("dataloader", dataloader)
    check_instance("config", config, LoRAConfig)
    check_instance("corda", corda, CorDAOptions, optional=True)
    check_adapter_name(adapter_name)
    check_callable("forward_fn", forward_fn)
    corda = CorDAOptions() if corda is None else corda
    config = dataclasses.replace(config, init="corda")
    targets, ranks = data_targets(model, config, adapter_name, min, "at most min(out, in) components")
    covariances = corda_covariances(model, dataloader, targets, num_batches=corda.corda_batches, forward_fn=forward_fn)

    def factors(path: str, adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight_rows(model.get_submodule(path).base_layer)
        covariance = covariances[path].to(weight.device)
        return corda_factors(weight, covariance, ranks[path], adapter.scaling, corda.corda_method)

    inject_started(model, config, targets, factors, adapter_name)
    log.info("CorDA (%s): %d layer(s) started", corda.corda_method, len(targets))
    return model
