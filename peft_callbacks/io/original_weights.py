"""The full-precision weights a quantized model came from, read by key without loading them all: a state dict, or
safetensors files (one, or ``save_pretrained``'s shards), opened lazily and never unpickled. LoftQ's
:func:`~peft_callbacks.methods.lora.loftq.loftq_init` reads one layer's weight at a time from here."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["OriginalWeights"]


class OriginalWeights:
    """The full-precision weights of a model, by key: a state dict, or safetensors read one tensor at a time.

    Args:
        original: a mapping of tensors, or the path of a ``.safetensors`` file or of a folder holding
            ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``, as ``save_pretrained``
            writes them). Nothing is unpickled.
        model: the model the keys are for; its ``base_model_prefix`` (transformers) may be on the stored keys or
            not.

    Raises:
        TypeError: ``original`` is neither.
        ValueError: a path that holds no safetensors.

    Example::

        >>> import torch, torch.nn as nn
        >>> weights = OriginalWeights({"0.weight": torch.ones(2, 2)}, nn.Sequential(nn.Linear(2, 2)))
        >>> weights.get("0.weight").sum().item()
        4.0
    """

    def __init__(self, original: Any, model: nn.Module) -> None:
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.tensors: Mapping[str, torch.Tensor] | None = None
        self.files: dict[str, str] = {}
        self.source = "the state dict"
        if isinstance(original, Mapping):
            self.tensors = original
        elif isinstance(original, (str, os.PathLike)):
            self._open(os.fspath(original))
        else:
            raise TypeError(
                f"`original` must be a state dict or the path of a safetensors file or folder (the model's "
                f"full-precision weights), got {type(original).__name__}."
            )

    def _open(self, path: str) -> None:
        from safetensors import safe_open

        self.source = path
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            single = os.path.join(path, "model.safetensors")
            if os.path.isfile(single):
                path = single
            elif os.path.isfile(index):
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                self.files = {k: os.path.join(os.path.dirname(index), v) for k, v in weight_map.items()}
                return
            else:
                raise ValueError(
                    f"`original`={path!r} holds neither model.safetensors nor model.safetensors.index.json; the "
                    f"full-precision weights are read from safetensors only (never unpickled)."
                )
        if not os.path.isfile(path) or not path.endswith(".safetensors"):
            raise ValueError(
                f"`original`={path!r} is not a .safetensors file or a folder holding one; the full-precision "
                f"weights are read from safetensors only (never unpickled)."
            )
        with safe_open(path, framework="pt") as f:
            self.files = dict.fromkeys(f.keys(), path)

    def keys(self) -> list[str]:
        return list(self.tensors) if self.tensors is not None else list(self.files)

    def _name(self, key: str) -> str:
        """The stored name of ``key``: itself, or with the model's ``base_model_prefix`` taken off or added (a
        checkpoint of ``LlamaForCausalLM`` read for a ``LlamaModel``, and back)."""
        candidates = [key]
        if self.prefix:
            candidates += [key.removeprefix(f"{self.prefix}."), f"{self.prefix}.{key}"]
        stored = self.tensors if self.tensors is not None else self.files
        for name in candidates:
            if name in stored:
                return name
        shown = ", ".join(self.keys()[:4])
        raise ValueError(
            f"`original` ({self.source}) has no weight {key!r}; the full-precision weights of every adapted layer are "
            f"needed (keys there include: {shown}, …)."
        )

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape stored under ``key``, read from the file's header (no tensor is loaded)."""
        name = self._name(key)
        if self.tensors is not None:
            return tuple(self.tensors[name].shape)
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key`` (see :meth:`shape` for the names tried)."""
        name = self._name(key)
        if self.tensors is not None:
            return self.tensors[name]
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)
