"""Where ``SlimCheckpoint`` takes over Lightning's checkpoint loading: a slim checkpoint written under one strategy
resumes under another (:mod:`peft_callbacks.io.slim_reshard`).

===========================  ===================================================================================
resuming under               a slim checkpoint that is …
===========================  ===================================================================================
FSDP2, any number of ranks   a distributed folder: resharded by ``torch.distributed.checkpoint``; a ``torch.save``
                             file (one process, DDP): each rank keeps its slices of the full tensors
DDP or one process           a distributed folder: read whole on every rank and handed to Lightning as the file a
                             DDP run writes (optimizer states keyed by index); a file: Lightning's own loading
===========================  ===================================================================================

In every case the module loads strictly: trained tensors from the checkpoint, base tensors (as recorded) from the
module as built. FSDP2 loads model and optimizer states inside ``strategy.load_checkpoint`` (after ``setup``); DDP
and one process load the model before ``setup`` and the optimizers after it, from the dict returned here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME

from peft_callbacks.io.checkpoint import strip_loader_key
from peft_callbacks.io.slim import check_slim_record, load_distributed_slim
from peft_callbacks.io.slim_reshard import load_full_slim, optimizer_state_by_index, read_distributed_checkpoint
from peft_callbacks.io.state import loaded_keys
from peft_callbacks.plumbing.strategies import set_checkpoint_loader

log = logging.getLogger(__name__)

__all__ = ["install_slim_loader"]


def install_slim_loader(strategy: pl.strategies.Strategy, kind: str, record_key: str, *, owner: Any) -> None:
    """Let ``strategy`` (of :func:`~peft_callbacks.plumbing.strategies.strategy_kind` ``kind``) resume from slim
    checkpoints of any layout; full checkpoints (no ``record_key`` record) load as Lightning loads them. The loader
    stays until ``owner``'s (the callback's) :func:`~peft_callbacks.plumbing.seam.undo`.

    Example::

        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> from peft_callbacks.plumbing import seam
        >>> class Owner:
        ...     pass
        >>> strategy, owner = SingleDeviceStrategy("cpu"), Owner()
        >>> install_slim_loader(strategy, "single", "peft_callbacks_slim", owner=owner)
        >>> "load_checkpoint" in vars(strategy)
        True
        >>> seam.undo(owner)
        >>> "load_checkpoint" in vars(strategy)
        False
    """

    def load(checkpoint_path: Any, weights_only: bool | None) -> dict[str, Any] | None:
        path = Path(strategy.broadcast(checkpoint_path))
        safe = weights_only is not False  # None (Lightning's default) means safe: nothing is unpickled
        if (path / _METADATA_FILENAME).is_file():
            metadata = torch.load(path / _METADATA_FILENAME, weights_only=safe)
            record = metadata.get(record_key)
            if record is None:
                return None  # a full checkpoint: the strategy's own loading
            if kind == "fsdp2":
                metadata.pop(record_key)
                load_distributed_slim(path, strategy.model, strategy.optimizers, record)
                log.info("SlimCheckpoint: loaded the trained shards from %s; the base stays as built.", path)
                return metadata
            return _as_single_file(path, metadata)
        if kind == "fsdp2" and path.is_file():
            return _load_file_sharded(strategy, path, record_key)
        return None

    set_checkpoint_loader(strategy, load, owner=owner)


def _as_single_file(path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """A distributed slim checkpoint as one process's: full trained tensors and index-keyed optimizer states, which
    Lightning then loads (the base filled in by ``SlimCheckpoint`` from the module, strictly)."""
    saved = read_distributed_checkpoint(path)
    optimizers = sorted((k for k in saved if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    log.info("SlimCheckpoint: read the distributed checkpoint %s whole (%d trained tensors).", path, len(saved))
    return {
        **metadata,
        "state_dict": saved.get("state_dict", {}),
        "optimizer_states": [optimizer_state_by_index(saved[k]) for k in optimizers],
    }


def _load_file_sharded(strategy: pl.strategies.Strategy, path: Path, record_key: str) -> dict[str, Any] | None:
    """A slim ``torch.save`` checkpoint (one process, DDP) loaded into the FSDP2-sharded module: each rank keeps its
    slices; a full checkpoint goes to the strategy's own loading. Read with ``weights_only=True``: nothing is
    unpickled."""
    checkpoint = strategy.checkpoint_io.load_checkpoint(path, weights_only=True)
    record = checkpoint.pop(record_key, None)
    if record is None:
        return None
    model = strategy.model
    omitted = check_slim_record(model, record)
    trained, states = checkpoint.pop("state_dict"), checkpoint.pop("optimizer_states", [])
    strip_loader_key(trained)  # the key that makes a plain `load_from_checkpoint` name the loader
    load_full_slim(model, strategy.optimizers, trained, states, omitted, loaded_keys(model))
    log.info("SlimCheckpoint: loaded %s into the sharded module (%d trained tensors).", path, len(trained))
    return checkpoint
