"""A model's ordered *layers*, from input to output: what ``freeze=N`` and layer-wise unfreezing count.

Each family's own contract decides what a layer is:

* timm: ``model.group_matcher(coarse)`` — the stem, then each block (``coarse=False``, as timm's layer-wise LR decay
  uses) or each stage (``coarse=True``), then whatever follows (final norm, neck).
* transformers: the stack(s) of transformer layers (the outermost ``nn.ModuleList`` of identical blocks, e.g.
  ``bert.encoder.layer``, ``transformer.h``, T5's ``encoder.block`` and ``decoder.block``) give one layer per block;
  the parameters between stacks form layers of their own, and the run holding ``get_input_embeddings()`` comes first.
* anything else: each top-level child, with a log line saying this fallback was used.

In every family the task head (``find_head``: ``get_classifier()``, the transformers task head, an untied
``get_output_embeddings()``) is split off as the last layer. Parameters are assigned once each (tied weights belong to
the first layer that holds them). Print :func:`describe_layers` to see what ``freeze=N`` will mean.

Example::

    >>> import timm
    >>> model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    >>> [layer.name for layer in split_layers(model)]
    ['conv1, bn1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn as nn

from peft_callbacks._validation import check_bool, check_module
from peft_callbacks.core.heads import find_head
from peft_callbacks.core.models import family_of
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.targets import in_subtree

log = logging.getLogger(__name__)

_MAX_NAMED = 3


@dataclass(frozen=True)
class Layer:
    """One layer of a model, as :func:`split_layers` sees it.

    Attributes:
        index: position from the input (0) to the output.
        paths: the fewest module paths (or root-level parameter names) that hold exactly this layer's parameters.
        parameters: names of the parameters (as in ``model.named_parameters()``) that make up the layer.
        is_head: whether this is the task head.

    Example::

        >>> Layer(0, ("conv1", "bn1"), ("conv1.weight", "bn1.weight", "bn1.bias")).name
        'conv1, bn1'
    """

    index: int
    paths: tuple[str, ...]
    parameters: tuple[str, ...]
    is_head: bool = False

    @property
    def name(self) -> str:
        """The layer's paths joined for display, e.g. ``"conv1, bn1"``."""
        shown = ", ".join(self.paths[:_MAX_NAMED])
        return shown + (f", … ({len(self.paths)} modules)" if len(self.paths) > _MAX_NAMED else "")


def split_layers(model: nn.Module, coarse: bool = False) -> list[Layer]:
    """Split ``model`` into its ordered layers (see the module docstring for each family's rule).

    Args:
        model: a timm model, a transformers model or any ``nn.Module`` with parameters.
        coarse: timm only: one layer per stage (``group_matcher(coarse=True)``) instead of one per block.

    Returns:
        The layers, input first; the head (if it has parameters of its own) last, with ``is_head=True``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no parameters.

    Example::

        >>> import transformers as hf
        >>> config = hf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                        intermediate_size=37, num_labels=3)
        >>> [layer.name for layer in split_layers(hf.BertForSequenceClassification(config))]
        ['bert.embeddings', 'bert.encoder.layer.0', 'bert.encoder.layer.1', 'bert.pooler', 'classifier']
    """
    check_module("model", model)
    check_bool("coarse", coarse)
    names = [name for name, _ in model.named_parameters()]
    if not names:
        raise ValueError(f"{type(model).__name__} has no parameters, so it has no layers to freeze.")
    head = find_head(model)
    head_paths = head.all_paths
    family = family_of(model)
    if family == "timm" and callable(getattr(model, "group_matcher", None)):
        groups = _timm_groups(model, coarse)
    elif family == "transformers":
        groups = _transformers_groups(model, names, head_paths)
    else:
        log.info(
            "%s follows no timm/transformers contract; its layers are its top-level children.", type(model).__name__
        )
        groups = _runs(names, lambda name: name.split(".", 1)[0])
    head_names = [n for n in names if in_subtree(n, head_paths)]
    groups = [[n for n in group if not in_subtree(n, head_paths)] for group in groups]
    groups = [g for g in groups if g] + ([head_names] if head_names else [])
    covers = _Covers(names)
    return [
        Layer(i, covers.paths(g), tuple(g), is_head=bool(head_names) and i == len(groups) - 1)
        for i, g in enumerate(groups)
    ]


def describe_layers(model: nn.Module, coarse: bool = False) -> str:
    """A table of ``model``'s layers (index, parameters, trainable share, paths): what ``freeze=N`` counts.

    Example::

        >>> import torch.nn as nn
        >>> print(describe_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))))
        Sequential: 2 layers (freeze=N freezes layers 0 … N-1)
          0  params 40  trainable 40  0
          1  params 18  trainable 18  2  [head]
    """
    layers = split_layers(model, coarse=coarse)
    params = dict(model.named_parameters())
    lines = [f"{type(model).__name__}: {len(layers)} layers (freeze=N freezes layers 0 … N-1)"]
    for layer in layers:
        tensors = [params[n] for n in layer.parameters]
        total = sum(p.numel() for p in tensors)
        trainable = sum(p.numel() for p in tensors if p.requires_grad)
        head = "  [head]" if layer.is_head else ""
        lines.append(f"  {layer.index:<2} params {total:,}  trainable {trainable:,}  {layer.name}{head}")
    return "\n".join(lines)


def _runs(names: Iterable[str], key) -> list[list[str]]:
    """Consecutive names with the same key form one group."""
    groups: list[list[str]] = []
    last = object()
    for name in names:
        k = key(name)
        if not groups or k != last:
            groups.append([])
        groups[-1].append(name)
        last = k
    return groups


def _timm_groups(model: nn.Module, coarse: bool) -> list[list[str]]:
    from timm.models import group_parameters

    grouped = group_parameters(model, model.group_matcher(coarse=coarse))
    return [grouped[k] for k in sorted(grouped)]


def _block_lists(model: nn.Module) -> list[str]:
    """Paths of the outermost ``nn.ModuleList``s of identical, parameterised blocks (the transformer stacks)."""
    lists: list[str] = []
    inserted: list[str] = []
    for path, m in model.named_modules():
        if isinstance(m, PEFTModule):
            inserted.append(path)
        if not path or in_subtree(path, lists + inserted) or not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(block) for block in m}) == 1 and any(True for _ in m.parameters()):
            lists.append(path)
    return lists


def _transformers_groups(model: nn.Module, names: list[str], head_paths: list[str]) -> list[list[str]]:
    lists = _block_lists(model)

    def key(name: str) -> str:
        for root in lists:
            if name.startswith(root + "."):
                return root + "." + name[len(root) + 1 :].split(".", 1)[0]
        return "head" if in_subtree(name, head_paths) else "between"

    groups = _runs(names, key)
    embedding_ids = _input_embedding_ids(model)
    params = dict(model.named_parameters())
    first = next((g for g in groups if any(id(params[n]) in embedding_ids for n in g)), None)
    if first is not None and first is not groups[0]:
        groups.remove(first)
        groups.insert(0, first)
    return groups


def _input_embedding_ids(model: nn.Module) -> set[int]:
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return set()
    return {id(p) for p in embeddings.parameters()} if isinstance(embeddings, nn.Module) else set()


class _Covers:
    """Finds the fewest module paths whose parameters are exactly a given set of parameter names."""

    def __init__(self, names: list[str]) -> None:
        self.under: dict[str, set[str]] = {}
        for name in names:
            for prefix in _ancestors(name):
                self.under.setdefault(prefix, set()).add(name)

    def paths(self, group: list[str]) -> tuple[str, ...]:
        members = set(group)
        out: list[str] = []
        for name in group:
            cover = name
            for prefix in _ancestors(name):  # innermost first
                if self.under[prefix] <= members:
                    cover = prefix
                else:
                    break
            if cover not in out:
                out.append(cover)
        return tuple(out)


def _ancestors(name: str) -> list[str]:
    """Module paths holding parameter ``name``, innermost first: ``a.b.w`` -> ``["a.b", "a"]``."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
