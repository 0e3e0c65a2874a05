"""Parameter targets of LoRA (``target_parameters``): finding, checking and grouping them by the module that owns them.

A parameter target is the dotted path of a parameter (``model.layers.0.mlp.experts.gate_up_proj``), recorded beside
module targets in the same ``targets`` list; a path names a module or a parameter, never both. Patterns follow the
rules of ``target_modules`` (exact, dotted suffix as in PEFT — ``"experts.gate_up_proj"`` — or a regex).

Example::

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential()
    >>> model.add_module("experts", nn.Module())
    >>> model.experts.register_parameter("gate_up_proj", nn.Parameter(torch.zeros(4, 6, 3)))
    >>> select_parameters(model, ["gate_up_proj"])
    ['experts.gate_up_proj']
    >>> group_parameters(model, ["experts.gate_up_proj"])
    {'experts': ['gate_up_proj']}
"""

from __future__ import annotations

import torch
import torch.nn as nn

from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.targets import path_matches
from peft_callbacks.engine.parameters import AdaptedParameters

__all__ = ["group_parameters", "parameter_at", "select_parameters", "split_targets"]

_MAX_LISTED = 12


def _owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every module whose own parameters can be targeted (inside parameter wrappers: the base)."""
    out: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, AdaptedParameters):
                out.append((path, child.base_layer))
            elif not isinstance(child, PEFTModule):
                out.append((path, child))
                visit(child, path)

    visit(model, "")
    return out


def parameter_at(model: nn.Module, path: str) -> tuple[str, nn.Module, str, torch.Tensor] | None:
    """``(owner path, owner module, name, parameter)`` for a parameter path (through a parameter wrapper), else None."""
    owner_path, _, name = path.rpartition(".")
    try:
        owner = model.get_submodule(owner_path)
    except AttributeError:
        return None
    if isinstance(owner, AdaptedParameters):
        owner = owner.base_layer
    param = owner._parameters.get(name)
    return None if param is None else (owner_path, owner, name, param)


def select_parameters(model: nn.Module, patterns: list[str]) -> list[str]:
    """The paths of the 2-D and 3-D parameters that ``patterns`` select, in model order; each pattern must select one.

    Raises:
        ValueError: a pattern selects no parameter (the message lists the 3-D and 2-D ones that exist).
    """
    candidates = [
        f"{path}.{name}"
        for path, module in _owners(model)
        for name, param in module.named_parameters(recurse=False)
        if param.dim() in (2, 3)
    ]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [c for c in candidates if path_matches(pattern, c)]
        if not hits:
            stacks = [c for c in candidates if (p := parameter_at(model, c)) is not None and p[3].dim() == 3]
            listed = (stacks or candidates)[:_MAX_LISTED]
            raise ValueError(
                f"`target_parameters` entry {pattern!r} matched no 2-D or 3-D parameter of {type(model).__name__}; "
                f"{'3-D expert stacks' if stacks else 'parameters'} include: {', '.join(listed) or '(none)'}."
            )
        chosen.update(hits)
    return [c for c in candidates if c in chosen]


def split_targets(model: nn.Module, targets: list[str]) -> tuple[list[str], list[str]]:
    """``(module paths, parameter paths)`` of a target list."""
    modules = {path for path, _ in model.named_modules()}
    return [t for t in targets if t in modules], [t for t in targets if t not in modules]


def group_parameters(model: nn.Module, paths: list[str]) -> dict[str, list[str]]:
    """``{owner path: [parameter names in the owner's own order]}`` for parameter paths.

    Raises:
        ValueError: a path names no parameter.
    """
    groups: dict[str, set[str]] = {}
    owners: dict[str, nn.Module] = {}
    for path in paths:
        found = parameter_at(model, path)
        if found is None:
            raise ValueError(
                f"`targets` entry {path!r} names neither a module nor a parameter of {type(model).__name__}."
            )
        owner_path, owner, name, _ = found
        groups.setdefault(owner_path, set()).add(name)
        owners[owner_path] = owner
    return {
        path: [n for n, _ in owners[path].named_parameters(recurse=False) if n in names]
        for path, names in groups.items()
    }
