"""Full weights of a model (after a merge, a plain model): ``save_pretrained`` or one safetensors file.

Example::

    >>> import tempfile, torch.nn as nn
    >>> (save_weights(nn.Linear(2, 2), tempfile.mkdtemp()) / "model.safetensors").is_file()
    True
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file, save_model

from peft_callbacks._validation import check_module
from peft_callbacks.core.sharding import gather_state_dict, has_sharded_parameters, is_writer
from peft_callbacks.io.atomic import atomic_file, file_set

__all__ = ["save_state_dict", "save_weights"]


def save_weights(model: nn.Module, directory: str | Path) -> Path:
    """Save the full weights of ``model`` (e.g. after merging) into ``directory``.

    A transformers model is saved with its own ``save_pretrained`` (``config.json`` + ``model.safetensors``, loadable
    with ``from_pretrained``); any other module as ``model.safetensors`` holding its ``state_dict`` (shared tensors
    once). Only these files change in ``directory``, together (:mod:`peft_callbacks.io.atomic`); files an earlier
    ``save_weights`` wrote there and this one does not (shards of a larger save) are removed, and nothing else. A
    sharded model (FSDP2, ZeRO-3) is gathered tensor by tensor (:func:`~peft_callbacks.core.sharding.
    gather_state_dict`): every rank must call it, and global rank 0 writes.

    Returns:
        The directory.
    """
    check_module("model", model)
    if not isinstance(directory, (str, Path)) or not str(directory):
        raise TypeError(f"`directory` must be a non-empty str or pathlib.Path, got {type(directory).__name__}.")
    if has_sharded_parameters(model):
        return _save_sharded(model, directory)
    with file_set(directory, "weights") as folder:
        if callable(getattr(model, "save_pretrained", None)):
            model.save_pretrained(str(folder))
        else:
            save_model(model, str(folder / "model.safetensors"))
    return Path(directory)


def _save_sharded(model: nn.Module, directory: str | Path) -> Path:
    state = gather_state_dict(model)  # every rank gathers; only the writer keeps the full tensors
    if is_writer():
        with file_set(directory, "weights") as folder:
            if callable(getattr(model, "save_pretrained", None)):
                model.save_pretrained(str(folder), state_dict=state)
            else:
                save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return Path(directory)


def save_state_dict(module: nn.Module, path: str | Path) -> Path:
    """Write ``module.state_dict()`` to one ``.safetensors`` file in one step (tied tensors stored once).

    Example::

        >>> import tempfile, os, torch.nn as nn
        >>> tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
        >>> tied[1].weight = tied[0].weight
        >>> path = save_state_dict(tied, os.path.join(tempfile.mkdtemp(), "w.safetensors"))
        >>> from safetensors.torch import load_file
        >>> sorted(load_file(str(path)))
        ['0.weight']
    """
    check_module("module", module)
    with atomic_file(path) as staging, torch.no_grad():
        save_model(module, str(staging))
    return Path(path)
