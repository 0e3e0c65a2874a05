"""The kinds of model a method applies to: a predicate on the model and the words that name it.

Each registered method declares, for a config, the models it can go into
(:meth:`~peft_callbacks.engine.Method.applies_to`): every model (``ANY_MODEL``), models with a layer it adapts
outside the task head (:func:`layers_outside_head`), transformers text models (:data:`TEXT_TRANSFORMERS`), timm Vision
Transformers (:data:`TIMM_VISION_TRANSFORMERS`), or a kind of its own. The engine's contract test runs each method on
every model of its zoo and skips a model only where the declared kind does not match it, after checking that the
method really refuses that model with a ``ValueError`` naming it; everywhere else an error is a failure.

Example::

    >>> import torch.nn as nn
    >>> kind = layers_outside_head(("linear",))
    >>> kind.description
    'models with a layer it adapts outside their task head (one of: nn.Linear)'
    >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))  # its only Linear is the head
    >>> kind(mlp), kind(cnn), ANY_MODEL(cnn)
    (True, False, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch.nn as nn

from peft_callbacks.core.heads import find_head
from peft_callbacks.core.kinds import KIND_NAMES, layer_kind
from peft_callbacks.core.models import is_transformers_model
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.targets import in_subtree

__all__ = ["ANY_MODEL", "TEXT_TRANSFORMERS", "TIMM_VISION_TRANSFORMERS", "ModelKind", "layers_outside_head"]


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """A kind of model: ``kind(model)`` tells whether ``model`` is one.

    Attributes:
        description: the kind in words, completing "applies to …" (``"models with transformer blocks"``).
        matches: ``(model) -> bool``.
    """

    description: str
    matches: Callable[[nn.Module], bool]

    def __call__(self, model: nn.Module) -> bool:
        return bool(self.matches(model))


ANY_MODEL = ModelKind("any model", lambda model: True)


def layers_outside_head(kinds: tuple[str, ...]) -> ModelKind:
    """Models with a layer of one of ``kinds`` (:func:`~peft_callbacks.core.kinds.layer_kind`) outside their task
    head: what a method that adapts weight layers needs with its default targets."""

    def matches(model: nn.Module) -> bool:
        head = find_head(model).all_paths
        return any(
            not isinstance(m, PEFTModule) and not in_subtree(path, head) and layer_kind(m) in kinds
            for path, m in model.named_modules()
        )

    adapted = ", ".join(KIND_NAMES.get(kind, kind) for kind in kinds)
    return ModelKind(f"models with a layer it adapts outside their task head (one of: {adapted})", matches)


def _text_transformers(model: nn.Module) -> bool:
    if not is_transformers_model(model) or getattr(model.config, "is_encoder_decoder", False):
        return False
    return isinstance(model.get_input_embeddings(), nn.Embedding)


def _timm_vision_transformer(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


TEXT_TRANSFORMERS = ModelKind(
    "transformers encoder-only and decoder-only text models (token embeddings as input)", _text_transformers
)
TIMM_VISION_TRANSFORMERS = ModelKind(
    "timm VisionTransformer models (ViT, DeiT and subclasses)", _timm_vision_transformer
)
