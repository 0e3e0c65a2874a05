r"""Sharded parameters as surgery meets them: FSDP2 ``DTensor`` shards and DeepSpeed ZeRO-3 partitions.

Under FSDP2 (``fully_shard``) each parameter is a ``DTensor``: every rank holds one slice (``Shard(0)``), and the
full tensor exists only inside the forward and backward of its unit. Under DeepSpeed ZeRO-3 a partitioned parameter
has shape ``[0]``; its real shape is ``ds_shape``. Surgery needs four things from such tensors, all here:

* shapes without gathering anything (:func:`full_shape`);
* full values (:func:`full_tensor`, :func:`full_parameters`, :func:`gather_state_dict`): these are *collectives*,
  so every rank calls them, in the same order;
* writing a full value back into the slice each rank keeps (:func:`write_full`), without communication;
* new tensors in a model that is already sharded (:func:`shard_new_modules`): each inserted module becomes an FSDP2
  unit of its own, on the mesh of the unit around it::

      fully_shard(block)            ← the user's unit: the frozen base, all-gathered every step
      └── q_proj: AdaptedLayer
          ├── base_layer            (in the block's unit, unchanged)
          └── adapters.default      ← fully_shard([all new modules in this block]): one small unit per block

Plain tensors pass through every function unchanged, so the same code runs on one device, under DDP and sharded.

Example::

    >>> import torch, torch.nn as nn
    >>> layer = nn.Linear(4, 2)
    >>> is_sharded(layer.weight), tuple(full_shape(layer.weight)), full_tensor(layer.weight) is layer.weight
    (False, (2, 4), True)
    >>> with full_parameters(layer, writeback=True):
    ...     _ = layer.weight.data.zero_()
    >>> bool(layer.weight.abs().sum() == 0)
    True
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_bool, check_module

__all__ = [
    "full_parameters",
    "full_shape",
    "full_tensor",
    "gather_state_dict",
    "has_sharded_parameters",
    "inside_fsdp_unit",
    "is_dtensor",
    "is_sharded",
    "is_writer",
    "is_zero3",
    "shard_new_modules",
    "unsharded_class",
    "write_full",
]

log = logging.getLogger(__name__)


@functools.cache
def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor: Any) -> bool:
    """Is ``tensor`` a ``DTensor`` (an FSDP2 shard, or a tensor-parallel slice)?

    Example::

        >>> is_dtensor(torch.ones(2))
        False
    """
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def is_zero3(tensor: Any) -> bool:
    """Is ``tensor`` a parameter partitioned by DeepSpeed ZeRO-3 (it carries ``ds_id`` and ``ds_shape``)?

    Example::

        >>> is_zero3(torch.ones(2))
        False
    """
    return isinstance(tensor, torch.Tensor) and hasattr(tensor, "ds_id") and hasattr(tensor, "ds_shape")


def is_sharded(tensor: Any) -> bool:
    """Does ``tensor`` hold only part of its values on this rank (a ``DTensor`` or a ZeRO-3 partition)?

    Example::

        >>> is_sharded(torch.ones(2))
        False
    """
    return is_dtensor(tensor) or is_zero3(tensor)


def has_sharded_parameters(module: nn.Module) -> bool:
    """Does any parameter of ``module`` hold only part of its values on this rank?

    Example::

        >>> has_sharded_parameters(nn.Linear(2, 2))
        False
    """
    return any(is_sharded(p) for p in check_module("module", module).parameters())


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor, without gathering it (a ``DTensor``'s global shape, ZeRO-3's ``ds_shape``).

    Example::

        >>> full_shape(torch.ones(3, 2))
        torch.Size([3, 2])
    """
    return torch.Size(tensor.ds_shape) if is_zero3(tensor) else tensor.shape


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor`` on this rank: gathered from every rank when sharded (a collective), else itself.

    The result of a gather is a new tensor detached from autograd; changing it changes nothing in the model (write
    with :func:`write_full`).

    Example::

        >>> t = torch.ones(2)
        >>> full_tensor(t) is t
        True
    """
    if is_dtensor(tensor):
        with torch.no_grad():
            return tensor.full_tensor()
    if is_zero3(tensor):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            return tensor.data.detach().clone()
    return tensor


def write_full(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write the full tensor ``value`` into ``target`` in place, cast to ``target``'s dtype.

    A ``DTensor`` keeps its own slice of ``value`` (every rank holds the same ``value``; nothing is sent); a ZeRO-3
    partition is gathered, written on rank 0 and partitioned again (a collective).

    Example::

        >>> t = torch.zeros(2)
        >>> write_full(t, torch.tensor([1.0, 2.0]))
        >>> t.tolist()
        [1.0, 2.0]
    """
    with torch.no_grad():
        if is_dtensor(target):
            if not is_dtensor(value):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(
                    value.to(target.device, target.dtype),
                    target.device_mesh,
                    target.placements,
                    src_data_rank=None,  # every rank holds `value`: each keeps its own slice, no communication
                )
            target.to_local().copy_(value.to_local().to(target.dtype))
        elif is_zero3(target):
            import deepspeed

            with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                target.data.copy_(value.to(target.device, target.dtype))
        else:
            target.copy_(value.to(target.dtype))


def shard_as(reference: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) cut the way ``reference`` is: this rank's ``DTensor`` slice, else ``value``.

    Lets a caller keep many merged weights at the memory cost of their shards (ZeRO-3 partitions are written back
    whole by :func:`write_full`).

    Example::

        >>> value = torch.ones(2)
        >>> shard_as(torch.zeros(2), value) is value  # nothing to cut on one process
        True
    """
    if not is_dtensor(reference):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, reference.device_mesh, reference.placements, src_data_rank=None)


@contextlib.contextmanager
def full_parameters(module: nn.Module, *, writeback: bool = False) -> Iterator[nn.Module]:
    """Inside the block every parameter of ``module`` is a plain full tensor on every rank (a collective).

    ``DTensor`` parameters are gathered and swapped for plain ``nn.Parameter`` s (tied ones once); ZeRO-3
    partitions are gathered with ``deepspeed.zero.GatheredParameters``. With ``writeback=True`` the values the block
    leaves in them are written back into the shards (for ZeRO-3, rank 0's values). The block may move or replace
    modules (a merge does): each parameter goes back to the module that held it. Gather one unit (a layer, a block)
    at a time to bound memory. Plain parameters are left as they are.

    Args:
        module: the module whose parameters (recursively) are needed whole.
        writeback: write changes made inside the block back into the shards.

    Example::

        >>> layer = nn.Linear(2, 2)
        >>> with full_parameters(layer) as same:
        ...     same is layer
        True
    """
    check_module("module", module)
    check_bool("writeback", writeback)
    swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    full: dict[int, nn.Parameter] = {}
    zero3: dict[int, torch.Tensor] = {}
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if is_dtensor(param):
                if id(param) not in full:
                    full[id(param)] = nn.Parameter(full_tensor(param), requires_grad=param.requires_grad)
                swapped.append((owner, name, param, full[id(param)]))
            elif is_zero3(param):
                zero3[id(param)] = param
    with contextlib.ExitStack() as stack:
        if zero3:
            import deepspeed

            stack.enter_context(
                deepspeed.zero.GatheredParameters(list(zero3.values()), modifier_rank=0 if writeback else None)
            )
        for owner, name, _, replacement in swapped:
            owner._parameters[name] = replacement
        try:
            yield module
        finally:
            written: set[int] = set()
            for owner, name, original, replacement in swapped:
                owner._parameters[name] = original
                if writeback and id(original) not in written:
                    written.add(id(original))
                    write_full(original, replacement.detach())


def is_writer() -> bool:
    """Is this the process that writes files: global rank 0, or the only process?

    Example::

        >>> is_writer()  # no process group here
        True
    """
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s full ``state_dict`` for saving: gathered tensor by tensor, kept (on CPU) by the writing rank only.

    Every rank must call it when ``model`` is sharded; the writing rank (:func:`is_writer`) gets every key, the other
    ranks an empty dict. A tied tensor appears once, under its first key. An unsharded model returns its own
    ``state_dict`` (tensors not copied).

    Example::

        >>> sorted(gather_state_dict(nn.Linear(2, 2)))
        ['bias', 'weight']
    """
    check_module("model", model)
    state = model.state_dict(keep_vars=True)
    sharded = any(is_sharded(t) for t in state.values())
    writer = is_writer()
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if not sharded:
            out[key] = tensor.detach()
            continue
        value = full_tensor(tensor)  # every rank joins each gather, in the same order
        if writer:
            out[key] = value.detach().to("cpu", copy=True)
    return out


@functools.cache
def _fsdp_module_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def unsharded_class(module: nn.Module) -> type:
    """``module``'s own class: ``fully_shard`` swaps it for a subclass (``FSDPLlamaForCausalLM``) named after it.

    Example::

        >>> unsharded_class(nn.Linear(2, 2)).__name__
        'Linear'
    """
    cls = type(module)
    fsdp_module = _fsdp_module_class()
    if fsdp_module is not None and issubclass(cls, fsdp_module):
        cls = next(c for c in cls.__mro__ if not issubclass(c, fsdp_module))
    return cls


def inside_fsdp_unit(model: nn.Module, path: str) -> bool:
    """Does the module at ``path`` lie inside an FSDP2 unit (a module ``fully_shard`` was called on, itself included)?

    Example::

        >>> inside_fsdp_unit(nn.Sequential(nn.Linear(2, 2)), "0")
        False
    """
    fsdp_module = _fsdp_module_class()
    return fsdp_module is not None and _enclosing_unit(model, path, fsdp_module) is not None


def _enclosing_unit(model: nn.Module, path: str, fsdp_module: type) -> nn.Module | None:
    parts = path.split(".") if path else []
    for end in range(len(parts), -1, -1):
        candidate = model.get_submodule(".".join(parts[:end]))
        if isinstance(candidate, fsdp_module):
            return candidate
    return None


def _copy_view_output(module: nn.Module, args: Any, output: Any) -> Any:
    # FSDP2 registers its pre-backward hook on a unit's output; an in-place op by the model's code on an output that
    # is a view would drop that hook (torch warns). A LoRA output is often a view (addmm, then reshape): copy it.
    if isinstance(output, torch.Tensor) and output._base is not None:
        return output.clone()
    return output


class _DropMaterializedZeros(torch.autograd.Function):
    """Identity on a ``DTensor`` input of an adapter unit. FSDP2 passes a unit's inputs through an autograd function
    of its own; when the adapter does not use one of them (IA3 never reads ``x``), autograd materialises its
    gradient as a plain zero tensor, which cannot be added to the ``DTensor`` gradient from the base layer. Dropped
    here: an unused input gets no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor | None:
        return grad if is_dtensor(grad) else None


def _guard_dtensor_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(_DropMaterializedZeros.apply(a) if is_dtensor(a) and a.requires_grad else a for a in args)


def shard_new_modules(model: nn.Module, modules: Iterable[tuple[str, nn.Module]]) -> int:
    """Give the inserted ``modules`` of an FSDP2-sharded ``model`` their own FSDP2 units; return how many units.

    The new modules inside one user unit (say a transformer block) form one unit together, on that unit's mesh
    (FSDP or HSDP alike): one small all-gather per block, trainable tensors apart from the frozen base, one dtype
    per unit. A model without FSDP2 units is left alone. Modules that are FSDP2 units already are skipped, so calling
    it twice changes nothing. New tensors that tensor parallelism splits (``DTensor`` s on its mesh) become 2-D: FSDP2
    shards them on the data-parallel dimensions of the unit around them.

    Args:
        model: the model the modules were inserted into.
        modules: ``(path, module)`` of the inserted modules that own parameters.

    Raises:
        ValueError: a new module lies outside every FSDP2 unit, or its trainable parameters have several dtypes.

    Example::

        >>> shard_new_modules(nn.Linear(2, 2), [("", nn.Linear(2, 2))])  # not sharded: nothing to do
        0
    """
    check_module("model", model)
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None or not any(isinstance(m, fsdp_module) for m in model.modules()):
        return 0  # not sharded by FSDP2 (tensor parallelism alone splits tensors without units)
    groups: dict[int, tuple[nn.Module, list[nn.Module]]] = {}
    for path, module in modules:
        params = list(module.parameters())
        if not params or isinstance(module, fsdp_module):
            continue
        unit = _enclosing_unit(model, path, fsdp_module)
        if unit is None:
            raise ValueError(
                f"{path or type(module).__name__!r} was inserted into a model sharded with DTensors but lies outside "
                f"every `fully_shard` unit; call `fully_shard` on the model itself too (the root), as "
                f"Lightning's FSDP2 examples do."
            )
        dtypes = {p.dtype for p in params if p.requires_grad}
        if len(dtypes) > 1:
            raise ValueError(
                f"{path!r} holds trainable tensors of several dtypes ({sorted(map(str, dtypes))}); FSDP2 needs one "
                f"dtype per unit. Cast the model to one dtype before fit."
            )
        groups.setdefault(id(unit), (unit, []))[1].append(module)
    if not groups:
        return 0
    from torch.distributed.fsdp import fully_shard

    from peft_callbacks.core.tensor_parallel import data_parallel_mesh

    for unit, members in groups.values():
        # the unit's FSDP2 mesh: with tensor parallelism underneath, only the leading (data-parallel) dimensions
        mesh = data_parallel_mesh(next(p for p in unit.parameters() if is_dtensor(p)))
        for member in members:
            member.register_forward_hook(_copy_view_output)
        fully_shard(members if len(members) > 1 else members[0], mesh=mesh)
        for member in members:
            member.register_forward_pre_hook(_guard_dtensor_inputs, prepend=True)  # before FSDP2's own pre-hook
    log.info("Sharded the inserted modules as %d FSDP2 unit(s).", len(groups))
    return len(groups)
