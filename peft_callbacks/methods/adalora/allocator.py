r"""AdaLoRA's rank allocation and orthogonality regulariser (Zhang et al. 2023, §3.2–3.3), as HF PEFT computes them.

After each optimizer step (the gradients still in ``.grad``):

::

    I(w)   = |w · ∂L/∂w|                                   sensitivity of every entry of P, Λ, Q
    Ī(w)  ← β₁·Ī(w) + (1−β₁)·I(w)                          smoothed sensitivity
    Ū(w)  ← β₂·Ū(w) + (1−β₂)·|I(w) − Ī(w)|                 uncertainty
    S(w)   = Ī(w)·Ū(w)
    Sᵢ     = S(λᵢ) + mean_j S(Qᵢⱼ) + mean_k S(Pₖᵢ)         score of triplet i of a layer

    budget(t) = init budget                                    t <= tinit
              = target + (init − target)·(1 − (t−tinit)/(T−tfinal−tinit))³   (every deltaT steps: mask)
              = target budget, masks kept fixed                t > T − tfinal

Masking zeroes ``λᵢ`` of every triplet whose score is at or below the ``(init − budget)``-th smallest score over all
layers. At step ``T − tfinal`` the final pattern is fixed; afterwards every step re-applies it. These are PEFT's
``RankAllocator`` and ``AdaLoraModel.update_and_allocate``, written against this library's adapters (found by type,
keyed by module path), with the same arithmetic, so the same weights and gradients give the same budgets and masks.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine import inject
    >>> from peft_callbacks.methods.adalora.method import AdaLoRAConfig
    >>> config = AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=["0", "1"], train_head=False)
    >>> net = inject(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), config)
    >>> allocator = RankAllocator(net, config)
    >>> for step in range(10):
    ...     loss = net(torch.randn(4, 8)).pow(2).mean() + orthogonal_regularization(net) * config.orth_reg_weight
    ...     loss.backward()
    ...     with torch.no_grad():
    ...         for p in net.parameters():
    ...             if p.grad is not None:
    ...                 p -= 0.1 * p.grad
    ...     budget, pattern = allocator.update_and_allocate(net, step)
    ...     net.zero_grad()
    >>> budget, sum(sum(mask) for mask in pattern.values())  # 2 layers x target_r 2
    (4, 4)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_module
from peft_callbacks.engine import get_method
from peft_callbacks.engine.surgery import check_adapter_name
from peft_callbacks.methods.adalora.method import AdaLoRA, AdaLoRAConfig, check_schedule

__all__ = ["RankAllocator", "adalora_adapters", "orthogonal_regularization"]

_TENSORS = ("lora_A", "lora_E", "lora_B")


def adalora_adapters(model: nn.Module, adapter_name: str = "default") -> dict[str, AdaLoRA]:
    """``{layer path: adapter}`` of the AdaLoRA adapters named ``adapter_name`` inside ``model``.

    Example::

        >>> from peft_callbacks.engine import inject
        >>> config = AdaLoRAConfig(init_r=2, target_r=1, target_modules=["0"], train_head=False)
        >>> list(adalora_adapters(inject(nn.Sequential(nn.Linear(4, 4)), config)))
        ['0']
    """
    check_module("model", model)
    check_adapter_name(adapter_name)
    layers = get_method("adalora").modules(model, adapter_name)
    return {path: layer.adapters[adapter_name] for path, layer in layers.items()}


def orthogonal_regularization(model: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """``mean over every P and Q of ‖M − I‖_F`` (``M = Q·Qᵀ`` or ``Pᵀ·P``): the regulariser PEFT adds to the loss
    (times ``orth_reg_weight``); 0 when ``model`` holds no such adapter.

    Example::

        >>> import torch.nn as nn
        >>> from peft_callbacks.engine import inject
        >>> from peft_callbacks.methods.adalora.method import AdaLoRAConfig
        >>> config = AdaLoRAConfig(init_r=2, target_r=1, target_modules=["0"], train_head=False)
        >>> net = inject(nn.Sequential(nn.Linear(4, 4)), config)
        >>> round(orthogonal_regularization(net).item(), 1)  # P and Q start near 0: ‖−I‖_F = √2
        1.4
    """
    terms = []
    for adapter in adalora_adapters(model, adapter_name).values():
        for gram in (adapter.lora_A @ adapter.lora_A.T, adapter.lora_B.T @ adapter.lora_B):  # (r, r) each
            identity = torch.eye(*gram.shape, device=gram.device, dtype=gram.dtype)
            terms.append(torch.norm(gram - identity, p="fro"))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum() / len(terms)


class RankAllocator:
    """The importance-driven budget of AdaLoRA (see the module docstring): call :meth:`update_and_allocate` after
    every optimizer step, with the gradients still in place.

    Args:
        model: the model holding the AdaLoRA adapters (its budget covers every one named ``adapter_name``).
        config: the schedule; by default the adapters' own config. Its ``total_step`` (or ``total_step``) must be set.
        adapter_name: which adapters.
        total_step: overrides ``config.total_step``.

    Example::

        >>> from peft_callbacks.engine import inject
        >>> net = inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), AdaLoRAConfig(init_r=3, target_r=1,
        ...              target_modules=["0", "1"], train_head=False))
        >>> allocator = RankAllocator(net, total_step=100)
        >>> allocator.init_bgt, allocator.target_bgt, allocator.budget_schedule(50)
        (6, 2, (2, True))

    Attributes:
        init_bgt: ``init_r`` × number of layers.
        target_bgt: ``target_r`` × number of layers.
        rank_pattern: ``{layer path: [kept?] * init_r}`` of the last allocation (``None`` before the first).
        budget: the budget of the last step.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdaLoRAConfig | None = None,
        adapter_name: str = "default",
        total_step: int | None = None,
    ) -> None:
        adapters = adalora_adapters(model, adapter_name)
        if not adapters:
            raise ValueError(f"`model` holds no AdaLoRA adapter named {adapter_name!r} (`adapter_name`); inject first.")
        if config is None:
            config = next(iter(adapters.values())).config
        if not isinstance(config, AdaLoRAConfig):
            raise TypeError(f"`config` must be an AdaLoRAConfig, got {type(config).__name__}.")
        total_step = config.total_step if total_step is None else total_step
        if total_step is None:
            raise ValueError(
                "`total_step` is needed for the budget schedule: pass it, or set AdaLoRAConfig(total_step)."
            )
        self.config = config.replace(total_step=check_schedule(total_step, config.tinit, config.tfinal))
        self.adapter_name = adapter_name
        self.init_bgt = sum(a.lora_A.shape[0] for a in adapters.values())
        self.target_bgt = config.target_r * len(adapters)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.budget = self.init_bgt
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the sensitivity statistics."""
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, whether to mask)`` at ``step`` (0-based count of optimizer steps before this one)."""
        tinit, tfinal, total_step = self.config.tinit, self.config.tfinal, self.config.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total_step - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % self.config.deltaT == 0

    def update_ipt(self, model: nn.Module) -> None:
        """Update the smoothed sensitivity and uncertainty of every entry from the current weights and gradients."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for path, adapter in adalora_adapters(model, self.adapter_name).items():
                for name in _TENSORS:
                    p = getattr(adapter, name)
                    key = f"{path}.{name}"
                    if key not in self.ipt:
                        self.ipt[key] = torch.zeros_like(p)
                        self.exp_avg_ipt[key] = torch.zeros_like(p)
                        self.exp_avg_unc[key] = torch.zeros_like(p)
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                    self.ipt[key] = (p * grad).abs().detach()
                    self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * self.ipt[key]
                    self.exp_avg_unc[key] = (
                        beta2 * self.exp_avg_unc[key] + (1 - beta2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()
                    )

    def _element_score(self, key: str) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{layer path: score of each triplet (r₀,)}`` from the current statistics."""
        scores = {}
        for path in adalora_adapters(model, self.adapter_name):
            ipt_a = torch.mean(self._element_score(f"{path}.lora_A"), dim=1, keepdim=True)  # (r, 1)
            ipt_b = torch.mean(self._element_score(f"{path}.lora_B"), dim=0, keepdim=False).view(-1, 1)  # (r, 1)
            ipt_ab = torch.cat([ipt_a, ipt_b], dim=1).sum(dim=1, keepdim=False)
            scores[path] = self._element_score(f"{path}.lora_E").view(-1) + ipt_ab.view(-1)
        return scores

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the singular values of the least important triplets until ``budget`` remain; the kept pattern."""
        scores = self.triplet_scores(model)
        k = self.init_bgt - budget
        rank_pattern = {}
        if k <= 0:  # nothing to take away (PEFT would fail here)
            return {path: [True] * len(s) for path, s in scores.items()}
        threshold = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=k)[0].item()
        with torch.no_grad():
            for path, adapter in adalora_adapters(model, self.adapter_name).items():
                masked = scores[path].view(-1, 1) <= threshold
                adapter.lora_E.masked_fill_(masked, 0.0)
                rank_pattern[path] = (~masked).view(-1).tolist()
        return rank_pattern

    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict[str, list[bool]]) -> None:
        """Zero the singular values a pattern drops (after the final allocation, every step)."""
        with torch.no_grad():
            for path, adapter in adalora_adapters(model, self.adapter_name).items():
                keep = torch.tensor(rank_pattern[path], device=adapter.lora_E.device).unsqueeze(-1)
                adapter.lora_E.masked_fill_(~keep, 0.0)

    def update_and_allocate(self, model: nn.Module, global_step: int) -> tuple[int, dict[str, list[bool]] | None]:
        """One step of the schedule (PEFT's ``AdaLoraModel.update_and_allocate``): update the statistics, and mask to
        the budget when the schedule says so; returns ``(budget, rank pattern)`` (the pattern once there is one).

        Args:
            model: the model given to the constructor (or one holding the same adapters under the same paths).
            global_step: the 0-based index of the optimizer step just taken.
        """
        config = self.config
        end = config.total_step - config.tfinal
        if global_step < end:
            self.update_ipt(model)
            self.budget, mask = self.budget_schedule(global_step)
            if mask:
                self.rank_pattern = self.mask_to_budget(model, self.budget)
        elif global_step == end:
            self.budget, _ = self.budget_schedule(global_step)
            self.rank_pattern = self.mask_to_budget(model, self.budget)
            self.reset_ipt()
        else:
            self.budget = self.target_bgt
            if self.rank_pattern is not None:
                self.mask_using_rank_pattern(model, self.rank_pattern)
        return self.budget, self.rank_pattern

    # -- state (for resuming) ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: the statistics, the pattern, the budget and the schedule's length."""
        return {
            "total_step": self.config.total_step,
            "budget": self.budget,
            "rank_pattern": self.rank_pattern,
            "ipt": dict(self.ipt),
            "exp_avg_ipt": dict(self.exp_avg_ipt),
            "exp_avg_unc": dict(self.exp_avg_unc),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (missing entries keep their current values)."""
        if not isinstance(state, dict):
            raise TypeError(f"`state` must be a dict from RankAllocator.state_dict(), got {type(state).__name__}.")
        if state.get("total_step") is not None:  # a resumed run continues the schedule it started
            self.config = self.config.replace(total_step=state["total_step"])
        self.budget = state.get("budget", self.budget)
        self.rank_pattern = state.get("rank_pattern", self.rank_pattern)
        for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(self, name, dict(state.get(name, getattr(self, name))))
