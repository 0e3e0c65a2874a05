r"""Checks that every rank of a distributed run trains, and saves, what it should; each problem names the tensor
(and so its layer) and the ranks.

Sharding hides failures that a single process shows at once: an adapter whose gradient never arrives (its layer runs
frozen on some rank, a hook skipped), a gather that only rank 0 joined and that filled the other ranks' share with
zeros, a shard lost to a bad load. Both checks are collectives (every rank calls them, in the same order) and return
the same list of problems on every rank, so all ranks stop together:

* :func:`gradient_problems`, after the first backward: every trainable tensor got a finite gradient on every rank
  (one flag per tensor and rank, all-gathered: ``world_size × tensors`` small integers);
* :func:`saved_tensor_problems`, before a save: no tensor to be written is empty, none that was sharded has a rank's
  share all zero while the rest is not (``1/world_size`` of its rows), and every rank gathered the same values
  (a SHA-256 per tensor, all-gathered as integers: nothing is pickled).

On one process (no process group) both return no problem without looking.

Example::

    >>> import torch
    >>> gradient_problems([("w", torch.nn.Parameter(torch.ones(2)))])  # one process: nothing to compare
    []
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from peft_callbacks.core.sharding import is_dtensor

__all__ = ["DistributedCheckError", "gradient_problems", "saved_tensor_problems"]

_NONE, _NON_FINITE, _FINITE = 0, 1, 2


class DistributedCheckError(RuntimeError):
    """A distributed run that would train or save something other than what one process would.

    Example::

        >>> issubclass(DistributedCheckError, RuntimeError)
        True
    """


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _ranks(flags: torch.Tensor, column: int, value: int) -> list[int]:
    return [rank for rank in range(flags.shape[0]) if int(flags[rank, column]) == value]


def _all_gather(local: torch.Tensor) -> torch.Tensor:
    """``local`` of every rank, stacked: ``(world_size, *local.shape)``."""
    gathered = [torch.empty_like(local) for _ in range(_world_size())]
    torch.distributed.all_gather(gathered, local)
    return torch.stack(gathered)


def gradient_problems(
    named_parameters: Iterable[tuple[str, torch.Tensor]], *, allow_missing: bool = False, check_finite: bool = True
) -> list[str]:
    """One line per trainable tensor that did not get a finite gradient on every rank (a collective).

    Args:
        named_parameters: the trainable tensors, in the same order on every rank.
        allow_missing: a tensor without a gradient on *every* rank is no problem (DDP with
            ``find_unused_parameters=True`` expects such tensors); one without a gradient on *some* ranks still is.
        check_finite: also report NaN/Inf gradients (off under a gradient scaler, which skips such steps itself).

    Returns:
        The problems, the same on every rank; empty when every rank has every gradient.

    Example::

        >>> gradient_problems([])
        []
    """
    params = list(named_parameters)
    if _world_size() == 1 or not params:
        return []
    device = _local(params[0][1]).device
    local = []
    for _, param in params:
        grad = param.grad
        if grad is None:
            local.append(_NONE)
        else:
            finite = bool(torch.isfinite(_local(grad)).all()) if check_finite else True
            local.append(_FINITE if finite else _NON_FINITE)
    flags = _all_gather(torch.tensor(local, dtype=torch.int32, device=device)).cpu()  # (world_size, tensors)
    problems = []
    for column, (name, _) in enumerate(params):
        missing, non_finite = _ranks(flags, column, _NONE), _ranks(flags, column, _NON_FINITE)
        if missing and not (allow_missing and len(missing) == flags.shape[0]):
            problems.append(f"{name!r}: no gradient on rank(s) {missing}")
        if non_finite:
            problems.append(f"{name!r}: NaN/Inf gradient on rank(s) {non_finite}")
    return problems


def _digest(tensor: torch.Tensor) -> torch.Tensor:
    """SHA-256 of ``tensor``'s bytes as 8 int32 words (all-gathered as integers)."""
    data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return torch.frombuffer(bytearray(hashlib.sha256(data).digest()), dtype=torch.int32)


def _zero_shares(full: torch.Tensor, source: torch.Tensor) -> list[str]:
    """The shares of ``source`` (a ``DTensor``) whose slice of ``full`` is all zeros while ``full`` is not."""
    from torch.distributed.tensor import Shard

    if not is_dtensor(source) or full.numel() == 0 or not bool(full.any()):
        return []
    mesh = source.device_mesh
    found = []
    for mesh_dim, placement in enumerate(source.placements):
        if type(placement) is not Shard:  # (a strided shard's slices are not contiguous: not checked)
            continue
        for index, chunk in enumerate(torch.chunk(full, mesh.size(mesh_dim), dim=placement.dim)):
            if chunk.numel() and not bool(chunk.any()):
                ranks = mesh.mesh.select(mesh_dim, index).flatten().tolist()
                found.append(f"the share of rank(s) {ranks} (dim {placement.dim}) is all zeros")
    return found


def saved_tensor_problems(gathered: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """One line per tensor about to be saved that is degenerate or not the same on every rank (a collective).

    Args:
        gathered: ``{name: (full value as gathered on this rank, the tensor it was gathered from)}``, the same names
            in the same order on every rank.

    Returns:
        The problems, the same on every rank.

    Example::

        >>> saved_tensor_problems({"w": (torch.ones(2), torch.ones(2))})  # one process
        []
    """
    if _world_size() == 1 or not gathered:
        return []
    problems = []
    for name, (full, source) in gathered.items():
        if full.numel() == 0:
            problems.append(f"{name!r} is empty (zero-size)")
        problems.extend(f"{name!r}: {what}" for what in _zero_shares(full, source))
    device = _local(next(iter(gathered.values()))[1]).device
    digests = torch.stack([_digest(full) for full, _ in gathered.values()]).to(device)  # (tensors, 8)
    every = _all_gather(digests).cpu()  # (world_size, tensors, 8)
    for column, name in enumerate(gathered):
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in range(every.shape[0]):
            groups.setdefault(tuple(every[rank, column].tolist()), []).append(rank)
        if len(groups) > 1:
            problems.append(f"{name!r}: the ranks gathered different values ({' vs '.join(map(str, groups.values()))})")
    # the same lines on every rank: a problem seen by one rank's values is reported by all
    return _agree(problems, device)


def _agree(problems: list[str], device: torch.device) -> list[str]:
    """Every rank's problems, merged in rank order (lines can differ: each rank inspects its own gathered values)."""
    encoded = "\n".join(problems).encode()
    length = _all_gather(torch.tensor([len(encoded)], dtype=torch.int64, device=device)).max()
    if int(length) == 0:
        return []
    padded = torch.zeros(int(length), dtype=torch.uint8)
    if encoded:
        padded[: len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
    merged: list[str] = []
    for row in _all_gather(padded.to(device)).cpu():
        for line in bytes(row.tolist()).rstrip(b"\0").decode().splitlines():
            if line not in merged:
                merged.append(line)
    return merged
