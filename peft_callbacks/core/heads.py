"""Find a model's task head through its family's public contract.

* timm: ``model.get_classifier()`` (a tuple for distilled models; ``nn.Identity`` when ``num_classes=0``).
* transformers: every top-level submodule of a ``*For<Task>`` model that is not the base model
  (``model.base_model``) and has parameters, e.g. ``classifier``, ``score``, ``pre_classifier``,
  ``classification_head``, ``qa_outputs``. The vocabulary projection (``get_output_embeddings()``, usually tied to the
  input embeddings) is reported separately: it is not a new task head and is never adapted or trained by default.
* anything else: the layer whose output is the model's output, found by tracing ``forward`` symbolically
  (:func:`peft_callbacks.core.graph.output_layers`), with a log line; when the trace cannot tell (data-dependent
  control flow, a residual around the last layer), no head at all, and a log line says so. The last registered
  layer is never guessed: in a SwiGLU block ``w1, w2, w3`` it is the gate ``w3``, not the output ``w2``.

A model with no task head by its family's contract (timm ``num_classes=0``, a transformers base model) returns
features, not class scores: :func:`headless_reason` says so, for callers that need class scores.

Example::

    >>> import timm
    >>> find_head(timm.create_model("test_resnet", pretrained=False, num_classes=3)).head
    ['fc']
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.nn as nn

from peft_callbacks.core.models import family_of
from peft_callbacks.core.modules import PEFTModule

log = logging.getLogger(__name__)


@dataclass
class HeadInfo:
    """Where a model's head is.

    Attributes:
        head: paths (relative to the model) of the task-head modules.
        output_embeddings: paths of the vocabulary projection of language models (``lm_head``), if any.
        source: how the head was found, for log lines.
    """

    head: list[str] = field(default_factory=list)
    output_embeddings: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def all_paths(self) -> list[str]:
        """Head and output-embedding paths together."""
        return self.head + self.output_embeddings


def find_head(model: nn.Module) -> HeadInfo:
    """Locate the task head of ``model`` (see the module docstring for the rules of each family)."""
    family = family_of(model)
    if family == "timm":
        return _timm_head(model)
    if family == "transformers":
        return _transformers_head(model)
    return _generic_head(model)


def _paths_of(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    wanted = {id(m) for m in modules}
    return [name for name, m in model.named_modules() if id(m) in wanted and name]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _timm_head(model: nn.Module) -> HeadInfo:
    classifier = model.get_classifier()
    modules = list(classifier) if isinstance(classifier, (tuple, list)) else [classifier]
    modules = [m for m in modules if isinstance(m, nn.Module) and _has_params(m)]
    return HeadInfo(head=_paths_of(model, modules), source=f"{type(model).__name__}.get_classifier()")


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    try:
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return out if isinstance(out, nn.Module) else None


def _transformers_head(model: nn.Module) -> HeadInfo:
    out = _output_embeddings(model)
    out_paths = _paths_of(model, [out]) if out is not None else []
    base = model.base_model
    head_modules = []
    if base is not model:
        for _, child in model.named_children():
            if child is base or isinstance(child, PEFTModule) or not _has_params(child):
                continue
            if out is not None and any(m is out for m in child.modules()):
                continue  # e.g. BERT's MLM `cls` block: only its vocabulary projection is special
            head_modules.append(child)
    return HeadInfo(
        head=_paths_of(model, head_modules),
        output_embeddings=out_paths,
        source=f"{type(model).__name__} (transformers base_model / get_output_embeddings())",
    )


def _generic_head(model: nn.Module) -> HeadInfo:
    from peft_callbacks.core.graph import output_layers

    name = type(model).__name__
    found = output_layers(model)
    if isinstance(found, str):
        log.info(
            "%s follows no timm/transformers contract and its output layer cannot be told from its forward (%s); no "
            "layer is taken as its task head, so none trains in full.",
            name,
            found,
        )
        return HeadInfo(source=f"{name}: no timm/transformers contract, no output layer found ({found})")
    log.info(
        "%s follows no timm/transformers contract; its output layer %s, found by tracing its forward, is taken as "
        "the task head.",
        name,
        ", ".join(repr(p) for p in found),
    )
    return HeadInfo(head=found, source=f"{name}: output layer of its forward (generic model)")


def headless_reason(model: nn.Module) -> str | None:
    """Why ``model`` has no task head by its family's contract, or ``None`` when it has one or follows no contract.

    A timm model built with ``num_classes=0`` (``get_classifier()`` is ``nn.Identity``) returns pooled features; a
    transformers base model (no ``*For<Task>`` head, no output embeddings) returns hidden states. Neither gives class
    scores: a LightningModule that adds its own head around them scores the task in its own ``forward``.

    Example::

        >>> import timm
        >>> headless_reason(timm.create_model("test_resnet", pretrained=False, num_classes=0))
        'ResNet has no classifier (timm num_classes=0: get_classifier() is Identity)'
        >>> headless_reason(timm.create_model("test_resnet", pretrained=False, num_classes=3)) is None
        True
    """
    family = family_of(model)
    if family == "generic":
        return None
    info = find_head(model)
    if info.all_paths:
        return None
    name = type(model).__name__
    if family == "timm":
        classifier = type(model.get_classifier()).__name__
        return f"{name} has no classifier (timm num_classes=0: get_classifier() is {classifier})"
    return f"{name} is a transformers base model without a task head (no *For<Task> head, no output embeddings)"
