"""Slim checkpoints across strategies: written under FSDP2 with N ranks, resumed under DDP, on one process or on M
FSDP2 ranks, and the reverse.

A slim checkpoint holds the trained tensors, the optimizers' states and the loop state; the frozen base comes from
the module as built (:mod:`peft_callbacks.io.slim`). Two layouts exist, one per kind of strategy:

=================================  ==========================================  ==================================
written by                         layout                                      optimizer state keyed by
=================================  ==========================================  ==================================
FSDP2 (``ModelParallelStrategy``)  a ``torch.distributed.checkpoint`` folder   parameter name
                                   (one shard per rank) and ``meta.pt``        (``get_optimizer_state_dict``)
one process, DDP                   one ``torch.save`` file, full tensors       parameter index
                                                                               (``optimizer.state_dict()``)
=================================  ==========================================  ==================================

Each direction is a change of layout, never a looser load: every key of the model's ``state_dict`` that loading reads
is either in the checkpoint or recorded as base-omitted, and the model loads the completed state with ``strict=True``.

* **folder → plain model** (:func:`read_distributed_checkpoint`): every rank reads the whole folder (a slim
  checkpoint is small) into full tensors; optimizer states are re-keyed by index (:func:`optimizer_state_by_index`).
  Values other than tensors (the optimizers' hyper-parameters) are read with ``torch.load(weights_only=True)``.
* **file → sharded model** (:func:`load_full_slim`): each rank keeps its slice of every full tensor; optimizer states
  are re-keyed by name and handed to ``set_optimizer_state_dict`` as full states.
* **folder → sharded model, any number of ranks**: ``torch.distributed.checkpoint`` reshards
  (:func:`~peft_callbacks.io.slim.load_distributed_slim`).

Example::

    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    >>> by_name = {"state": {"w": {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    >>> by_index = optimizer_state_by_index(by_name)
    >>> by_index["param_groups"][0]["params"], list(by_index["state"])
    ([0], [0])
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks.core.sharding import is_dtensor, shard_as

__all__ = [
    "complete_state",
    "load_full_slim",
    "optimizer_state_by_index",
    "optimizer_state_by_name",
    "read_distributed_checkpoint",
]


def read_distributed_checkpoint(path: str | Path) -> dict[str, Any]:
    """Everything a ``torch.distributed.checkpoint`` folder holds, as full values on this process alone (no
    collective: every rank may call it, each reads the whole folder).

    Tensors come back whole, whatever the ranks that wrote them; other values (hyper-parameters, parameter names)
    are read with ``torch.load(weights_only=True)``, so nothing is unpickled.

    Example::

        >>> import tempfile, torch.distributed.checkpoint as dcp
        >>> folder = tempfile.mkdtemp()
        >>> _ = dcp.save({"state_dict": {"w": torch.ones(2)}, "hyper": {"lr": 0.5}}, checkpoint_id=folder)
        >>> read_distributed_checkpoint(folder)
        {'state_dict': {'w': tensor([1., 1.])}, 'hyper': {'lr': 0.5}}
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # fills `state` in place (Lightning
    # reads distributed checkpoints whole the same way)

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)), planner=_plain_values_planner(), no_dist=True)
    return state


def _plain_values_planner() -> Any:
    """A planner that allocates every saved entry (as Lightning's ``_load_distributed_checkpoint`` does) and reads
    non-tensor entries with ``weights_only=True`` instead of a full unpickle."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner

    class PlainValuesPlanner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return PlainValuesPlanner()


def optimizer_state_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (``get_optimizer_state_dict``, as FSDP2 checkpoints hold it) in
    ``optimizer.state_dict()``'s layout: parameters numbered in the order of the saved param groups.

    Example::

        >>> state = {"state": {"b": {"step": 1}}, "param_groups": [{"params": ["a"]}, {"params": ["b"]}]}
        >>> optimizer_state_by_index(state)
        {'state': {1: {'step': 1}}, 'param_groups': [{'params': [0]}, {'params': [1]}]}
    """
    order = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: values for name, values in state["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in state["param_groups"]],
    }


def optimizer_state_by_name(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_by_index` for ``optimizer`` (built the same way as the one saved):
    ``optimizer.state_dict()``'s numbering mapped to parameter names (``names``: ``{id(parameter): name}``).

    Raises:
        ValueError: the saved param groups do not match the optimizer's (another ``configure_optimizers``).

    Example::

        >>> p = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([p], lr=0.1)
        >>> optimizer_state_by_name({"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, opt, {id(p): "w"})
        {'state': {}, 'param_groups': [{'lr': 0.1, 'params': ['w']}]}
    """
    ours = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    saved = [len(group["params"]) for group in state["param_groups"]]
    if saved != [len(group) for group in ours]:
        raise ValueError(
            f"The checkpoint's optimizer has param groups of {saved} tensors, this run's {[len(g) for g in ours]}: "
            f"build the optimizer as when the checkpoint was written."
        )
    order = [name for group in ours for name in group]
    return {
        "state": {order[index]: values for index, values in state["state"].items()},
        "param_groups": [{**group, "params": names_} for group, names_ in zip(state["param_groups"], ours)],
    }


def complete_state(
    model: nn.Module, trained: dict[str, torch.Tensor], omitted: dict[str, str], loaded: set[str]
) -> dict[str, torch.Tensor]:
    """``model``'s state for a strict load: the checkpoint's ``trained`` tensors, cut as the model's own are (its
    ``DTensor`` slices), and the model's current tensors for the base keys the checkpoint left out.

    Args:
        model: the model to load (sharded or not).
        trained: full or already cut tensors from the checkpoint.
        omitted: the checkpoint's base-omitted keys (``{key: base name}``).
        loaded: the keys ``model.load_state_dict`` reads.

    Raises:
        ValueError: a key that is neither in the checkpoint nor recorded as omitted, or a checkpoint key the model
            does not have (the checkpoint was written for another surgery).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    current = {k: v for k, v in get_model_state_dict(model).items() if k in loaded}
    unexpected = sorted(set(trained) - set(current))
    missing = sorted(set(current) - set(trained) - set(omitted))
    if unexpected or missing:
        raise ValueError(
            f"The slim checkpoint does not fit {type(model).__name__}: "
            + "; ".join(
                f"{what} {keys[:5]}{' …' if len(keys) > 5 else ''}"
                for what, keys in (("keys it lacks:", missing), ("keys the model lacks:", unexpected))
                if keys
            )
            + ". Redo the same surgery (the same callbacks and arguments) as when it was written."
        )
    for key, value in trained.items():
        reference = current[key]
        current[key] = value if is_dtensor(value) else shard_as(reference, value.to(reference.device, reference.dtype))
    return current


def load_full_slim(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    trained: dict[str, torch.Tensor],
    optimizer_states: list[dict[str, Any]],
    omitted: dict[str, str],
    loaded: set[str],
) -> None:
    """Load a slim checkpoint of full tensors (one process's or DDP's file) into a model sharded by FSDP2: each rank
    keeps its slice of every trained tensor and of every optimizer state; the base stays as built.

    Every rank calls it (each holds the whole file). ``model`` is the module the strategy saves (its parameter
    names are the checkpoint's keys).

    Raises:
        ValueError: the checkpoint does not fit the model or the optimizers (see :func:`complete_state`).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, complete_state(model, trained, omitted, loaded))  # strict
    if len(optimizer_states) != len(optimizers):
        raise ValueError(
            f"The checkpoint holds {len(optimizer_states)} optimizer state(s), this run has {len(optimizers)} "
            f"optimizer(s)."
        )
    names = {id(p): name for name, p in model.named_parameters()}
    for optimizer, state in zip(optimizers, optimizer_states):
        by_name = optimizer_state_by_name(state, optimizer, names)
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
