"""Read and write HF PEFT adapter directories, so a fine-tune moves between this library and ``peft`` both ways.

A PEFT directory holds ``adapter_model.safetensors``, with keys ``base_model.model.<module path>.<adapter tensor>``
(``…q_proj.lora_A.weight``; no adapter name in the key) and ``base_model.model.<path>.<tensor>`` for each module in
``modules_to_save`` (a trained classifier), and ``adapter_config.json`` (``peft_type``, ``target_modules``,
``modules_to_save`` and the method's own fields). Every method of the engine that declares a
:class:`~peft_callbacks.engine.PeftMapping` is read and written here; our adapters keep PEFT's tensor names and
shapes, so tensors are copied as they are.

``peft`` itself is never imported: the files are plain JSON and safetensors (``adapter_model.bin`` pickles are
refused). A refused import leaves the model exactly as it was.

Example::

    >>> import tempfile, torch, transformers
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                                  intermediate_size=37, vocab_size=99, num_labels=2)
    >>> def base():
    ...     torch.manual_seed(0)
    ...     return transformers.BertForSequenceClassification(config).eval()
    >>> tuned = inject_lora(base(), rank=4, target_modules=["query", "value"])
    >>> folder = tempfile.mkdtemp()
    >>> _ = export_peft(tuned, folder)  # peft.PeftModel.from_pretrained(base(), folder) loads it
    >>> imported = import_peft(base(), folder)
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> torch.equal(imported(ids).logits, tuned(ids).logits)
    True
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from peft_callbacks._validation import check_adapter_name, check_module, check_path
from peft_callbacks.core.params import unfreeze
from peft_callbacks.engine import DEFAULT_ADAPTER, AdaptedLayer, LayerMethod, get_method, inject, registered_methods
from peft_callbacks.engine.bias import bias_rule, trained_biases
from peft_callbacks.engine.patterns import prune_patterns
from peft_callbacks.engine.transaction import transaction
from peft_callbacks.io.atomic import file_set, finish_interrupted_save, write_json, write_safetensors
from peft_callbacks.io.checks import check_tensors
from peft_callbacks.io.model_card import card_keep, write_card
from peft_callbacks.io.peft_adapters import export_adapters, import_adapters, peft_folders
from peft_callbacks.io.state import peft_owned

__all__ = ["export_peft", "import_peft"]

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # tensors stored once per model (VeRA's projections): base_model.vera_A


def _layer_method(model: nn.Module, adapter_name: str) -> tuple[LayerMethod, dict[str, AdaptedLayer]]:
    """The one method with a PEFT mapping whose adapter ``adapter_name`` is in ``model``, and its layers."""
    found = []
    for name in registered_methods():
        method = get_method(name)
        if isinstance(method, LayerMethod) and method.modules(model, adapter_name):
            found.append(method)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no adapter {adapter_name!r} (`adapter_name`) to export: merged already, "
            f"never injected, or a method PEFT's format cannot hold."
        )
    if len(found) > 1:
        raise ValueError(f"Adapter {adapter_name!r} mixes {[m.title for m in found]}; PEFT holds one method each.")
    method = found[0]
    if method.peft is None:
        raise ValueError(f"{method.title} has no HF PEFT equivalent; save it with save_adapter instead.")
    return method, method.modules(model, adapter_name)


def _modules_to_save(model: nn.Module, biases: dict[str, torch.Tensor]) -> list[str]:
    """Paths of the modules that own a trainable parameter outside the PEFT modules (the trained head), the biases
    the adapter's ``bias`` setting trains left out (PEFT saves those one by one)."""
    owned = peft_owned(model) | {id(p) for p in biases.values()}
    paths: list[str] = []
    for key, p in model.named_parameters():
        if p.requires_grad and id(p) not in owned:
            path = key.rpartition(".")[0]
            if not path or ".base_layer" in f".{path}" or isinstance(model.get_submodule(path), AdaptedLayer):
                raise ValueError(f"Trainable parameter {key!r} cannot be exported: PEFT saves whole modules only.")
            if path not in paths:
                paths.append(path)
    return paths


def export_peft(model: nn.Module, directory: str | Path, adapter_name: str | list[str] | None = None) -> Path:
    """Write adapters of ``model`` as an HF PEFT directory that ``peft.PeftModel.from_pretrained`` loads.

    Only the adapter files and a ``README.md`` model card are written (see :mod:`peft_callbacks.io.atomic` and
    :mod:`peft_callbacks.io.model_card`; a README the user wrote is never overwritten): anything else in
    ``directory`` stays, and a killed export leaves the previous files or the new ones, never a mix.

    Args:
        model: the model with the adapter injected (unmerged), the same object you would pass to PEFT as its base.
        directory: created if needed.
        adapter_name: one adapter's name: that adapter, at the top of ``directory``; ``None`` (every adapter) or a
            list of names: PEFT's ``save_pretrained`` layout, ``"default"`` at the top and each other adapter in
            ``directory/<name>`` (:mod:`peft_callbacks.io.peft_adapters`).

    Returns:
        The directory.

    Raises:
        ValueError: no such adapter, a method without a PEFT equivalent, or settings that differ between layers.

    Example::

        >>> import os, tempfile, torch.nn as nn
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
        >>> sorted(f for f in os.listdir(export_peft(net, tempfile.mkdtemp())) if not f.startswith("."))
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    """
    check_module("model", model)
    check_path("directory", directory)
    if not isinstance(adapter_name, str):
        return export_adapters(model, directory, _names("adapter_name", adapter_name))
    check_adapter_name(adapter_name)
    tensors, config = peft_files(model, adapter_name)
    keep = card_keep(directory)  # a README.md the user wrote there stays as it is
    with file_set(directory, "peft", keep=keep) as staging:
        write_peft_files(staging, tensors, config)
        if not keep:
            write_card(staging, model, "peft", [adapter_name])
    log.info(
        "Exported %s on %d layer(s) of %s to %s (HF PEFT format).",
        config["peft_type"],
        len(config["target_modules"]),
        type(model).__name__,
        directory,
    )
    return Path(directory)


def peft_files(model: nn.Module, adapter_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, config)`` of adapter ``adapter_name`` as PEFT saves them (see :func:`export_peft`)."""
    method, layers = _layer_method(model, adapter_name)
    adapters = {path: layer.adapters[adapter_name] for path, layer in layers.items()}
    config = next(iter(adapters.values())).config
    differing = [path for path, a in adapters.items() if a.config != config]
    if differing:
        raise ValueError(
            f"The {method.title} layers of adapter {adapter_name!r} differ in their settings ({differing[:3]} vs the "
            f"first); PEFT's format holds one config per adapter."
        )
    tensors: dict[str, torch.Tensor] = {}
    for path, adapter in adapters.items():
        for key, tensor in _export_layer(method, path, adapter).items():
            tensors[f"{PREFIX}{path}.{key}"] = tensor
    if method.peft.export_shared is not None:
        for key, tensor in method.peft.export_shared(config, adapters).items():
            tensors[f"{SHARED_PREFIX}{key}"] = tensor
    biases = trained_biases(model, bias_rule(config), layers)
    modules_to_save = _modules_to_save(model, biases)
    for path in modules_to_save:
        for key, tensor in model.get_submodule(path).state_dict().items():
            tensors[f"{PREFIX}{path}.{key}"] = tensor
    for key, tensor in biases.items():  # PEFT's keys: <path>.base_layer.bias inside a wrapped layer
        tensors[f"{PREFIX}{key}"] = tensor
    peft_config = {
        "peft_type": method.peft.peft_type,
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "target_modules": list(adapters),
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
        **method.peft.to_peft(config, layers),
    }
    return tensors, peft_config


def write_peft_files(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write one PEFT adapter (from :func:`peft_files`) into ``folder``, created if needed."""
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS_FILE, tensors)
    write_json(folder / CONFIG_FILE, config)


def _export_layer(method: LayerMethod, path: str, adapter: nn.Module) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's keys (relative to its layer's path)."""
    if method.peft.export_layer is not None:
        return method.peft.export_layer(path, adapter)
    return {method.peft.keys.get(key, key): tensor for key, tensor in adapter.state_dict().items()}


def _names(argument: str, value: Any) -> list[str] | None:
    if value is not None and not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise TypeError(f"`{argument}` must be an adapter name, a non-empty list of them or None, got {value!r}.")
    return value


def _read_peft_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No {CONFIG_FILE} in {str(folder)!r}; not an HF PEFT adapter directory.")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object (PEFT's config), got a {type(config).__name__}.")
    if not (folder / WEIGHTS_FILE).is_file():
        pickled = " (adapter_model.bin is a pickle and is never loaded; re-save with safetensors)"
        raise FileNotFoundError(
            f"No {WEIGHTS_FILE} in {str(folder)!r}{pickled if (folder / 'adapter_model.bin').exists() else ''}."
        )
    return config


def _method_for(peft_type: Any, path: Path) -> LayerMethod:
    methods = {}
    for name in registered_methods():
        method = get_method(name)
        if isinstance(method, LayerMethod) and method.peft is not None:
            methods[method.peft.peft_type] = method
    if peft_type not in methods:
        raise ValueError(
            f"{path} has peft_type={peft_type!r}; peft_callbacks imports {', '.join(repr(t) for t in sorted(methods))}."
        )
    return methods[peft_type]


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as safetensors (truncated or damaged?): {err}") from None


def _split_keys(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> tuple[list[str], dict, dict]:
    """``(target paths, {target path: {adapter key: tensor}}, {model key: tensor} of modules_to_save)``."""
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"{path}: tensor names without the {PREFIX!r} prefix: {bad[:5]}.")
    modules = dict(model.named_modules())
    state = model.state_dict()
    adapted: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for full_key, tensor in tensors.items():
        key = full_key[len(PREFIX) :]
        if key in state or _base_layer_bias(key, state):
            others[key] = tensor
            continue
        parts = key.split(".")
        owner = next(
            (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules), None
        )
        if owner is None:
            raise ValueError(f"{path}: tensor {full_key!r} names a module that {type(model).__name__} does not have.")
        adapted.setdefault(owner, {})[key[len(owner) + 1 :]] = tensor
    return list(adapted), adapted, others


def _base_layer_bias(key: str, state: dict[str, torch.Tensor]) -> bool:
    """Is ``key`` PEFT's name (``<path>.base_layer.bias``) of the bias of a layer it wraps (``bias="all"`` or
    ``"lora_only"``), ``<path>.bias`` in ``model`` before injection?"""
    suffix = ".base_layer.bias"
    return key.endswith(suffix) and f"{key[: -len(suffix)]}.bias" in state


def import_peft(model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> nn.Module:
    """Inject the adapter(s) HF PEFT saved (``save_pretrained``) in ``directory`` into ``model`` and load them.

    The targets are the modules that have adapter tensors in the file; ``modules_to_save`` tensors are loaded into
    ``model``'s own modules, which stay trainable. The surgery is recorded as ours, so :func:`save_adapter`, merging
    and the callbacks work on the result. Everything is checked (types, finite values, shapes) before anything
    changes; on any error the model is as it was.

    Args:
        model: the base model, freshly built: the same model PEFT was given.
        directory: a PEFT adapter directory.
        adapter_name: the name the adapter at the top of ``directory`` gets here; ``None``: every adapter PEFT saved
            there, the top one as ``"default"`` and each sub-directory's under its name (all or nothing).

    Returns:
        ``model``, modified in place.

    Raises:
        FileNotFoundError: a file is missing (``adapter_model.bin`` pickles are refused).
        ValueError: a method or options we do not support, damaged files, or tensors that do not fit ``model``.

    Example::

        >>> import tempfile, torch.nn as nn
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> tuned = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
        >>> folder = export_peft(tuned, tempfile.mkdtemp())
        >>> type(import_peft(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), folder)[0]).__name__
        'AdaptedLayer'
    """
    check_module("model", model)
    check_path("directory", directory)
    finish_interrupted_save(directory)  # an export killed after its commit point: completed first
    found = peft_folders(directory) if adapter_name is None else {}
    if found and set(found) != {DEFAULT_ADAPTER}:
        return import_adapters(model, directory)
    adapter_name = DEFAULT_ADAPTER if adapter_name is None else check_adapter_name(adapter_name)
    folder = Path(directory)
    peft_config = _read_peft_config(folder)
    method = _method_for(peft_config.get("peft_type"), folder / CONFIG_FILE)
    try:
        config = method.peft.from_peft(peft_config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / CONFIG_FILE}: {err}") from None
    tensors = _read_tensors(folder / WEIGHTS_FILE)
    shared = {}
    if method.peft.import_shared is not None:
        shared = {k: t for k, t in tensors.items() if k.startswith(SHARED_PREFIX) and not k.startswith(PREFIX)}
        tensors = {k: t for k, t in tensors.items() if k not in shared}
        shared = {k[len(SHARED_PREFIX) :]: t for k, t in shared.items()}
    owners, adapted, others = _split_keys(model, tensors, folder / WEIGHTS_FILE)
    try:
        targets = owners if method.peft.targets is None else method.peft.targets(model, peft_config, owners)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / CONFIG_FILE}: {err}") from None
    inverse = {theirs: ours for ours, theirs in method.peft.keys.items()}
    config = prune_patterns(config, owners)  # PEFT keeps keys its model never matched; they set nothing
    with transaction(model):
        inject(model, config, adapter_name=adapter_name, targets=targets)
        adapters = {path: model.get_submodule(path).adapters[adapter_name] for path in owners}
        updates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path, adapter in adapters.items():
            own = adapter.state_dict(keep_vars=True)
            if method.peft.import_layer is not None:
                theirs = method.peft.import_layer(peft_config, path, adapter, adapted[path])
            else:
                theirs = {inverse.get(k, k): t for k, t in adapted[path].items()}
            unknown, missing = sorted(set(theirs) - set(own)), sorted(set(own) - set(theirs))
            if unknown or missing:
                raise ValueError(
                    f"{folder / WEIGHTS_FILE}: the tensors of {path!r} do not match {method.title} "
                    f"(unknown: {unknown}, missing: {missing})."
                )
            for key, tensor in theirs.items():
                updates[f"{path}.{key}"] = (own[key], tensor)
        state = model.state_dict(keep_vars=True)
        updates.update({key: (state[key], tensor) for key, tensor in others.items()})
        wrong = [
            f"{k} {tuple(new.shape)} vs {tuple(old.shape)}"
            for k, (old, new) in updates.items()
            if old.numel() != new.numel()
        ]
        if wrong:
            raise ValueError(
                f"{folder / WEIGHTS_FILE} does not fit {type(model).__name__}: shapes differ: {wrong[:5]}."
            )
        check_tensors(
            {k: new for k, (_, new) in updates.items()},
            str(folder / WEIGHTS_FILE),
            targets={k: old for k, (old, _) in updates.items()},
        )
        with torch.no_grad():
            for old, new in updates.values():
                old.copy_(new.reshape(old.shape).to(old.dtype))
        if method.peft.import_shared is not None:
            try:
                method.peft.import_shared(peft_config, adapters, shared)
            except ValueError as err:
                raise ValueError(f"{folder / WEIGHTS_FILE}: {err}") from None
        biases = trained_biases(model, bias_rule(config), method.modules(model, adapter_name))  # trainable already
        unfreeze([model.get_submodule(k.rpartition(".")[0]) for k in others if k not in biases])
    log.info("Imported PEFT %s on %d layer(s) into %s.", method.title, len(owners), type(model).__name__)
    return model
