r"""Trainable tokens: train chosen rows of an embedding (new special tokens), as HF PEFT's ``trainable_token_indices``.

Chat fine-tuning adds tokens (``tokenizer.add_special_tokens`` then ``model.resize_token_embeddings``) whose rows
start random; training the whole embedding to learn them costs ``vocab × dim`` trainable values and a full copy in
every checkpoint. ``LoRAConfig(trainable_token_indices=[...])`` trains only those rows, next to the LoRA factors::

    trainable_tokens_delta: (len(indices), dim)     the rows' new values, starting at their current values
    W' = W with rows ``indices`` replaced            (index_copy: gradients reach only those rows)

The layer's own forward runs with ``W'`` (:class:`~peft_callbacks.engine.AdaptedParameters`), so scaled embeddings
keep their scale; a merge writes the rows into the weight in place. Where the input embedding's weight is the same
tensor as another layer's (a language model's tied ``lm_head``), that layer reads the same trained rows (one tensor,
saved once), and the model is still tied, and exact, after the merge. As in PEFT:

* a list of ids applies to the input embedding (``model.get_input_embeddings()``); a dict
  ``{module name: ids}`` names embeddings (or ``lm_head``-style Linear layers: their output rows) by name or dotted
  suffix;
* PEFT's files hold ``<embedding>.token_adapter.trainable_tokens_delta`` (the tied layer's rows are not repeated) and
  ``trainable_token_indices`` in ``adapter_config.json``.

The adapter's :attr:`~peft_callbacks.engine.scaling.Scalable.scale` moves each row from its value before training
(``scale=0``) to the trained one (``scale=1``), linearly.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine import AdaptedParameters
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> embedding = nn.Embedding(10, 4)
    >>> tokens = TrainableTokens(embedding, LoRAConfig(), token_indices=[8, 9])
    >>> layer = AdaptedParameters(embedding)
    >>> layer.add_adapter("default", tokens)
    >>> _ = nn.init.zeros_(tokens.trainable_tokens_delta)
    >>> layer(torch.tensor([1, 9])).abs().sum(-1) > 0  # row 9 now reads the trained (zero) values
    tensor([ True, False])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.targets import path_matches
from peft_callbacks.engine.method import replace_module
from peft_callbacks.engine.parameters import AdaptedParameters, ParameterAdapter

if TYPE_CHECKING:
    from peft_callbacks.engine.config import MethodConfig

__all__ = [
    "TrainableTokens",
    "check_token_indices",
    "insert_trainable_tokens",
    "resolve_token_layers",
    "tokens_from_peft",
    "tokens_to_peft",
]

ARGUMENT = "trainable_token_indices"
PEFT_KEY = "token_adapter.trainable_tokens_delta"


def _check_ids(argument: str, value: Any) -> list[int]:
    ids = list(value) if isinstance(value, (list, tuple)) else None
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"`{argument}` must hold a non-empty list of token ids (ints >= 0), got {value!r}.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"`{argument}` lists a token id more than once: {value!r}; list each id once.")
    return ids


def check_token_indices(argument: str, value: Any) -> list[int] | dict[str, list[int]] | None:
    """``value`` as ``None``, a list of token ids, or ``{module name: ids}`` (PEFT's two forms), checked.

    Example::

        >>> check_token_indices("trainable_token_indices", (5, 7))
        [5, 7]
        >>> check_token_indices("trainable_token_indices", {"embed_tokens": [-1]})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `trainable_token_indices['embed_tokens']` must hold a non-empty list of token ids (ints >= 0), ...
    """
    if value is None:
        return None
    if isinstance(value, dict):
        if not value or not all(isinstance(k, str) and k for k in value):
            raise ValueError(f"`{argument}` as a dict must map module names to token ids, got {value!r}.")
        return {key: _check_ids(f"{argument}[{key!r}]", ids) for key, ids in value.items()}
    if isinstance(value, (list, tuple)):
        return _check_ids(argument, value)
    raise TypeError(
        f"`{argument}` must be None, a list of token ids, or a dict {{module name: token ids}}, got "
        f"{type(value).__name__} {value!r}."
    )


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of ``model`` without the inside of inserted modules; a parameter wrapper as its base."""
    out: dict[str, nn.Module] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, PEFTModule):
                if isinstance(child, AdaptedParameters):
                    out[path] = child.base_layer
            else:
                out[path] = child
                visit(child, path)

    visit(model, "")
    return out


def _row_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: layer}`` of the embeddings and Linear layers of ``model`` whose rows can train."""
    return {p: m for p, m in _layers(model).items() if isinstance(m, (nn.Embedding, nn.Linear))}


def _input_embedding(model: nn.Module, layers: dict[str, nn.Module]) -> str:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    found = [p for p, layer in layers.items() if embedding is not None and layer is embedding]
    if not found:
        embeddings = [p for p, layer in layers.items() if isinstance(layer, nn.Embedding)]
        raise ValueError(
            f"`{ARGUMENT}` as a list applies to the input embedding (get_input_embeddings(), transformers), which "
            f"{type(model).__name__} does not name; give {{module name: token ids}} instead. Embeddings: "
            f"{embeddings or '(none)'}."
        )
    return found[0]


def resolve_token_layers(
    model: nn.Module, indices: list[int] | dict[str, list[int]], targets: list[str] = ()
) -> dict[str, list[int]]:
    """``{exact path: ids}`` for ``trainable_token_indices`` on ``model`` (what the recipe records).

    Raises:
        ValueError: a name that matches no embedding or Linear layer, an id beyond the layer's rows, or a layer that
            LoRA adapts too (``targets``).
    """
    layers = _row_layers(model)
    if isinstance(indices, list):
        wanted = {_input_embedding(model, layers): indices}
    else:
        wanted = {}
        for key, ids in indices.items():
            hits = [p for p in layers if path_matches(key, p)]
            if not hits:
                embeddings = [p for p, layer in layers.items() if isinstance(layer, nn.Embedding)]
                raise ValueError(
                    f"`{ARGUMENT}` names {key!r}, which matches no embedding or Linear layer of "
                    f"{type(model).__name__}; embeddings: {embeddings or '(none)'}."
                )
            wanted.update(dict.fromkeys(hits, ids))
    for path, ids in wanted.items():
        rows = layers[path].weight.shape[0]
        beyond = [i for i in ids if i >= rows]
        if beyond:
            raise ValueError(
                f"`{ARGUMENT}` holds token ids {beyond} for {path!r}, which has {rows} rows (ids 0..{rows - 1} are "
                f"allowed); resize the embeddings first (model.resize_token_embeddings(len(tokenizer)))."
            )
        tied = [path, *_tied_paths(model, layers[path])]
        both = [p for p in tied if p in targets]
        if both:
            raise ValueError(
                f"`{ARGUMENT}` trains rows of {path!r}, which `target_modules` also adapts with LoRA ({both}); "
                f"use one of them for this layer."
            )
    return wanted


def _tied_paths(model: nn.Module, base: nn.Module) -> list[str]:
    """Paths of the other layers whose weight is ``base``'s weight tensor (a tied ``lm_head``)."""
    return [
        path
        for path, module in _layers(model).items()
        if module is not base and module._parameters.get("weight") is base.weight
    ]


class TrainableTokens(ParameterAdapter):
    """The trained rows ``token_indices`` of one embedding (or Linear) weight (see the module docstring).

    Args:
        base_layer: the ``nn.Embedding`` (or ``nn.Linear``, rows = outputs) whose rows train.
        config: the LoRA config these tokens belong to.
        token_indices: the rows to train.
        leader: for a layer tied to another's weight: the adapter of that layer, whose rows this one reads (it holds
            no tensor of its own).
    """

    absorbs_scale = True

    def __init__(
        self,
        base_layer: nn.Module,
        config: MethodConfig,
        token_indices: list[int],
        leader: TrainableTokens | None = None,
    ) -> None:
        super().__init__(base_layer, config, ["weight"])
        weight = base_layer.weight
        self.token_indices = list(token_indices)
        index = torch.tensor(self.token_indices, dtype=torch.long, device=weight.device)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("trainable_tokens_original", weight.detach()[index].clone(), persistent=False)
        if leader is None:
            self.trainable_tokens_delta = nn.Parameter(weight.detach()[index].clone())
        self.__dict__["leader"] = leader

    @property
    def rows(self) -> torch.Tensor:
        """The trained rows (the leader's, for a tied layer), ``(len(token_indices), dim)``."""
        leader = self.__dict__["leader"]
        return (leader if leader is not None else self).trainable_tokens_delta

    def _scaled_rows(self, dtype: torch.dtype) -> torch.Tensor:
        rows = self.rows.to(dtype)
        if self.scale == 1.0:
            return rows
        original = self.trainable_tokens_original.to(dtype)
        return original + self.scale * (rows - original)

    def adapted_parameter(self, layer: AdaptedParameters, name: str, value: torch.Tensor) -> torch.Tensor:
        return value.index_copy(0, self.index, self._scaled_rows(value.dtype))  # (vocab, dim), rows replaced

    def merge_parameter_into(self, layer: AdaptedParameters, name: str, value: torch.Tensor) -> torch.Tensor:
        return value.index_copy(0, self.index, self._scaled_rows(torch.float32))

    def unmerge_parameter_from(self, layer: AdaptedParameters, name: str, value: torch.Tensor) -> torch.Tensor:
        return value.index_copy(0, self.index, self.trainable_tokens_original.float())

    def store_scale(self, scale: float) -> None:
        if self.__dict__["leader"] is None:
            original = self.trainable_tokens_original.to(self.trainable_tokens_delta.dtype)
            self.trainable_tokens_delta.copy_(original + scale * (self.trainable_tokens_delta - original))

    def extra_repr(self) -> str:
        tied = ", tied" if self.__dict__["leader"] is not None else ""
        return f"token_indices={self.token_indices}{tied}"


def _wrap(model: nn.Module, path: str, adapter: TrainableTokens, adapter_name: str) -> None:
    module = model.get_submodule(path)
    layer = module if isinstance(module, AdaptedParameters) else AdaptedParameters(module)
    layer.add_adapter(adapter_name, adapter)
    if layer is not module:
        replace_module(model, path, layer)


def insert_trainable_tokens(
    model: nn.Module, tokens: dict[str, list[int]], config: MethodConfig, adapter_name: str
) -> None:
    """Put :class:`TrainableTokens` on each layer of ``tokens`` (from :func:`resolve_token_layers`), and a tied
    follower on each layer sharing its weight."""
    for path, ids in tokens.items():
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, AdaptedParameters) else module
        tied = _tied_paths(model, base)
        named = [p for p in tied if p in tokens]
        if named:
            raise ValueError(
                f"`{ARGUMENT}` names {path!r} and {named}, whose weights are one tied tensor; name only one of them "
                f"(the other reads the same rows)."
            )
        leader = TrainableTokens(base, config, ids)
        _wrap(model, path, leader, adapter_name)
        for other in tied:
            other_module = model.get_submodule(other)
            other_base = other_module.base_layer if isinstance(other_module, AdaptedParameters) else other_module
            _wrap(model, other, TrainableTokens(other_base, config, ids, leader=leader), adapter_name)


def tokens_to_peft(adapter: TrainableTokens) -> dict[str, torch.Tensor]:
    """One layer's tensors under PEFT's keys; none for a tied follower (PEFT does not repeat them)."""
    return {} if adapter.__dict__["leader"] is not None else {PEFT_KEY: adapter.trainable_tokens_delta}


def tokens_from_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's tensors of one layer under our keys (other keys are passed on, for the caller to report)."""
    return {("trainable_tokens_delta" if k == PEFT_KEY else k): t for k, t in tensors.items()}
