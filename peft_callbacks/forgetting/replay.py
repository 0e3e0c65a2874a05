r"""Experience replay: draw base-task examples to mix into each training step, a set share of the examples.

With ``fraction = f``, a step on ``B`` new-task examples draws ``n ≈ B·f/(1 − f)`` base-task examples, so that
base examples are a share ``f`` of the combined ``B + n``; the fractional remainder carries over to the next step,
so over many steps the share is ``f`` up to one example. Examples are taken in the base loader's order, cycling
through it (pass a shuffling loader for a random order), so the replayed stream is the same from run to run.
With several processes, each step the stream advances by ``n`` examples per process and process ``r`` takes the
``r``-th block: together the processes replay ``world_size · n`` different examples, as one process would on the
combined batch (Chaudhry et al. 2019, "On tiny episodic memories in continual learning": one step on the joint
batch of new and memory examples).

Example::

    >>> import torch
    >>> stream = ReplayStream(lambda: [(torch.arange(4.0)[:, None], torch.arange(4))], fraction=0.5)
    >>> [stream.draw(batch_size=3)[1].tolist() for _ in range(2)]
    [[0, 1, 2], [3, 0, 1]]
    >>> stream.drawn, stream.seen
    (6, 6)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch: the first dimension of its first tensor.

    Raises:
        TypeError: the batch holds no tensor.

    Example::

        >>> batch_size_of({"input_ids": torch.zeros(5, 3), "labels": torch.zeros(5)})
        5
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        try:
            return batch_size_of(item)
        except TypeError:
            continue
    raise TypeError(f"Cannot tell the number of examples of a batch of type {type(batch).__name__}.")


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch (tensors sliced on their first dimension, structure kept)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, start, stop) for v in batch)
    return batch


def concat_batches(parts: list[Any]) -> Any:
    """Join batches of the same structure along the first dimension."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: concat_batches([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(concat_batches([p[i] for p in parts]) for i in range(len(first)))
    return first


class ReplayStream:
    """An endless stream of base-task examples, drawn a share ``fraction`` of each step's examples.

    Args:
        make_batches: returns a fresh iterable of base-task batches (called again each time the stream wraps).
        fraction: share of base-task examples in each combined step, in ``(0, 1)``.
        rank: this process's index; with ``world_size`` processes each takes its own block of every draw.
        world_size: number of processes.

    Attributes:
        drawn: base-task examples drawn by this process so far.
        seen: new-task examples the draws were made for (``drawn / (drawn + seen) → fraction``).
    """

    def __init__(
        self, make_batches: Callable[[], Iterable[Any]], fraction: float, rank: int = 0, world_size: int = 1
    ) -> None:
        self.make_batches = make_batches
        self.fraction = fraction
        self.rank, self.world_size = rank, world_size
        self.drawn = 0
        self.seen = 0
        self.position = 0  # examples consumed from the stream (all processes), for resuming
        self.carry = 0.0
        self._iterator: Iterator[Any] | None = None
        self._pending: list[Any] = []  # the rest of the current base batch

    def count_for(self, batch_size: int) -> int:
        """How many base examples to draw for ``batch_size`` new ones (carrying the fractional part)."""
        exact = batch_size * self.fraction / (1.0 - self.fraction) + self.carry
        n = int(exact)
        self.carry = exact - n
        return n

    def _next_batch(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self.make_batches())
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.make_batches())
            try:
                return next(self._iterator)
            except StopIteration:
                raise ValueError("The base-task `dataloader` yielded no batches; replay needs at least one.") from None

    def _take(self, n: int) -> list[Any]:
        parts, needed = [], n
        while needed > 0:
            if not self._pending:
                self._pending = [self._next_batch()]
            batch = self._pending.pop()
            size = batch_size_of(batch)
            parts.append(slice_batch(batch, 0, min(size, needed)))
            if size > needed:
                self._pending = [slice_batch(batch, needed, size)]
            needed -= min(size, needed)
        return parts

    def draw(self, batch_size: int) -> Any | None:
        """Base-task examples for a step on ``batch_size`` new ones, or ``None`` when the share rounds to zero."""
        n = self.count_for(batch_size)
        self.seen += batch_size
        if n == 0:
            return None
        blocks = self._take(n * self.world_size)  # every process advances the stream the same way
        self.position += n * self.world_size
        mine = _block(blocks, self.rank * n, (self.rank + 1) * n)
        self.drawn += n
        return concat_batches(mine)

    def skip(self, examples: int) -> None:
        """Advance the stream by ``examples`` (all processes), e.g. to where a checkpoint left it."""
        if examples > 0:
            self._take(examples)
            self.position += examples


def _block(parts: list[Any], start: int, stop: int) -> list[Any]:
    out, offset = [], 0
    for part in parts:
        size = batch_size_of(part)
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            out.append(slice_batch(part, lo - offset, hi - offset))
        offset += size
    return out
