"""Mixture-of-experts structure: which Linear layers are routers, so default target selections leave them alone.

A router scores the experts for each token and the block keeps the top-k. An update merged into a router moves those
scores by a little, which is enough to flip which experts a token goes to: the merged model then differs from the
adapted one by far more than rounding. HF PEFT's ``"all-linear"`` adapts routers that are ``nn.Linear``; the default
selections here (``target_modules=None`` and ``"all-linear"``) leave them out, with a log line; naming one in
``target_modules`` still adapts it.

A router is found structurally: a Linear layer whose output size is the model config's number of experts
(``num_experts``, ``num_local_experts``, ``n_routed_experts`` or ``moe_num_experts``), whose block (its parent, or
its parent's parent when the router is wrapped in a router module) holds the experts as a child — a module list of
that many modules, or a module with a parameter whose first dimension is that number (the fused 3-D expert weights of
transformers 5).

Example::

    >>> import torch, torch.nn as nn
    >>> from types import SimpleNamespace
    >>> block = nn.Module()
    >>> block.gate = nn.Linear(8, 4)
    >>> block.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
    >>> model = nn.Sequential(block, nn.Linear(8, 4))  # the last Linear has 4 outputs too, outside any MoE block
    >>> model.config = SimpleNamespace(num_experts=4)
    >>> moe_routers(model)
    ['0.gate']
"""

from __future__ import annotations

import torch.nn as nn

from peft_callbacks.core.kinds import layer_kind

__all__ = ["moe_routers", "number_of_experts"]

_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def number_of_experts(model: nn.Module) -> int | None:
    """The number of experts per MoE block from ``model.config`` (or its text config), if it has one.

    Example::

        >>> from types import SimpleNamespace
        >>> model = nn.Linear(2, 2)
        >>> model.config = SimpleNamespace(num_local_experts=8)
        >>> number_of_experts(model), number_of_experts(nn.Linear(2, 2))
        (8, None)
    """
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for name in _EXPERT_COUNTS:
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                return value
    return None


def _is_experts(module: nn.Module, count: int) -> bool:
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and len(module) == count:
        return True
    return any(p.dim() == 3 and p.shape[0] == count for p in module.parameters(recurse=False))


def _holds_experts(module: nn.Module, count: int) -> bool:
    """Is ``module`` an MoE block: does it, or one of its children, hold ``count`` experts?"""
    return _is_experts(module, count) or any(_is_experts(child, count) for child in module.children())


def moe_routers(model: nn.Module) -> list[str]:
    """Paths of the Linear layers of ``model`` that route tokens to experts (see the module docstring)."""
    count = number_of_experts(model)
    if count is None:
        return []
    modules = dict(model.named_modules())
    routers = []
    for path, module in modules.items():
        if not path or layer_kind(module) != "linear" or module.out_features != count:
            continue
        parent = path.rpartition(".")[0]
        blocks = [parent] + ([parent.rpartition(".")[0]] if parent else [])  # the block, or the router's owner's
        if any(_holds_experts(modules[block], count) for block in blocks):
            routers.append(path)
    return routers
