"""The ``peft_callbacks`` record of a checkpoint, read as untrusted input, as adapter files are.

:func:`~peft_callbacks.io.checkpoint.write_plain_layout` writes it; a checkpoint is a file from anywhere, so before
anything of it is used :func:`read_record` checks every field (types, adapter names, finite tensors: the same
:func:`~peft_callbacks.io.checks.check_tensors` as adapter files) and :func:`check_replay` compares what replaying its
surgeries would create (a dry run on ``meta``) with the tensors it stores, so a rank of 2**22 is refused before
anything is allocated. Every problem raises :class:`CheckpointLayoutError` naming the field.

Example::

    >>> import torch
    >>> record = {"format_version": 1, "layout": "adapted", "recipes": {}, "layers": {"q": "folded"}, "tensors": {}}
    >>> read_record({"peft_callbacks": record})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    peft_callbacks.io.checkpoint_record.CheckpointLayoutError: ... field 'layers.q' must be an object, got str.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_adapter_name
from peft_callbacks.engine.shadow import expected_shapes
from peft_callbacks.io.checks import check_tensors

__all__ = [
    "CHECKPOINT_KEY",
    "FORMAT_VERSION",
    "CheckpointLayoutError",
    "check_recipes",
    "check_replay",
    "read_record",
    "stored_tensors",
]

CHECKPOINT_KEY = "peft_callbacks"
FORMAT_VERSION = 1
_WHERE = f"The checkpoint's {CHECKPOINT_KEY!r} entry:"


class CheckpointLayoutError(ValueError):
    """A checkpoint whose adapted layout cannot be rebuilt on this module (a ``ValueError``).

    Example::

        >>> issubclass(CheckpointLayoutError, ValueError)
        True
    """


def read_record(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """``checkpoint["peft_callbacks"]``, checked; ``None`` for checkpoints written without it.

    Raises:
        CheckpointLayoutError: a malformed record or a newer format version.

    Example::

        >>> read_record({"state_dict": {}}) is None
        True
    """
    record = checkpoint.get(CHECKPOINT_KEY)
    if record is None:
        return None
    if not isinstance(record, dict):
        raise CheckpointLayoutError(f"The checkpoint's {CHECKPOINT_KEY!r} entry must be a dict, got {type(record)}.")
    version = record.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointLayoutError(
            f"The checkpoint's {CHECKPOINT_KEY!r} entry has format version {version!r}; this peft_callbacks reads "
            f"versions up to {FORMAT_VERSION}. Upgrade peft_callbacks to load it."
        )
    for field, kind in (("layout", str), ("recipes", dict), ("layers", dict), ("tensors", dict)):
        if not isinstance(record.get(field), kind):
            raise CheckpointLayoutError(
                f"{_WHERE} field {field!r} must be a {kind.__name__}, got {type(record.get(field)).__name__}."
            )
    if record["layout"] not in ("merged", "adapted"):
        raise CheckpointLayoutError(f"Unknown checkpoint layout {record['layout']!r}; known: 'merged', 'adapted'.")
    check_recipes(record["recipes"])
    _check_layers(record["layers"])
    tensors = record["tensors"]
    bad = [k for k, t in tensors.items() if not isinstance(k, str) or not isinstance(t, torch.Tensor)]
    if bad:
        raise CheckpointLayoutError(f"{_WHERE} field 'tensors' must map names to tensors; {bad[0]!r} does not.")
    check_tensors(tensors, f"{_WHERE} field 'tensors'", CheckpointLayoutError)  # as adapter files: finite floats
    return record


def _names(value: Any, field: str) -> None:
    if not isinstance(value, list):
        raise CheckpointLayoutError(f"{_WHERE} field {field!r} must be a list of adapter names, got {type(value)}.")
    for name in value:
        _name(name, field)


def _name(value: Any, field: str) -> None:
    try:
        check_adapter_name(value, field)
    except (TypeError, ValueError) as err:
        raise CheckpointLayoutError(f"{_WHERE} {err}") from None


def check_recipes(recipes: dict) -> None:
    """Refuse ``recipes`` unless it is ``{model path: [surgery record]}``, each record an object with a method, a
    config and a plain adapter name (the replay checks the config itself).

    Raises:
        CheckpointLayoutError: naming the field.
    """
    for path, records in recipes.items():
        field = f"recipes.{path}"
        if not isinstance(path, str) or not isinstance(records, list):
            raise CheckpointLayoutError(f"{_WHERE} field {field!r} must be a list of surgery records.")
        for i, r in enumerate(records):
            if not isinstance(r, dict) or not isinstance(r.get("method"), str) or not isinstance(r.get("config"), dict):
                raise CheckpointLayoutError(
                    f"{_WHERE} field '{field}[{i}]' must be an object with a 'method' string and a 'config' object."
                )
            if "adapter_name" in r:
                _name(r["adapter_name"], f"{field}[{i}].adapter_name")
            dropped = r.get("dropped", [])
            if not isinstance(dropped, list) or not all(isinstance(p, str) for p in dropped):
                raise CheckpointLayoutError(f"{_WHERE} field '{field}[{i}].dropped' must be a list of module paths.")


def _check_layers(layers: dict) -> None:
    """``{layer path: {"folded": [names], "active": [names], "digests": {"weight"/"bias": str or None}}}``."""
    for path, info in layers.items():
        field = f"layers.{path}"
        if not isinstance(path, str) or not isinstance(info, dict):
            raise CheckpointLayoutError(f"{_WHERE} field {field!r} must be an object, got {type(info).__name__}.")
        for key in ("folded", "active"):
            _names(info.get(key, []), f"{field}.{key}")
        digests = info.get("digests", {})
        if not isinstance(digests, dict) or not all(d is None or isinstance(d, str) for d in digests.values()):
            raise CheckpointLayoutError(f"{_WHERE} field '{field}.digests' must map 'weight'/'bias' to strings.")


def stored_tensors(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Every tensor of the model a checkpoint holds, keyed as in the module (``state_dict`` and the record's
    adapter tensors); ``None`` when the strategy keeps the model state elsewhere (sharded checkpoints)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        return None
    record = read_record(checkpoint)
    return {**state, **(record["tensors"] if record is not None else {})}


def check_replay(model: nn.Module, plans: dict[str, list], stored: dict[str, torch.Tensor] | None) -> None:
    """Refuse recorded surgeries that do not fit the checkpoint, before anything is allocated.

    ``plans`` is ``{model path: records to replay there}``. The shapes each replay would create are found by a dry
    run on ``meta`` (:func:`~peft_callbacks.engine.shadow.expected_shapes`) and compared with the tensors the
    checkpoint stores (``stored``): each must be there, with that shape. Without ``stored`` (a sharded checkpoint)
    what the replays would create is bounded instead: at most four times the model's own size (or 2**24 values).

    Raises:
        CheckpointLayoutError: a record that cannot be replayed, or tensors that do not fit (naming them).
    """
    created: dict[str, tuple[int, ...]] = {}
    for path, records in plans.items():
        try:
            shapes = expected_shapes(model.get_submodule(path), records)
        except (TypeError, ValueError) as err:
            raise CheckpointLayoutError(f"{_WHERE} the surgery recorded on {path or '<root>'!r}: {err}") from None
        created.update({f"{path}.{k}" if path else k: s for k, s in shapes.items()})
    if stored is None:
        size, limit = (
            sum(math.prod(s) for s in created.values()),
            max(4 * sum(p.numel() for p in model.parameters()), 2**24),
        )
        if size > limit:
            raise CheckpointLayoutError(
                f"{_WHERE} its surgery would create {size:,} values, more than four times {type(model).__name__} "
                f"itself; refusing to allocate them."
            )
        return
    wrong = [f"{k} {tuple(stored[k].shape)} vs {s}" for k, s in created.items() if k in stored and stored[k].shape != s]
    missing = [k for k in created if k not in stored]
    if wrong or missing:
        problems = "; ".join(
            f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
            for label, keys in (("stored shapes differ", wrong), ("not stored", missing))
            if keys
        )
        raise CheckpointLayoutError(
            f"{_WHERE} its recorded surgery does not fit the tensors it stores ({problems}); refusing to replay it."
        )
