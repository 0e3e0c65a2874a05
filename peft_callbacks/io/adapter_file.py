"""Adapter files: a fine-tune as a small directory beside a shared base model, not a second copy of the model.

A directory written by :func:`save_adapter` holds

* ``adapter_model.safetensors``: the trained tensors only (LoRA factors, adapters, prompts, the trained head; see
  :mod:`peft_callbacks.io.state`), keyed by their ``state_dict`` path relative to the model that was saved;
* ``adapter_recipe.json``: the format version, the library version, the SHA-256 of the tensor file and, for each
  model that carries surgery, its path, its recorded surgeries (method, hyper-parameters, exact target paths) and a
  fingerprint of its base (:mod:`peft_callbacks.io.fingerprint`).

:func:`load_adapter` replays the surgeries on a fresh base and loads the tensors. Nothing is ever unpickled: the
tensors are read with ``safetensors``, the recipe with ``json``.

Example::

    >>> import tempfile, timm, torch
    >>> from peft_callbacks.lora import inject_lora
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
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

from peft_callbacks._validation import check_bool, check_module
from peft_callbacks.core.recipe import recorded_models, replay_surgery, surgery_records
from peft_callbacks.io.fingerprint import architecture, base_fingerprint, compare_fingerprints
from peft_callbacks.io.state import trained_state

__all__ = ["AdapterFileError", "load_adapter", "read_adapter_config", "save_adapter", "save_weights"]

log = logging.getLogger(__name__)

FORMAT = "peft_callbacks.adapter"
FORMAT_VERSION = 1
RECIPE_FILE = "adapter_recipe.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded: corrupted, from a newer version, or for another base model.

    A ``ValueError``, so code that catches bad input in general catches it too.

    Example::

        >>> issubclass(AdapterFileError, ValueError)
        True
    """


def _library_version() -> str:
    from peft_callbacks import __version__

    return __version__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_module(model: Any) -> nn.Module:
    check_module("model", model)
    return model


def _check_directory(directory: Any) -> Path:
    if not isinstance(directory, (str, Path)) or not str(directory):
        raise TypeError(
            f"`directory` must be a non-empty str or pathlib.Path, got {type(directory).__name__} {directory!r}."
        )
    return Path(directory)


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the trained PEFT tensors of ``model`` and the recipe to rebuild them (see the module docstring).

    Call it before merging LoRA (a merged model has no adapter left to save).

    Args:
        model: the adapted model: a timm/transformers model, or a LightningModule (or any module) containing it.
        directory: created if needed; its ``adapter_model.safetensors`` and ``adapter_recipe.json`` are replaced.

    Returns:
        The path of the tensor file.

    Raises:
        ValueError: ``model`` has nothing trained to save.

    Example::

        >>> import tempfile, torch.nn as nn
        >>> from peft_callbacks.lora import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
        >>> save_adapter(net, tempfile.mkdtemp()).name
        'adapter_model.safetensors'
    """
    model = _check_module(model)
    tensors = {k: t.to("cpu").contiguous() for k, t in trained_state(model).items()}
    if not tensors:
        raise ValueError(
            f"{type(model).__name__} has no PEFT module and no trainable parameter: nothing to save. Save before "
            f"merging LoRA (e.g. `LoRACallback(save_adapter_to=...)` does), or inject a method first."
        )
    folder = _check_directory(directory)
    models = recorded_models(model) or {"": model}
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    save_file(tensors, str(weights), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    recipe = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "weights_sha256": _sha256(weights),
        "models": [
            {"path": path, "recipe": surgery_records(m), "fingerprint": base_fingerprint(m)}
            for path, m in models.items()
        ],
    }
    (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))
    log.info("Saved %d tensor(s), %.1f kB, to %s.", len(tensors), weights.stat().st_size / 1e3, folder)
    return weights


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """Read and check ``adapter_recipe.json`` of an adapter directory.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        AdapterFileError: the recipe is not valid JSON, not an adapter recipe, or from a newer format version.

    Example::

        >>> import tempfile, torch.nn as nn
        >>> from peft_callbacks.lora import inject_lora
        >>> folder = tempfile.mkdtemp()
        >>> _ = save_adapter(inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2), folder)
        >>> recipe = read_adapter_config(folder)
        >>> recipe["format_version"], [r["method"] for r in recipe["models"][0]["recipe"]]
        (1, ['lora'])
    """
    folder = Path(directory)
    path = folder / RECIPE_FILE
    if not path.is_file():
        hint = ""
        if (folder / "adapter_config.json").is_file():
            hint = " It holds an `adapter_config.json`: an HF PEFT adapter; read it with `import_peft(model, dir)`."
        raise FileNotFoundError(f"No {RECIPE_FILE} in {str(folder)!r}; not an adapter saved by save_adapter.{hint}")
    try:
        recipe = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is corrupted or truncated (not valid JSON: {err}).") from None
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT or "models" not in recipe:
        raise AdapterFileError(f"{path} is not an adapter recipe written by peft_callbacks.save_adapter.")
    version = recipe.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{path} has format version {version!r} (written by peft_callbacks {recipe.get('library_version')}); "
            f"this peft_callbacks ({_library_version()}) reads format versions up to {FORMAT_VERSION}. "
            f"Upgrade peft_callbacks to load it."
        )
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"No {WEIGHTS_FILE} in {str(folder)!r}: the adapter directory is incomplete.")
    return recipe


def _read_weights(folder: Path, recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if _sha256(path) != recipe.get("weights_sha256"):
        raise AdapterFileError(
            f"{path} is corrupted or truncated: its SHA-256 differs from the one recorded in {RECIPE_FILE}."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:  # pragma: no cover - the checksum catches damage first
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


def _prepare(model: nn.Module, entry: dict[str, Any], strict: bool) -> str:
    """Check the fingerprint of the base found for ``entry`` and replay its surgeries; return its path."""
    path = _locate(model, entry)
    target = model.get_submodule(path)
    saved = entry["fingerprint"]
    diffs = compare_fingerprints(saved, base_fingerprint(target, hash_names=saved.get("hashes", {})))
    if diffs:
        message = f"The adapter was trained on another base than the {type(target).__name__} at {path or '<root>'!r}: "
        if strict:
            raise AdapterFileError(message + "; ".join(diffs) + ". Pass strict=False to load it anyway.")
        log.warning("%s%s. Loading anyway (strict=False).", message, "; ".join(diffs))
    current = surgery_records(target)
    if current and current != entry["recipe"]:
        raise AdapterFileError(
            f"The {type(target).__name__} at {path or '<root>'!r} already carries other surgery "
            f"({[r['method'] for r in current]}); load the adapter onto a fresh base model."
        )
    if not current:
        replay_surgery(target, entry["recipe"])
    return path


def _short(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f", … ({len(keys)} in all)" if len(keys) > 5 else "")


def _copy_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], roots: list[str], strict: bool) -> None:
    state = model.state_dict(keep_vars=True)
    reshaped = [
        f"{k} {tuple(t.shape)} vs {tuple(state[k].shape)}"
        for k, t in tensors.items()
        if k in state and state[k].shape != t.shape
    ]
    if reshaped:
        raise AdapterFileError(f"The adapter does not fit {type(model).__name__}: shapes differ: {_short(reshaped)}.")
    unexpected = [k for k in tensors if k not in state]
    expected = [k for k in trained_state(model) if any(r == "" or k.startswith(r + ".") for r in roots)]
    missing = [k for k in expected if k not in tensors]
    problems = [f"{label}: {_short(keys)}" for label, keys in (("unknown", unexpected), ("missing", missing)) if keys]
    if problems and strict:
        raise AdapterFileError(
            f"The adapter's tensors do not match {type(model).__name__}: {'; '.join(problems)}. "
            f"Pass strict=False to load the tensors that match."
        )
    if problems:
        log.warning("Loading the adapter with strict=False; %s.", "; ".join(problems))
    with torch.no_grad():
        for key, tensor in tensors.items():
            if key in state:
                state[key].copy_(tensor.to(state[key].dtype))


def load_adapter(model: nn.Module, directory: str | Path, strict: bool = True) -> nn.Module:
    """Rebuild a saved fine-tune on ``model`` (a fresh base): replay its surgeries, then load its tensors.

    Args:
        model: the base the adapter was trained on, freshly built (pretrained weights loaded), or a module holding
            it. It may be the model itself where a LightningModule holding it was saved, or the other way round.
        directory: a directory written by :func:`save_adapter`.
        strict: refuse a base whose fingerprint differs, and tensors missing from or unknown to the model.

    Returns:
        ``model``, modified in place (trainable as after the original surgery).

    Raises:
        FileNotFoundError: a file is missing.
        AdapterFileError: a corrupted/truncated file, a newer format version, another base (``strict``), or tensors
            that do not fit.

    Example::

        >>> import tempfile, torch.nn as nn
        >>> from peft_callbacks.lora import inject_lora
        >>> folder = tempfile.mkdtemp()
        >>> _ = save_adapter(inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2), folder)
        >>> load_adapter(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)), folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        peft_callbacks.io.adapter_file.AdapterFileError: The adapter was trained on another base ... shapes differ: ...
    """
    model = _check_module(model)
    check_bool("strict", strict)
    folder = _check_directory(directory)
    recipe = read_adapter_config(folder)
    tensors = _read_weights(folder, recipe)
    moves = {entry["path"]: _prepare(model, entry, strict) for entry in recipe["models"]}
    tensors = {_rename(k, moves): t for k, t in tensors.items()}
    _copy_tensors(model, tensors, list(moves.values()), strict)
    log.info("Loaded adapter %s onto %s.", folder, type(model).__name__)
    return model


def save_weights(model: nn.Module, directory: str | Path) -> Path:
    """Save the full weights of ``model`` (e.g. after merging LoRA) as safetensors.

    A transformers model is saved with its own ``save_pretrained`` (``config.json`` + ``model.safetensors``, loadable
    with ``from_pretrained``); any other module as ``model.safetensors`` holding its ``state_dict`` (shared tensors
    once).

    Returns:
        The directory.

    Example::

        >>> import tempfile, torch.nn as nn
        >>> (save_weights(nn.Linear(2, 2), tempfile.mkdtemp()) / "model.safetensors").is_file()
        True
    """
    model = _check_module(model)
    folder = _check_directory(directory)
    folder.mkdir(parents=True, exist_ok=True)
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained(str(folder))
    else:
        save_model(model, str(folder / "model.safetensors"))
    return folder
