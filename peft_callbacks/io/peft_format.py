"""Read and write HF PEFT LoRA directories, so a fine-tune moves between this library and ``peft`` both ways.

A PEFT LoRA directory holds ``adapter_model.safetensors``, with keys ``base_model.model.<module path>.lora_A.weight``
/ ``.lora_B.weight`` (and ``base_model.model.<path>.<tensor>`` for each module in ``modules_to_save``, e.g. a trained
classifier), and ``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
``fan_in_fan_out`` for GPT-2's ``Conv1D``, ``use_rslora``, ``modules_to_save``, …). Our LoRA layers use the same
factor shapes and scaling as PEFT's, so the tensors are copied as they are.

``peft`` itself is never imported: the files are plain JSON and safetensors (``adapter_model.bin`` pickles are
refused).

Example::

    >>> import tempfile, torch, transformers
    >>> from peft_callbacks.lora import inject_lora
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
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from peft_callbacks._validation import check_module, check_path
from peft_callbacks.core.params import unfreeze
from peft_callbacks.core.targets import exact_patterns
from peft_callbacks.io.state import peft_owned
from peft_callbacks.lora.inject import inject_lora, lora_layers
from peft_callbacks.lora.layers import LoRAConv, LoRAConv1D, LoRALayer, LoRALinear

__all__ = ["export_peft", "import_peft"]

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEYS = (".lora_A.weight", ".lora_B.weight")
_UNSUPPORTED = (
    "use_dora",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
)


def _uniform(name: str, values: list[Any]) -> Any:
    counts = Counter(values)
    if len(counts) > 1:
        raise ValueError(f"Cannot export LoRA with different {name} per layer ({dict(counts)}) as one PEFT config.")
    return values[0]


def _check_exportable(path: str, layer: LoRALayer) -> None:
    own = {id(p) for p in layer.parameters()} - {id(p) for p in layer.base_layer.parameters()}
    factors = {id(layer.lora_A.weight), id(layer.lora_B.weight)}
    if type(layer) not in (LoRALinear, LoRAConv, LoRAConv1D) or own != factors:
        raise ValueError(
            f"The LoRA layer at {path!r} ({type(layer).__name__}) has parameters beyond lora_A/lora_B; only plain "
            f"LoRA can be exported to HF PEFT's LORA format."
        )


def _modules_to_save(model: nn.Module) -> list[str]:
    """Paths of the modules that own a trainable parameter outside the LoRA layers (the trained head)."""
    owned = peft_owned(model)
    paths: list[str] = []
    for key, p in model.named_parameters():
        if p.requires_grad and id(p) not in owned:
            path = key.rpartition(".")[0]
            if not path or isinstance(model.get_submodule(path), LoRALayer) or path.endswith(".base_layer"):
                raise ValueError(f"Trainable parameter {key!r} cannot be exported: PEFT saves whole modules only.")
            if path not in paths:
                paths.append(path)
    return paths


def export_peft(model: nn.Module, directory: str | Path) -> Path:
    """Write the LoRA of ``model`` as an HF PEFT directory that ``peft.PeftModel.from_pretrained`` loads.

    Args:
        model: the model with LoRA injected (unmerged), the same object you would pass to PEFT as its base.
        directory: created if needed.

    Returns:
        The directory.

    Raises:
        ValueError: no LoRA in ``model``, LoRA layers that differ in rank/alpha/dropout, or layers that are not
            plain LoRA (e.g. DoRA magnitudes).

    Example::

        >>> import os, tempfile, torch.nn as nn
        >>> from peft_callbacks.lora import inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
        >>> sorted(os.listdir(export_peft(net, tempfile.mkdtemp())))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    check_module("model", model)
    check_path("directory", directory)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layer to export (merged already, or never injected).")
    for path, layer in layers.items():
        _check_exportable(path, layer)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight
    modules_to_save = _modules_to_save(model)
    for path in modules_to_save:
        for key, tensor in model.get_submodule(path).state_dict().items():
            tensors[f"{PREFIX}{path}.{key}"] = tensor
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": _uniform("rank", [layer.r for layer in layers.values()]),
        "lora_alpha": _uniform("alpha", [layer.lora_alpha for layer in layers.values()]),
        "lora_dropout": _uniform("dropout", [getattr(layer.lora_dropout, "p", 0.0) for layer in layers.values()]),
        "use_rslora": _uniform("use_rslora", [layer.use_rslora for layer in layers.values()]),
        "target_modules": list(layers),
        "fan_in_fan_out": any(isinstance(layer, LoRAConv1D) for layer in layers.values()),
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    log.info("Exported LoRA on %d layer(s) of %s to %s (HF PEFT format).", len(layers), type(model).__name__, folder)
    return folder


def _read_peft_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No {CONFIG_FILE} in {str(folder)!r}; not an HF PEFT adapter directory.")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path} has peft_type={config.get('peft_type')!r}; only 'LORA' adapters can be imported.")
    used = [name for name in _UNSUPPORTED if config.get(name)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    if used:
        raise ValueError(f"{path} uses PEFT options that peft_callbacks' LoRA does not support: {', '.join(used)}.")
    if not (folder / WEIGHTS_FILE).is_file():
        pickled = " (adapter_model.bin is a pickle and is never loaded; re-save with safetensors)"
        raise FileNotFoundError(
            f"No {WEIGHTS_FILE} in {str(folder)!r}{pickled if (folder / 'adapter_model.bin').exists() else ''}."
        )
    return config


def _split_keys(tensors: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """LoRA target paths, and the other tensors (``modules_to_save``) keyed relative to the model."""
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"Unexpected tensor names in the PEFT adapter (no {PREFIX!r} prefix): {bad[:5]}.")
    targets, others = [], {}
    for key, tensor in tensors.items():
        key = key[len(PREFIX) :]
        if key.endswith(_LORA_KEYS[0]):
            targets.append(key[: -len(_LORA_KEYS[0])])
        elif not key.endswith(_LORA_KEYS[1]):
            others[key] = tensor
    return targets, others


def import_peft(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the LoRA saved by HF PEFT (``save_pretrained``) in ``directory`` into ``model`` and load its weights.

    The targets are the modules that have factors in the file; ``modules_to_save`` tensors are loaded into
    ``model``'s own modules, which stay trainable. The surgery is recorded as ours, so :func:`save_adapter`,
    ``merge_lora`` and the callbacks work on the result.

    Args:
        model: the base model, freshly built: the same model PEFT was given.
        directory: a PEFT LoRA directory.

    Returns:
        ``model``, modified in place.

    Raises:
        FileNotFoundError: a file is missing (``adapter_model.bin`` pickles are refused).
        ValueError: not a LoRA adapter, options we do not support (DoRA, bias training, rank patterns, …), or
            tensors that do not fit ``model``.

    Example::

        >>> import tempfile, torch.nn as nn
        >>> from peft_callbacks.lora import inject_lora
        >>> tuned = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
        >>> folder = export_peft(tuned, tempfile.mkdtemp())
        >>> type(import_peft(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), folder)[0]).__name__
        'LoRALinear'
    """
    check_module("model", model)
    check_path("directory", directory)
    folder = Path(directory)
    config = _read_peft_config(folder)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    targets, others = _split_keys(tensors)
    modules = dict(model.named_modules())
    unknown = [p for p in targets + [k.rpartition(".")[0] for k in others] if p not in modules]
    if unknown:
        raise ValueError(f"The PEFT adapter names modules that {type(model).__name__} does not have: {unknown[:5]}.")
    missing = [k for k in others if k not in model.state_dict()]
    if missing:
        raise ValueError(f"The PEFT adapter holds tensors {type(model).__name__} does not have: {missing[:5]}.")
    inject_lora(
        model,
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=exact_patterns(targets),
        train_head=False,
        use_rslora=bool(config.get("use_rslora", False)),
    )
    state = model.state_dict(keep_vars=True)
    updates = dict(others)
    for path in targets:
        for suffix in _LORA_KEYS:
            updates[path + suffix] = tensors[PREFIX + path + suffix]
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(state[k].shape)}" for k, v in updates.items() if v.shape != state[k].shape
    ]
    if wrong:
        raise ValueError(f"The PEFT adapter does not fit {type(model).__name__}: shapes differ: {wrong[:5]}.")
    with torch.no_grad():
        for key, tensor in updates.items():
            state[key].copy_(tensor.to(state[key].dtype))
    unfreeze([modules[k.rpartition(".")[0]] for k in others])
    log.info("Imported PEFT LoRA on %d layer(s) into %s.", len(targets), type(model).__name__)
    return model
