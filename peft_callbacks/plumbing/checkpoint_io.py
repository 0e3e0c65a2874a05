"""Checkpoint files that are never half written: the old file or the new one, whatever kills the process.

:class:`AtomicCheckpointIO` is Lightning's ``TorchCheckpointIO`` with the file written beside its destination, flushed
to disk and then moved into place in one step (``os.replace``); a leftover from a killed write is removed by the next
write to the same place. :class:`~peft_callbacks.SlimCheckpoint` puts it in the strategy's place (through the
:mod:`~peft_callbacks.plumbing.seam`, until its ``teardown``) when the trainer uses the default checkpoint IO.

Example::

    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "last.ckpt")
    >>> AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    >>> torch.load(path, weights_only=True)["step"], os.listdir(os.path.dirname(path))
    (1, ['last.ckpt'])
"""

from __future__ import annotations

from typing import Any

import fsspec
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from peft_callbacks.io.atomic import atomic_file
from peft_callbacks.plumbing import seam

__all__ = ["AtomicCheckpointIO", "use_atomic_checkpoint_io"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (see the module docstring); remote paths are left to it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        fs, _ = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or fs.protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as staging:
            torch.save(checkpoint, staging)
        return None


def use_atomic_checkpoint_io(strategy: Any, *, owner: Any) -> bool:
    """Swap a strategy's default ``TorchCheckpointIO`` for :class:`AtomicCheckpointIO` until ``owner``'s
    :func:`~peft_callbacks.plumbing.seam.undo`; False when it has another.

    Example::

        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> class Owner:
        ...     pass
        >>> strategy, owner = SingleDeviceStrategy("cpu"), Owner()
        >>> use_atomic_checkpoint_io(strategy, owner=owner), type(strategy.checkpoint_io).__name__
        (True, 'AtomicCheckpointIO')
        >>> seam.undo(owner)
        >>> type(strategy.checkpoint_io).__name__
        'TorchCheckpointIO'
    """
    if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        seam.replace(strategy, "checkpoint_io", AtomicCheckpointIO(), owner=owner)
        return True
    return False
