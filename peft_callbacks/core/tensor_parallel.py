r"""Tensor parallelism as surgery meets it: adapters that follow the base layer's split.

The user splits their model in ``configure_model`` with ``parallelize_module`` (``ColwiseParallel`` /
``RowwiseParallel``, as Lightning's tensor-parallel docs show), perhaps with ``fully_shard`` on top (2-D: TP × FSDP2).
Each split ``nn.Linear`` then holds a ``DTensor`` weight and carries two forward hooks from its parallel style: one
turns the plain input into a ``DTensor`` of the style's input layout, one turns the output back into a plain tensor
of its output layout. Surgery reads the split from the weight's placements on the tensor-parallel mesh dimension::

    base split               weight       LoRA A (r, in)       LoRA B (out, r)     DoRA m (out,)   IA3 l
    ColwiseParallel (out)    Shard(0)     Replicate            Shard(0)            Shard(0)        output: Shard
    RowwiseParallel (in)     Shard(1)     Shard(1)             Replicate           Replicate       input:  Shard

Each adapter tensor is split along the dimension that runs along the base's split dimension (an adapter says which
of its dimensions run along the base's outputs and inputs: :meth:`~peft_callbacks.engine.layers.Adapter.
tensor_parallel_dims`); the rest is replicated. The wrapper that holds base and adapters takes over the base's two
hooks (:func:`move_parallel_hooks`), so inside it everything is a ``DTensor`` and every method's ordinary forward
runs on them unchanged::

    AdaptedLayer(x local) ─► style's input hook ─► x: DTensor (Replicate for colwise, Shard(-1) for rowwise)
        base_layer(x)          colwise: Shard(-1) output        rowwise: Partial (a sum not yet reduced)
        + adapter(x, result)   colwise: B·A·x is Shard(-1)      rowwise: A·x is Partial, so B·(A·x) is Partial
    ─► style's output hook ─► one reduction of base and adapter together (rowwise), a plain local tensor out

So a row-parallel layer's LoRA term joins the base's all-reduce (no communication of its own), and a column-parallel
layer's LoRA term is computed on this rank's output rows only. ``DTensor`` keeps the maths of the whole tensors
whatever the placements; the placements above only decide what each rank stores and sends. A replicated tensor whose
gradient comes out as a partial sum (A beside a column-split B) is reduced by a gradient hook, so every gradient has
its tensor's layout (FSDP2 does the same for its units).

Methods that do not say how their tensors follow a split are refused, naming the layer and the method
(:func:`distribute_adapters`).

Example::

    >>> import torch.nn as nn
    >>> tensor_parallel_split(nn.Linear(4, 2).weight, sharded_by_fsdp=False) is None  # a plain weight: not split
    True
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks.core.kinds import base_weight
from peft_callbacks.core.sharding import is_dtensor

__all__ = [
    "TensorParallelSplit",
    "data_parallel_mesh",
    "distribute_adapters",
    "forward_weight",
    "move_parallel_hooks",
    "tensor_parallel_split",
]

log = logging.getLogger(__name__)

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")
_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@dataclasses.dataclass(frozen=True)
class TensorParallelSplit:
    """How tensor parallelism splits one base weight.

    Attributes:
        mesh: the tensor-parallel device mesh (one dimension).
        dim: ``0`` when the outputs are split (``ColwiseParallel``: weight ``Shard(0)``), ``1`` when the inputs are
            (``RowwiseParallel``: ``Shard(1)``), ``None`` when the weight is replicated on the mesh.
    """

    mesh: Any
    dim: int | None

    @property
    def style(self) -> str:
        """``"column-parallel"``, ``"row-parallel"`` or ``"replicated"``, for messages."""
        return {0: "column-parallel", 1: "row-parallel"}.get(self.dim, "replicated")


def _data_parallel_dims(placements: tuple) -> int:
    """How many leading mesh dimensions FSDP2 owns: HSDP's ``Replicate`` ones, then its one ``Shard(0)`` (a
    ``_StridedShard(0)`` when tensor parallelism splits dimension 0 too)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard  # what FSDP2 puts over a TP Shard(0)

    for index, placement in enumerate(placements):
        if isinstance(placement, (Shard, _StridedShard)) and placement.dim == 0:
            return index + 1
        if not isinstance(placement, Replicate):
            break
    raise ValueError(
        f"Placements {tuple(placements)} do not start as FSDP2's do (Replicate()s for HSDP, then Shard(0)); the "
        f"data-parallel mesh dimensions cannot be told apart from tensor-parallel ones."
    )


def _submesh(mesh: Any, dims: range, what: str) -> Any:
    if len(dims) == mesh.ndim:
        return mesh
    names = mesh.mesh_dim_names
    if not names:
        raise ValueError(
            f"The {what} dimensions of a {mesh.ndim}-D device mesh without dimension names cannot be sliced out; "
            f"build the mesh with `mesh_dim_names` (Lightning's ModelParallelStrategy names them)."
        )
    picked = tuple(names[i] for i in dims)
    return mesh[picked[0] if len(picked) == 1 else picked]


def data_parallel_mesh(tensor: torch.Tensor) -> Any:
    """The mesh FSDP2 shards ``tensor`` (a parameter of an FSDP2 unit) on: its leading data-parallel dimensions.

    With tensor parallelism underneath (2-D), a parameter's mesh is the whole ``(data_parallel, tensor_parallel)``
    mesh; new FSDP2 units must be put on the data-parallel part only.

    Example::

        >>> data_parallel_mesh(torch.ones(2))  # a plain tensor: no mesh
    """
    if not is_dtensor(tensor):
        return None
    mesh = tensor.device_mesh
    return _submesh(mesh, range(_data_parallel_dims(tensor.placements)), "data-parallel")


def tensor_parallel_split(weight: torch.Tensor, *, sharded_by_fsdp: bool) -> TensorParallelSplit | None:
    """How tensor parallelism splits ``weight`` (a base layer's weight), or ``None`` when it does not.

    Args:
        weight: the base layer's weight as stored (a ``DTensor`` under FSDP2 and/or tensor parallelism).
        sharded_by_fsdp: whether the layer lies inside an FSDP2 unit (then the leading mesh dimensions are FSDP2's).

    Raises:
        ValueError: a layout tensor parallelism of ``nn.Linear`` does not give (several tensor-parallel mesh
            dimensions, a ``Shard`` of another dimension, a ``Partial`` weight).

    Example::

        >>> tensor_parallel_split(torch.ones(2, 2), sharded_by_fsdp=False) is None
        True
    """
    if not is_dtensor(weight):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    first = _data_parallel_dims(placements) if sharded_by_fsdp else 0
    rest = placements[first:]
    if not rest:
        return None
    if len(rest) > 1:
        raise ValueError(
            f"placements {placements} split the weight on {len(rest)} tensor-parallel mesh dimensions; adapters "
            f"follow one (ColwiseParallel or RowwiseParallel on a 1-D tensor-parallel mesh)."
        )
    placement = rest[0]
    if isinstance(placement, Replicate):
        dim = None
    elif type(placement) is Shard and placement.dim in (0, 1):
        dim = placement.dim
    else:
        raise ValueError(
            f"placements {placements}: the tensor-parallel dimension holds {placement}, not the Shard(0) of "
            f"ColwiseParallel or the Shard(1) of RowwiseParallel."
        )
    return TensorParallelSplit(_submesh(mesh, range(first, mesh.ndim), "tensor-parallel"), dim)


def _is_parallel_hook(hook: Any) -> bool:
    """Was ``hook`` registered by ``torch.distributed.tensor`` (a parallel style's input/output layout hook)?"""
    function = getattr(hook, "func", hook)  # a functools.partial
    return (getattr(function, "__module__", None) or "").startswith("torch.distributed.tensor")


def move_parallel_hooks(old: nn.Module, new: nn.Module) -> int:
    """Move the tensor-parallel layout hooks of ``old`` onto ``new``, which takes its place in the model; return
    how many moved.

    ``parallelize_module`` gives each split layer a hook that makes its plain input a ``DTensor`` and one that makes
    its output plain again. They belong to the place the layer holds: a wrapper around the layer takes them over (so
    inside it base and adapters all see ``DTensor`` s), and the layer gets them back when the wrapper goes (a merge,
    an unload). Other hooks stay where they are. Modules without such hooks are left alone.

    Example::

        >>> move_parallel_hooks(nn.Linear(2, 2), nn.Identity())
        0
    """
    moved = 0
    for name in _HOOK_DICTS:
        source, target = getattr(old, name), getattr(new, name)
        for handle_id in [h for h, hook in source.items() if _is_parallel_hook(hook)]:
            target[handle_id] = source.pop(handle_id)
            for flags in _HOOK_FLAGS:
                source_flags, target_flags = getattr(old, flags), getattr(new, flags)
                if handle_id in source_flags:
                    target_flags[handle_id] = source_flags.pop(handle_id)
            moved += 1
    return moved


def forward_weight(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base weight a forward pass computes with: the tensor-parallel ``DTensor`` itself when ``x`` is one (inside
    a split layer, where the maths runs on ``DTensor`` s), else :func:`~peft_callbacks.core.kinds.base_weight` (the
    full weight: dequantized, or gathered when sharded).

    Example::

        >>> layer = nn.Linear(2, 2)
        >>> forward_weight(layer, torch.ones(2)) is layer.weight
        True
    """
    weight = getattr(layer, "weight", None)
    if is_dtensor(x) and is_dtensor(weight):
        return weight
    return base_weight(layer)


def _gradient_in_layout(grad: torch.Tensor) -> torch.Tensor:
    """A partial-sum gradient of a replicated tensor, reduced: gradients keep their tensor's layout."""
    if not is_dtensor(grad) or not any(p.is_partial() for p in grad.placements):
        return grad
    from torch.distributed.tensor import Replicate

    return grad.redistribute(grad.device_mesh, [Replicate() if p.is_partial() else p for p in grad.placements])


_HOOKED = "_peft_callbacks_gradient_layout"


def _keep_gradients_in_layout(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a split adapter: every trainable ``DTensor`` it computes with gets the gradient hook once.
    At forward time rather than when the adapter is split: ``module.to(...)`` may replace a ``DTensor`` parameter by a
    new object (and FSDP2 computes with parameters of its own), which would not carry a hook registered earlier."""
    for param in module.parameters():
        if param.requires_grad and is_dtensor(param) and not getattr(param, _HOOKED, False):
            param.register_hook(_gradient_in_layout)
            setattr(param, _HOOKED, True)


def _placement(split: TensorParallelSplit, dims: tuple[int | None, int | None]) -> Any:
    from torch.distributed.tensor import Replicate, Shard

    along = None if split.dim is None else dims[split.dim]  # the tensor's dimension along the base's split one
    return Replicate() if along is None else Shard(along)


def distribute_adapter(adapter: nn.Module, split: TensorParallelSplit, where: str, title: str = "") -> None:
    """Turn ``adapter``'s tensors into ``DTensor`` s on ``split.mesh``, each split as its base is (see the module
    docstring); every rank holds the same full values beforehand and keeps its own slice (no communication).

    Args:
        adapter: the new adapter (an :class:`~peft_callbacks.engine.layers.Adapter`).
        split: how its base layer is split.
        where: the layer's path, for messages.
        title: the method's name, for messages (default: the adapter's class name).

    Raises:
        ValueError: the adapter's method cannot follow the split (it gives no ``tensor_parallel_dims``, or leaves a
            tensor out); the message names ``where`` (the layer) and the method.
    """
    from torch.distributed.tensor import distribute_tensor

    dims = adapter.tensor_parallel_dims()
    params = dict(adapter.named_parameters())
    missing = sorted(set(params) - set(dims or {}))
    if dims is None or missing or list(adapter.buffers()):
        raise ValueError(
            f"{title or type(adapter).__name__} cannot follow the tensor-parallel split of {where!r} "
            f"({split.style}, {split.mesh.size()} ranks): the method does not say how its tensors "
            f"{missing or list(params)} divide along the base's split. Methods that can: LoRA, DoRA and IA3. "
            f"Leave this layer out of the plan, exclude it (`exclude_modules`), or use FSDP2 alone "
            f"(tensor_parallel_size=1)."
        )
    for name, param in params.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = adapter.get_submodule(owner_path)
        value = distribute_tensor(param.detach(), split.mesh, [_placement(split, dims[name])], src_data_rank=None)
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=param.requires_grad)
    adapter.register_forward_pre_hook(_keep_gradients_in_layout)


def distribute_adapters(
    layers: Iterable[tuple[str, nn.Module, Iterable[nn.Module]]],
    in_fsdp_unit: Callable[[str], bool],
    title: Callable[[nn.Module], str] = lambda adapter: type(adapter).__name__,
) -> int:
    """Split the new adapters of tensor-parallel base layers as their bases are split; return how many.

    Args:
        layers: ``(path, base layer, new adapters)`` for each wrapper that received adapters.
        in_fsdp_unit: whether the layer at a path lies inside an FSDP2 unit (then its leading mesh dimensions are
            FSDP2's, see :func:`tensor_parallel_split`).
        title: an adapter's method name, for messages.

    Raises:
        ValueError: a layer's layout, or an adapter that cannot follow it (both name the layer).

    Example::

        >>> distribute_adapters([("0", nn.Linear(2, 2), [nn.Linear(2, 2)])], lambda path: False)  # not split
        0
    """
    count = 0
    for path, base, adapters in layers:
        weight = getattr(base, "weight", None)
        try:
            split = tensor_parallel_split(weight, sharded_by_fsdp=in_fsdp_unit(path))
        except ValueError as err:
            raise ValueError(f"The weight of {path!r} has a layout adapters cannot follow: {err}") from None
        if split is None:
            continue
        for adapter in adapters:
            distribute_adapter(adapter, split, path, title(adapter))
            count += 1
    if count:
        log.info("Split %d adapter(s) across tensor-parallel ranks as their base layers are split.", count)
    return count
