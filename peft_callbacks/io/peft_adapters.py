"""Several adapters in one HF PEFT directory, in the layout of PEFT's ``save_pretrained``.

PEFT saves the adapter named ``"default"`` at the top of the directory and every other adapter in a sub-directory
named after it, each with its own ``adapter_config.json`` and ``adapter_model.safetensors``::

    saved/
    ├── adapter_config.json          adapter "default" (if the model has one)
    ├── adapter_model.safetensors
    ├── sst2/adapter_config.json     adapter "sst2"
    └── mrpc/…                       adapter "mrpc"

``PeftModel.from_pretrained(base, "saved")`` loads the top one and ``peft_model.load_adapter("saved/sst2", "sst2")``
the others. :func:`export_adapters` and :func:`import_adapters` (``export_peft`` / ``import_peft`` without an
adapter name) write and read that layout. A model here has one task head, shared by its adapters; each PEFT adapter
saves it as its ``modules_to_save``.

Example::

    >>> import os, tempfile, torch.nn as nn
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2, train_head=False)
    >>> net = inject_lora(net, rank=2, train_head=False, adapter_name="b")
    >>> folder = export_adapters(net, tempfile.mkdtemp())
    >>> sorted(f for f in os.listdir(folder) if not f.startswith("."))  # the card at the top, as PEFT writes it
    ['README.md', 'adapter_config.json', 'adapter_model.safetensors', 'b']
    >>> sorted(os.listdir(folder / "b"))
    ['adapter_config.json', 'adapter_model.safetensors']
    >>> sorted(import_adapters(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), folder)[0].adapters)
    ['b', 'default']
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from peft_callbacks._validation import check_adapter_name
from peft_callbacks.engine import DEFAULT_ADAPTER
from peft_callbacks.engine.adapters import adapter_names
from peft_callbacks.engine.transaction import transaction
from peft_callbacks.io.atomic import file_set, path_inside
from peft_callbacks.io.model_card import card_keep, write_card

__all__ = ["export_adapters", "import_adapters", "peft_folders"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def export_adapters(model: nn.Module, directory: str | Path, names: list[str] | None = None) -> Path:
    """Write the adapters ``names`` (default: every adapter) of ``model`` in PEFT's multi-adapter layout.

    Only these files change in ``directory``, together (:mod:`peft_callbacks.io.atomic`); the sub-folders of adapters
    an earlier export wrote and this one does not are removed, and nothing else.

    Raises:
        ValueError: an unknown name, or an adapter PEFT's format cannot hold.
    """
    from peft_callbacks.io.peft_format import peft_files, write_peft_files

    known = adapter_names(model)
    names = known if names is None else list(names)
    if not names:
        raise ValueError(f"{type(model).__name__} holds no adapter to export (`adapter_name`).")
    for name in names:
        check_adapter_name(name)
        if name not in known:
            raise ValueError(f"`adapter_name` names {name!r}, which {type(model).__name__} does not hold: {known}.")
    files = {name: peft_files(model, name) for name in names}
    keep = card_keep(directory)  # a README.md the user wrote there stays as it is
    with file_set(directory, "peft", keep=keep) as staging:
        for name, (tensors, config) in files.items():
            write_peft_files(staging if name == DEFAULT_ADAPTER else path_inside(staging, name), tensors, config)
        if not keep:
            write_card(staging, model, "peft", names)
    return Path(directory)


def peft_folders(directory: str | Path) -> dict[str, Path]:
    """``{adapter name: folder}`` of the PEFT adapters in ``directory``: the top one as ``"default"``, and each
    sub-directory holding an ``adapter_config.json`` under its own name.

    Example::

        >>> import tempfile
        >>> peft_folders(tempfile.mkdtemp())
        {}
    """
    folder = Path(directory)
    found = {DEFAULT_ADAPTER: folder} if (folder / CONFIG_FILE).is_file() else {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        if (sub / CONFIG_FILE).is_file() and not sub.name.startswith("."):
            found[sub.name] = sub
    return found


def import_adapters(model: nn.Module, directory: str | Path) -> nn.Module:
    """Import every adapter of a PEFT directory saved with several (see the module docstring) into ``model``.

    All or nothing: when one adapter is refused, the model is as it was, its task head included.

    Raises:
        FileNotFoundError: the directory holds no PEFT adapter.
        ValueError: as :func:`~peft_callbacks.io.import_peft` for any of the adapters.
    """
    from peft_callbacks.io.peft_format import import_peft

    found = peft_folders(directory)
    if not found:
        raise FileNotFoundError(f"No {CONFIG_FILE} in {str(directory)!r} or its sub-directories: no PEFT adapter.")
    for name in found:
        check_adapter_name(name)
    saved = _tensors_named(model, found.values())
    try:
        with transaction(model):
            for name, folder in found.items():
                import_peft(model, folder, name)
    except BaseException:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
        raise
    return model


def _tensors_named(model: nn.Module, folders) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(model tensor, copy of its value)`` of every model tensor a file would overwrite (a trained head)."""
    state = model.state_dict(keep_vars=True)
    named = set()
    for folder in folders:
        path = Path(folder) / WEIGHTS_FILE
        try:
            with safe_open(str(path), framework="pt") as file:
                named.update(k[len(_PREFIX) :] for k in file.keys() if k.startswith(_PREFIX))
        except Exception:  # noqa: BLE001 - a damaged file is reported by import_peft itself
            continue
    return [(state[k], state[k].detach().clone()) for k in sorted(named) if k in state]
