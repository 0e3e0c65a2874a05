"""``adapter_recipe.json``: what an adapter directory says about itself, read as untrusted input.

Everything read from the file is checked (types, ranges, and later the shapes against the stored tensors) before any
of it is used, and every problem raises :class:`AdapterFileError` naming the file and the field. Nothing in the file
is evaluated: targets are exact module paths, never patterns.

Format versions: 1 (peft_callbacks 0.1: one adapter per method, its tensors right under each adapted layer) and 2
(named adapters under ``adapters.<name>``). Version 1 files are read and upgraded on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft_callbacks._validation import check_adapter_name
from peft_callbacks._version import __version__
from peft_callbacks.io.atomic import finish_interrupted_save

__all__ = ["FORMAT", "FORMAT_VERSION", "RECIPE_FILE", "WEIGHTS_FILE", "AdapterFileError", "read_adapter_config"]

FORMAT = "peft_callbacks.adapter"
FORMAT_VERSION = 2
RECIPE_FILE = "adapter_recipe.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded: damaged, malformed, from a newer version, or for another base.

    A ``ValueError``, so code that catches bad input in general catches it too.

    Example::

        >>> issubclass(AdapterFileError, ValueError)
        True
    """


def _require(value: Any, kind: type | tuple[type, ...], path: Path, field: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise AdapterFileError(f"{path}: field {field!r} must be a {names}, got {type(value).__name__}.")
    return value


def _check_name(value: Any, path: Path, field: str) -> None:
    """An adapter name from the file: one plain name (it becomes a module key and, on export, a folder)."""
    try:
        check_adapter_name(value, field)
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{path}: field {err}") from None


def _check_fingerprint(value: Any, path: Path, field: str) -> None:
    _require(value, dict, path, field)
    _require(value.get("architecture"), str, path, f"{field}.architecture")
    shapes = _require(value.get("shapes"), dict, path, f"{field}.shapes")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise AdapterFileError(f"{path}: field '{field}.shapes.{name}' must be a list of ints.")
    hashes = _require(value.get("hashes", {}), dict, path, f"{field}.hashes")
    for name, digest in hashes.items():
        if not isinstance(digest, dict) or not isinstance(digest.get("sha256"), str):
            raise AdapterFileError(f"{path}: field '{field}.hashes.{name}' must be an object with a 'sha256' string.")


def _check_models(models: Any, path: Path) -> None:
    _require(models, list, path, "models")
    if not models:
        raise AdapterFileError(f"{path}: field 'models' is empty; the adapter holds no surgery.")
    for i, entry in enumerate(models):
        _require(entry, dict, path, f"models[{i}]")
        _require(entry.get("path"), str, path, f"models[{i}].path")
        recipe = _require(entry.get("recipe"), list, path, f"models[{i}].recipe")
        for j, record in enumerate(recipe):
            _require(record, dict, path, f"models[{i}].recipe[{j}]")
            _require(record.get("method"), str, path, f"models[{i}].recipe[{j}].method")
            _require(record.get("config"), dict, path, f"models[{i}].recipe[{j}].config")
            if "adapter_name" in record:
                _check_name(record["adapter_name"], path, f"models[{i}].recipe[{j}].adapter_name")
        if "fingerprint" not in entry:
            raise AdapterFileError(f"{path}: field 'models[{i}].fingerprint' is missing.")
        _check_fingerprint(entry["fingerprint"], path, f"models[{i}].fingerprint")


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """Read and check ``adapter_recipe.json`` of an adapter directory.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        AdapterFileError: the recipe is not valid JSON, not an adapter recipe, malformed (the message names the
            field), or from a newer format version.

    Example::

        >>> import tempfile, torch.nn as nn
        >>> from peft_callbacks import inject_lora, save_adapter
        >>> folder = tempfile.mkdtemp()
        >>> _ = save_adapter(inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2), folder)
        >>> recipe = read_adapter_config(folder)
        >>> recipe["format_version"], [r["method"] for r in recipe["models"][0]["recipe"]]
        (2, ['lora'])
    """
    folder = Path(directory)
    finish_interrupted_save(folder)  # a save killed after its commit point: completed first, never read half-done
    path = folder / RECIPE_FILE
    if not path.is_file():
        hint = ""
        if (folder / "adapter_config.json").is_file():
            hint = " It holds an `adapter_config.json`: an HF PEFT adapter; read it with `import_peft(model, dir)`."
        raise FileNotFoundError(f"No {RECIPE_FILE} in {str(folder)!r}; not an adapter saved by save_adapter.{hint}")
    try:
        recipe = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise AdapterFileError(f"{path} is corrupted or truncated (not valid JSON: {err}).") from None
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is not an adapter recipe written by peft_callbacks.save_adapter.")
    version = recipe.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
        raise AdapterFileError(
            f"{path} has format version {version!r} (written by peft_callbacks {recipe.get('library_version')}); "
            f"this peft_callbacks ({__version__}) reads format versions up to {FORMAT_VERSION}. "
            f"Upgrade peft_callbacks to load it."
        )
    _require(recipe.get("weights_sha256"), str, path, "weights_sha256")
    _check_models(recipe.get("models"), path)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"No {WEIGHTS_FILE} in {str(folder)!r}: the adapter directory is incomplete.")
    return recipe
