"""Slim checkpoints: a ``state_dict`` that keeps only the trained tensors, and how to fill it back from the base.

During PEFT training the base model never changes, so a checkpoint needs only the trained tensors (see
:mod:`peft_callbacks.io.state`) plus the optimizer and loop state. :func:`slim_state_dict` drops the base tensors from
a ``state_dict`` and returns a small record (which keys were dropped, under which base name, and a fingerprint of the
base). :func:`fill_slim_state_dict` puts the base tensors back from the model as built, after checking that its base
is the one the checkpoint was trained on, so the model then loads the checkpoint with ``strict=True`` as usual.

Example::

    >>> import copy, torch, torch.nn as nn
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))  # the model as the job builds it, each time the same
    >>> tuned = inject_lora(copy.deepcopy(base), rank=2)
    >>> state = tuned.state_dict()
    >>> record = slim_state_dict(tuned, state)
    >>> sorted(state)
    ['0.adapters.default.lora_A.weight', '0.adapters.default.lora_B.weight', '1.bias', '1.weight']
    >>> resumed = inject_lora(copy.deepcopy(base), rank=2)
    >>> _ = resumed.load_state_dict(fill_slim_state_dict(resumed, state, record))  # strict
    >>> torch.equal(resumed[0].adapters["default"].lora_A.weight, tuned[0].adapters["default"].lora_A.weight)
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks.io.fingerprint import base_fingerprint, compare_fingerprints
from peft_callbacks.io.slim_reshard import complete_state
from peft_callbacks.io.state import base_keys, base_state, loaded_keys, trained_state

__all__ = [
    "SLIM_CHECKPOINT_KEY",
    "SLIM_FORMAT_VERSION",
    "SlimCheckpointError",
    "check_slim_record",
    "fill_slim_state_dict",
    "load_distributed_slim",
    "slim_state_dict",
]

SLIM_FORMAT_VERSION = 1
SLIM_CHECKPOINT_KEY = "peft_callbacks_slim"  # the entry of a Lightning checkpoint that holds the slim record


class SlimCheckpointError(ValueError):
    """A slim checkpoint that cannot be filled from this model's base (a ``ValueError``).

    Example::

        >>> issubclass(SlimCheckpointError, ValueError)
        True
    """


def slim_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], fingerprint: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Drop the base tensors of ``model`` from ``state_dict`` (in place); return the record needed to fill it back.

    Args:
        model: the model whose ``state_dict()`` ``state_dict`` is (same keys).
        state_dict: modified in place: only the trained tensors stay.
        fingerprint: :func:`~peft_callbacks.io.fingerprint.base_fingerprint` of ``model``, if already computed
            (the base does not change during training, so a caller may compute it once).

    Returns:
        ``{"format_version", "omitted": {key: base name}, "fingerprint"}`` (plain Python values).

    Example::

        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(2, 2).requires_grad_(False), nn.Linear(2, 2))
        >>> state = net.state_dict()
        >>> sorted(slim_state_dict(net, state)["omitted"]), sorted(state)
        (['0.bias', '0.weight'], ['1.bias', '1.weight'])
    """
    trained = trained_state(model)
    names = base_keys(model)
    omitted = {key: names[key] for key in list(state_dict) if key not in trained and key in names}
    for key in omitted:
        del state_dict[key]
    return {
        "format_version": SLIM_FORMAT_VERSION,
        "omitted": omitted,
        "fingerprint": fingerprint if fingerprint is not None else base_fingerprint(model),
    }


def fill_slim_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], record: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Put the base tensors of ``model`` back into a slim ``state_dict`` (in place) and return it.

    The base tensors are read from ``model`` as it is now, through its PEFT wrappers, so this works before or after
    the surgery is redone on it. Only the keys that ``load_state_dict`` reads are put back (a quantized layer's
    statistics stay out: the layer as built already holds them, and loading them is refused).

    Raises:
        SlimCheckpointError: a newer format, or ``model``'s base differs from the checkpoint's (another model,
            another pretrained checkpoint, or LoRA already merged into the base weights).

    Example::

        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(2, 2).requires_grad_(False), nn.Linear(2, 2))
        >>> state = net.state_dict()
        >>> record = slim_state_dict(net, state)
        >>> sorted(fill_slim_state_dict(net, state, record))
        ['0.bias', '0.weight', '1.bias', '1.weight']
    """
    omitted = check_slim_record(model, record)
    base = base_state(model)
    unknown = [name for name in omitted.values() if name not in base]
    if unknown:
        raise SlimCheckpointError(
            f"The slim checkpoint names {len(unknown)} base tensor(s) that {type(model).__name__} does not have: "
            f"{unknown[:5]}."
        )
    loaded = loaded_keys(model)
    for key, name in omitted.items():
        if key in loaded:
            state_dict.setdefault(key, base[name])
    return state_dict


def check_slim_record(model: nn.Module, record: Any) -> dict[str, str]:
    """Refuse a malformed record, a newer format, or one trained on another base than ``model``'s; return its
    ``omitted`` map (every rank calls it when ``model`` is sharded: the fingerprint gathers).

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2).requires_grad_(False), nn.Linear(2, 2))
        >>> check_slim_record(net, slim_state_dict(net, net.state_dict()))
        {'0.weight': '0.weight', '0.bias': '0.bias'}

    Raises:
        SlimCheckpointError: naming what is wrong.
    """
    if not isinstance(record, dict):
        raise SlimCheckpointError(f"The slim checkpoint's record must be an object, got {type(record).__name__}.")
    version = record.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > SLIM_FORMAT_VERSION:
        raise SlimCheckpointError(
            f"The slim checkpoint has format version {version!r}; this peft_callbacks reads versions up to "
            f"{SLIM_FORMAT_VERSION}. Upgrade peft_callbacks to load it."
        )
    omitted, saved = record.get("omitted"), record.get("fingerprint")
    if not isinstance(omitted, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in omitted.items()):
        raise SlimCheckpointError("The slim checkpoint's field 'omitted' must map state_dict keys to base names.")
    if not isinstance(saved, dict):
        raise SlimCheckpointError("The slim checkpoint's field 'fingerprint' is missing or not an object.")
    diffs = compare_fingerprints(saved, base_fingerprint(model, hash_names=saved.get("hashes", {})))
    if diffs:
        raise SlimCheckpointError(
            f"This slim checkpoint holds only trained tensors; their base must come from {type(model).__name__} as "
            f"built, but its base differs from the one trained: {'; '.join(diffs)}. Build the module as for training "
            f"(unmerged: after a LoRA merge, rebuild it or keep `merge_on_train_end=False`), or use full checkpoints."
        )
    return omitted


def load_distributed_slim(
    path: str | Path, model: nn.Module, optimizers: list[torch.optim.Optimizer], record: dict[str, Any]
) -> None:
    """Load a distributed checkpoint (``torch.distributed.checkpoint``, one shard per rank) that holds only the
    trained tensors into the sharded ``model``, and the optimizers' states; the base stays as built.

    Every rank calls it; the checkpoint may have been written by another number of ranks (``torch.distributed.
    checkpoint`` reshards). The checkpoint is laid out as Lightning's ``ModelParallelStrategy`` writes it: the model
    under ``"state_dict"``, optimizer ``i`` under ``"optimizer_{i}"``. The model loads strictly: its trained tensors
    from the checkpoint, its base keys (as recorded) from itself.

    Args:
        path: the checkpoint directory.
        model: the sharded model, with the same surgery as when the checkpoint was written.
        optimizers: the optimizers to restore, in order.
        record: what :func:`slim_state_dict` returned when the checkpoint was written.

    Raises:
        SlimCheckpointError: another format version, another base (see :func:`fill_slim_state_dict`), or trained
            tensors the model does not have.

    Example::

        >>> import tempfile, torch.distributed.checkpoint as dcp
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> def base():
        ...     _ = torch.manual_seed(0)
        ...     return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> tuned = inject_lora(base(), rank=2)
        >>> _ = tuned[0].adapters["default"].lora_B.weight.data.fill_(0.5)  # "trained"
        >>> state = tuned.state_dict()
        >>> record = slim_state_dict(tuned, state)
        >>> folder = tempfile.mkdtemp()
        >>> _ = dcp.save({"state_dict": state}, checkpoint_id=folder)  # sharded: one file per rank
        >>> resumed = inject_lora(base(), rank=2)
        >>> load_distributed_slim(folder, resumed, [], record)
        >>> float(resumed[0].adapters["default"].lora_B.weight.detach().mean())
        0.5
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    omitted = check_slim_record(model, record)
    loaded = loaded_keys(model)
    kept = {k: v for k, v in get_model_state_dict(model).items() if k in loaded and k not in omitted}
    saved = {
        k.removeprefix("state_dict.")
        for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        if k.startswith("state_dict.")
    }
    if saved - set(kept):
        raise SlimCheckpointError(
            f"The slim checkpoint holds trained tensors {sorted(saved - set(kept))[:5]} that "
            f"{type(model).__name__} does not train; redo the same surgery as when it was written."
        )
    dcp.load({"state_dict": kept}, checkpoint_id=path)  # resharded onto this run's ranks; a key it lacks raises
    set_model_state_dict(model, complete_state(model, kept, omitted, loaded))  # strict: the base as built
    for index, optimizer in enumerate(optimizers):
        key = f"optimizer_{index}"
        state = {key: get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=path)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state[key], options=StateDictOptions())
