r"""Combining task tensors: task arithmetic, TIES and DARE, with HF PEFT's definitions (``peft.utils.merge_utils``).

Each function takes the same tensor of every task (say each adapter's ``lora_A``), stacked on a new first
dimension, and a weight per task::

    task_arithmetic   Σ wᵢ·τᵢ                                       (Ilharco et al. 2023)
    magnitude_prune   Σ wᵢ·top_k(τᵢ)                                 keep the largest |values|, density k/n
    ties              disjoint mean of wᵢ·top_k(τᵢ) whose sign agrees with the elected sign   (Yadav et al. 2023)
    dare_linear       Σ wᵢ·bernoulli(density)·τᵢ / density            (Yu et al. 2024)
    dare_ties         TIES' sign election and disjoint mean on DARE-pruned tensors

The elected sign per entry is that of ``Σ τᵢ`` (``"total"``) or of ``Σ sign(τᵢ)`` (``"frequency"``); the disjoint
mean divides by the number of tasks that agree with it. DARE draws its masks from torch's global generator, in the
order of the tasks, so a seed reproduces HF PEFT's result.

Example::

    >>> import torch
    >>> tasks = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, 2.0, -1.0])]
    >>> task_arithmetic(tasks, torch.tensor([1.0, 0.5]))
    tensor([ 1.5000, -1.0000,  2.5000])
    >>> ties(tasks, torch.tensor([1.0, 1.0]), density=1.0)  # signs elected by the sums: +, +, +
    tensor([1., 2., 3.])
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "calculate_majority_sign_mask",
    "dare_linear",
    "dare_ties",
    "disjoint_merge",
    "magnitude_prune",
    "prune",
    "task_arithmetic",
    "ties",
]


Sign = Literal["total", "frequency"]  # how TIES elects each entry's sign (PEFT's ``majority_sign_method``)


def _weighted(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights[i] · task_tensors[i]`` (weights broadcast over the tensors' own dimensions)."""
    return task_tensors * weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def prune(
    tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False
) -> torch.Tensor:
    """Keep a fraction ``density`` of ``tensor``'s values: the largest in magnitude, or a random draw (rescaled by
    ``1 / density`` with ``rescale``, so the expected value stays). ``density >= 1`` keeps everything.

    Example::

        >>> prune(torch.tensor([0.1, -3.0, 2.0, 0.5]), density=0.5, method="magnitude")
        tensor([ 0., -3.,  2.,  0.])
    """
    if density >= 1:
        return tensor
    if density < 0:
        raise ValueError(f"`density` must be in [0, 1], got {density!r}.")
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
        mask[top[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    if method == "random":
        pruned = tensor * torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
        return pruned / density if rescale else pruned
    raise ValueError(f"`method` must be 'magnitude' or 'random', got {method!r}.")


def calculate_majority_sign_mask(tensor: torch.Tensor, method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Where each task's sign agrees with the elected one (tasks stacked on dimension 0)."""
    sign = tensor.sign()
    if method == "total":
        magnitude = tensor.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"`majority_sign_method` must be 'total' or 'frequency', got {method!r}.")
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """The mean over the tasks that agree with the elected sign, entry by entry (zero where none does)."""
    kept = (task_tensors * majority_sign_mask).sum(dim=0)
    return kept / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``Σ wᵢ·τᵢ``."""
    return _weighted(torch.stack(task_tensors, dim=0), weights).sum(dim=0)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Task arithmetic on each task's largest values (a fraction ``density`` of them)."""
    pruned = [prune(t, density, method="magnitude") for t in task_tensors]
    return _weighted(torch.stack(pruned, dim=0), weights).sum(dim=0)


def ties(
    task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float, majority_sign_method: Sign = "total"
) -> torch.Tensor:
    """TIES: trim to the largest values, elect a sign per entry, average the weighted tasks that agree with it."""
    return _elected([prune(t, density, method="magnitude") for t in task_tensors], weights, majority_sign_method)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: drop values at random (keep each with probability ``density``), rescale, add the weighted tasks."""
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    return _weighted(torch.stack(pruned, dim=0), weights).sum(dim=0)


def dare_ties(
    task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float, majority_sign_method: Sign = "total"
) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    return _elected(pruned, weights, majority_sign_method)


def _elected(pruned: list[torch.Tensor], weights: torch.Tensor, majority_sign_method: Sign) -> torch.Tensor:
    """TIES' second half: elect a sign per entry, then the weighted mean of the tasks that agree with it."""
    stacked = torch.stack(pruned, dim=0)
    return disjoint_merge(
        _weighted(stacked, weights), calculate_majority_sign_mask(stacked, method=majority_sign_method)
    )
