"""Adapter files: a fine-tune as a small directory beside a shared base model, not a second copy of the model.

A directory written by :func:`save_adapter` holds

* ``adapter_model.safetensors``: the trained tensors only (adapters, prompts, the trained head; see
  :mod:`peft_callbacks.io.state`), keyed by their ``state_dict`` path relative to the model that was saved;
* ``adapter_recipe.json``: the format version, the library version, the SHA-256 of the tensor file and, for each
  model that carries surgery, its path, its recorded surgeries (method, settings, exact target paths) and a
  fingerprint of its base (:mod:`peft_callbacks.io.fingerprint`).

The pair is written as one transaction (:mod:`peft_callbacks.io.atomic`): only these two files change in the
directory (it may hold checkpoints, logs, anything else), and a killed save leaves the previous adapter or the new
one, never a mix.
:func:`load_adapter` treats the directory as untrusted input: it checks the recipe's fields, the tensor file's hash,
every tensor's values and dtype, and the shapes the recipe would create (a dry run on ``meta``) against the stored
tensors before it touches the model; then it replays the surgeries and loads the tensors. On any error the model is
exactly as it was. Nothing is ever unpickled: the tensors are read with ``safetensors``, the recipe with ``json``.

Example::

    >>> import tempfile, timm, torch
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> def base():
    ...     torch.manual_seed(0)
    ...     return timm.create_model("test_resnet", pretrained=False, num_classes=3)
    >>> tuned = inject_lora(base(), rank=4)
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_adapter(tuned, folder)
    >>> loaded = load_adapter(base(), folder)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> torch.equal(loaded.eval()(x), tuned.eval()(x))
    True
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from peft_callbacks._validation import check_adapter_name, check_bool, check_module
from peft_callbacks._version import __version__
from peft_callbacks.core.recipe import recorded_models, surgery_records
from peft_callbacks.core.sharding import full_tensor, is_writer, write_full
from peft_callbacks.engine import replay, transaction
from peft_callbacks.engine.adapters import adapter_names
from peft_callbacks.engine.layers import upgrade_state_keys
from peft_callbacks.engine.shadow import expected_shapes
from peft_callbacks.io.atomic import file_set, write_json, write_safetensors
from peft_callbacks.io.checks import check_tensors
from peft_callbacks.io.fingerprint import architecture, base_fingerprint, compare_fingerprints
from peft_callbacks.io.model_card import card_keep, write_card
from peft_callbacks.io.named import adapter_state, record_names, renamed_keys
from peft_callbacks.io.recipe_file import (
    FORMAT,
    FORMAT_VERSION,
    RECIPE_FILE,
    WEIGHTS_FILE,
    AdapterFileError,
    read_adapter_config,
)
from peft_callbacks.io.state import peft_owned, trained_state

__all__ = ["AdapterFileError", "load_adapter", "read_adapter_config", "save_adapter"]

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_directory(directory: Any) -> Path:
    """Return ``directory`` as a ``Path`` if it is a non-empty str or ``Path``."""
    if not isinstance(directory, (str, Path)) or not str(directory):
        raise TypeError(
            f"`directory` must be a non-empty str or pathlib.Path, got {type(directory).__name__} {directory!r}."
        )
    return Path(directory)


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> Path:
    """Write the trained PEFT tensors of ``model`` and the recipe to rebuild them (see the module docstring).

    Call it before merging (a merged model has no adapter left to save). When the model is sharded (FSDP2, ZeRO-3)
    every rank must call it: each joins the gathers, and only global rank 0 writes the directory.

    Args:
        model: the adapted model: a timm/transformers model, or a LightningModule (or any module) containing it.
        directory: created if needed. Only the adapter's two files, a ``README.md`` model card
            (:mod:`peft_callbacks.io.model_card`; never over a README the user wrote) and a small hidden manifest are
            written there; anything else in it is left as it is.
        adapter_name: save only this adapter (with what trains outside the adapters, e.g. the task head, which
            all adapters share); by default every adapter.

    Returns:
        The path of the tensor file.

    Raises:
        ValueError: ``model`` has nothing trained to save.

    Example::

        >>> import tempfile, torch.nn as nn
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
        >>> save_adapter(net, tempfile.mkdtemp()).name
        'adapter_model.safetensors'
    """
    check_module("model", model)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    tensors = trained_state(model) if adapter_name is None else _one_adapter(model, adapter_name)
    tensors = {key: full_tensor(t) for key, t in tensors.items()}  # gathered on every rank if sharded
    if not tensors:
        raise ValueError(
            f"{type(model).__name__} has no PEFT module and no trainable parameter: nothing to save. Save before "
            f"merging (e.g. `LoRACallback(save_adapter_to=...)` does), or inject a method first."
        )
    folder = check_directory(directory)
    models = recorded_models(model) or {"": model}
    if adapter_name is not None:
        models = {p: m for p, m in models.items() if adapter_name in record_names(surgery_records(m))}
    fingerprints = {path: base_fingerprint(m) for path, m in models.items()}  # a collective when sharded
    if not is_writer():
        return folder / WEIGHTS_FILE
    keep = card_keep(folder)  # a README.md the user wrote there stays as it is
    with file_set(folder, "adapter", keep=keep) as staging:
        if not keep:
            write_card(staging, model, "adapter", None if adapter_name is None else [adapter_name])
        write_safetensors(
            staging / WEIGHTS_FILE, tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        )
        recipe = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "weights_sha256": _sha256(staging / WEIGHTS_FILE),
            "models": [
                {"path": path, "recipe": _records(m, adapter_name), "fingerprint": fingerprints[path]}
                for path, m in models.items()
            ],
        }
        write_json(staging / RECIPE_FILE, recipe)
    weights = folder / WEIGHTS_FILE
    log.info("Saved %d tensor(s), %.1f kB, to %s.", len(tensors), weights.stat().st_size / 1e3, folder)
    return weights


def _one_adapter(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    known = adapter_names(model)
    if adapter_name not in known:
        raise ValueError(
            f"`adapter_name`={adapter_name!r} is not an adapter of {type(model).__name__}; it has {known}."
        )
    return adapter_state(model, adapter_name)


def _records(model: nn.Module, adapter_name: str | None) -> list[dict[str, Any]]:
    records = surgery_records(model)
    return records if adapter_name is None else [r for r in records if r.get("adapter_name") == adapter_name]


def _read_weights(folder: Path, recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if _sha256(path) != recipe["weights_sha256"]:
        raise AdapterFileError(
            f"{path} is corrupted or truncated: its SHA-256 differs from the one recorded in {RECIPE_FILE}."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} cannot be read as safetensors: {err}") from None


def _locate(model: nn.Module, entry: dict[str, Any]) -> str:
    """Where the model saved at ``entry["path"]`` is inside ``model``: the same path, or the one module of its class."""
    path, arch = entry["path"], entry["fingerprint"]["architecture"]
    modules = dict(model.named_modules())
    if path in modules and architecture(modules[path]) == arch:
        return path
    same = [p for p, m in modules.items() if architecture(m) == arch]
    if len(same) == 1:
        log.info("Adapter saved for %r is loaded onto %r (the %s in %s).", path, same[0], arch, type(model).__name__)
        return same[0]
    if path in modules:
        return path  # let the fingerprint say what differs
    raise AdapterFileError(
        f"The adapter was saved for a {arch} at {path or '<root>'!r}; {type(model).__name__} has no such submodule "
        f"and {len(same)} modules of that class. Pass the model the adapter was trained on (or the module holding it)."
    )


def _rename(key: str, moves: dict[str, str]) -> str:
    for old, new in sorted(moves.items(), key=lambda kv: -len(kv[0])):
        if old == new:
            continue
        if old == "" or key.startswith(old + "."):
            rest = key if old == "" else key[len(old) + 1 :]
            return f"{new}.{rest}" if new else rest
    return key


def _check_base(model: nn.Module, path: str, entry: dict[str, Any], strict: bool, records: list) -> nn.Module:
    target = model.get_submodule(path)
    saved = entry["fingerprint"]
    diffs = compare_fingerprints(saved, base_fingerprint(target, hash_names=saved.get("hashes", {})))
    if diffs:
        message = f"The adapter was trained on another base than the {type(target).__name__} at {path or '<root>'!r}: "
        if strict:
            raise AdapterFileError(message + "; ".join(diffs) + ". Pass strict=False to load it anyway.")
        log.warning("%s%s. Loading anyway (strict=False).", message, "; ".join(diffs))
    current = surgery_records(target)
    taken = sorted(set(record_names(current)) & set(record_names(records)))
    if current and taken and current != records:
        raise AdapterFileError(
            f"The {type(target).__name__} at {path or '<root>'!r} already holds adapter(s) {taken} "
            f"({[r['method'] for r in current]}); load the file under another name (`adapter_name=`), delete those "
            f"adapters first, or load it onto a fresh base model."
        )
    return target


def _short(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f", … ({len(keys)} in all)" if len(keys) > 5 else "")


def _dry_run(model: nn.Module, plans: list[tuple[str, nn.Module, list]], folder: Path) -> dict[str, tuple]:
    """The shapes every replay would create, keyed relative to ``model``, before anything is allocated."""
    shapes: dict[str, tuple] = {}
    for path, target, records in plans:
        try:
            created = expected_shapes(target, records)
        except (TypeError, ValueError) as err:
            raise AdapterFileError(f"{folder / RECIPE_FILE}: models entry for {path or '<root>'!r}: {err}") from None
        shapes.update({f"{path}.{k}" if path else k: s for k, s in created.items()})
    return shapes


def _check_fit(model, tensors, created, roots, strict, folder) -> dict[str, torch.Tensor]:
    """Compare the file's tensors with the model after replay; return ``{key: destination tensor}``. Adapters the
    model held before (other names) are not expected in the file."""
    state = model.state_dict(keep_vars=True)
    owned = peft_owned(model)
    reshaped = [
        f"{k} {tuple(t.shape)} vs {tuple(state[k].shape if k in state else created[k])}"
        for k, t in tensors.items()
        if (k in state and state[k].shape != t.shape) or (k in created and tuple(t.shape) != created[k])
    ]
    if reshaped:
        raise AdapterFileError(f"The adapter does not fit {type(model).__name__}: shapes differ: {_short(reshaped)}.")
    unexpected = [k for k in tensors if k not in state and k not in created]
    expected = [
        k
        for k in trained_state(model)
        if any(r == "" or k.startswith(r + ".") for r in roots) and (k in created or id(state[k]) not in owned)
    ]
    missing = [k for k in [*expected, *created] if k not in tensors]
    problems = [f"{label}: {_short(keys)}" for label, keys in (("unknown", unexpected), ("missing", missing)) if keys]
    if problems and strict:
        raise AdapterFileError(
            f"The adapter's tensors do not match {type(model).__name__}: {'; '.join(problems)}. "
            f"Pass strict=False to load the tensors that match."
        )
    if problems:
        log.warning("Loading the adapter with strict=False; %s.", "; ".join(problems))
    return {k: state[k] for k in tensors if k in state}


def load_adapter(
    model: nn.Module, directory: str | Path, strict: bool = True, adapter_name: str | None = None
) -> nn.Module:
    """Rebuild a saved fine-tune on ``model``: replay its surgeries, then load its tensors.

    ``model`` is a fresh base, or a base that holds other adapters already: the file's adapter is added beside them
    (under ``adapter_name`` when given, e.g. two tasks each saved as ``"default"``, loaded as two adapters).

    Args:
        model: the base the adapter was trained on, freshly built (pretrained weights loaded), or a module holding
            it. It may be the model itself where a LightningModule holding it was saved, or the other way round.
        directory: a directory written by :func:`save_adapter`.
        strict: refuse a base whose fingerprint differs, and tensors missing from or unknown to the model.
        adapter_name: the name the file's adapter gets here (the file must hold one adapter); by default the saved
            name.

    Returns:
        ``model``, modified in place (trainable as after the original surgery).

    Raises:
        FileNotFoundError: a file is missing.
        AdapterFileError: a damaged or malformed file (naming the file and field), a newer format version, another
            base (``strict``), an adapter name the model holds already, or tensors that do not fit. The model is
            then unchanged.

    Example::

        >>> import tempfile, torch.nn as nn
        >>> from peft_callbacks.methods.lora import inject_lora
        >>> folder = tempfile.mkdtemp()
        >>> _ = save_adapter(inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2), folder)
        >>> load_adapter(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)), folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        peft_callbacks.io.recipe_file.AdapterFileError: The adapter was trained on another base ... shapes differ: ...
    """
    check_module("model", model)
    check_bool("strict", strict)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    folder = check_directory(directory)
    recipe = read_adapter_config(folder)
    tensors = _read_weights(folder, recipe)
    saved_names = record_names([r for entry in recipe["models"] for r in entry["recipe"]])
    if adapter_name is not None and len(saved_names) != 1:
        raise AdapterFileError(
            f"`adapter_name`={adapter_name!r}: {folder} holds the adapters {saved_names}; a new name needs one."
        )
    plans, moves, renames = [], {}, {}
    for entry in recipe["models"]:
        path = _locate(model, entry)
        records = [{**r, "adapter_name": adapter_name} for r in entry["recipe"]] if adapter_name else entry["recipe"]
        target = _check_base(model, path, entry, strict, records)
        moves[entry["path"]] = path
        plans.append((path, target, [] if surgery_records(target) == records else records))
        if adapter_name is not None and adapter_name != saved_names[0] and entry["recipe"]:
            renames[path] = (target, entry["recipe"])
    tensors = {_rename(k, moves): t for k, t in tensors.items()}
    created = _dry_run(model, plans, folder)
    if recipe["format_version"] == 1:
        tensors = upgrade_state_keys(tensors, created)
    for path, (target, records) in renames.items():
        lead = f"{path}." if path else ""
        keys = {lead + old: lead + new for old, new in renamed_keys(target, records, adapter_name).items()}
        tensors = {keys.get(k, k): t for k, t in tensors.items()}
    reshaped = [
        f"{k} {tuple(t.shape)} vs {created[k]}"
        for k, t in tensors.items()
        if k in created and tuple(t.shape) != created[k]
    ]
    if reshaped:  # before the replay allocates anything
        raise AdapterFileError(
            f"{folder / RECIPE_FILE} does not fit its own tensors: the recipe would create shapes that differ from "
            f"the stored ones: {_short(reshaped)}."
        )
    with transaction(model):
        for _, target, records in plans:
            replay(target, records)
        destinations = _check_fit(model, tensors, created, list(moves.values()), strict, folder)
        check_tensors(tensors, str(folder / WEIGHTS_FILE), AdapterFileError, targets=destinations)
    for key, destination in destinations.items():
        write_full(destination, tensors[key])  # a sharded destination keeps its own slice
    log.info("Loaded adapter %s onto %s.", folder, type(model).__name__)
    return model
