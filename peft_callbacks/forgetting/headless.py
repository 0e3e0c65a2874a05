"""Score the base task of a model without a head of its own: a timm model built with ``num_classes=0`` or a
transformers base model, wrapped by a module that adds its own head (``self.head = nn.Linear(features, 10)``).

Such a model returns features, not class scores (a ResNet's 2048 pooled features): a loss or an accuracy over them
is meaningless, and nothing in the numbers says so. The base task is scored instead through

* ``forward_fn`` when one is given;
* the original head as ``base_head``, applied to the model's pooled features (its output, shape ``(B, F)``);
* else the wrapping module's own ``forward`` (``pl_module(x)``), which runs the backbone and its head; a ``forward``
  that returns the backbone's features unchanged is refused at the first batch.

Without any of them, scoring refuses with an error that names ``forward_fn=`` and ``base_head=``.

Example::

    >>> import timm, torch
    >>> class Task(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    ...         self.head = nn.Linear(self.backbone.num_features, 10)
    ...     def forward(self, x):
    ...         return self.head(self.backbone(x))
    >>> from peft_callbacks.core.models import defines_forward
    >>> defines_forward(Task()), defines_forward(nn.Module())
    (True, False)
    >>> feature_head_from(nn.Linear(96, 10)).weight.requires_grad
    False
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks.core.models import family_of
from peft_callbacks.forgetting.original_heads import frozen_copy, head_paths, hooked, load_state_file


def feature_head_from(base_head: nn.Module | str) -> nn.Module:
    """A frozen copy of the base task's head, to apply to the pooled features of a model without a head.

    Args:
        base_head: the head module; a timm model whose classifier is that head; or a path to a saved state dict of
            one ``nn.Linear`` (``weight`` of shape ``(classes, features)``, optional ``bias``).

    Raises:
        ValueError: the module or file holds no single head.
    """
    if isinstance(base_head, str):
        return _linear_from_file(base_head)
    if family_of(base_head) == "timm":
        paths = head_paths(base_head)
        if len(paths) != 1:
            raise ValueError(
                f"`base_head` is a {type(base_head).__name__} with {len(paths)} head modules ({paths}); pass the "
                f"head module itself, to apply to the features of the model without a head."
            )
        base_head = base_head.get_submodule(paths[0])
    elif family_of(base_head) == "transformers":
        raise ValueError(
            f"`base_head` is a whole {type(base_head).__name__}; for a model without a head pass the head module "
            f"itself, or `forward_fn=` to say how its hidden states are pooled."
        )
    return frozen_copy(base_head)


def _linear_from_file(path: str) -> nn.Linear:
    state = load_state_file(path)
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or weight.ndim != 2 or set(state) - {"weight", "bias"}:
        raise ValueError(
            f"`base_head`={path!r} must hold the state dict of one nn.Linear (`weight`, optional `bias`) to be "
            f"applied to the features of a model without a head; it has: {', '.join(list(state)[:8])}. Pass the "
            f"head module instead."
        )
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    head.load_state_dict(state)
    return frozen_copy(head)


def apply_feature_head(head: nn.Module, features: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``head(features)`` for pooled features ``(B, F)``; refuse token or spatial features (pooling is ambiguous)."""
    if features.ndim != 2:
        raise ValueError(
            f"`base_head` is applied to the pooled features of {type(model).__name__}, which has no head, but its "
            f"output has shape {tuple(features.shape)}, not (batch, features); pass `forward_fn=` to say how the "
            f"base-task logits are computed from it."
        )
    return head(features)


def headless_error(reason: str, root: nn.Module, path: str) -> ValueError:
    """The error for a model without a head that nothing scores: it names ``forward_fn=`` and ``base_head=``."""
    where = f"self.{path}" if path else "the model"
    return ValueError(
        f"The base task needs class scores, but {reason}: its outputs are features, and {type(root).__name__} "
        f"defines no `forward` that puts a head on them. Give {type(root).__name__} a `forward` returning the "
        f"logits (e.g. `return self.head({where}(x))`), or pass `forward_fn=lambda module, batch: "
        f"module.head(module.{path or 'model'}(batch[0]))`, or `base_head=` (the base task's head module, applied to "
        f"the model's pooled features)."
    )


def check_scores_not_features(logits: torch.Tensor, features: torch.Tensor | None, root: nn.Module) -> None:
    """Refuse a wrapping ``forward`` that returns the headless model's features themselves as the logits."""
    if features is not None and (features is logits or (features.shape == logits.shape and features.equal(logits))):
        raise ValueError(
            f"{type(root).__name__}.forward returns the features of a model without a head ({tuple(logits.shape)}), "
            f"not class scores; pass `forward_fn=` returning the base-task logits, or `base_head=` (the base task's "
            f"head module, applied to those features)."
        )


def _first_tensor(output: Any) -> torch.Tensor | None:
    """A model output's main tensor: itself, or the first entry of a tuple or a ``ModelOutput`` (hidden states)."""
    if isinstance(output, torch.Tensor):
        return output
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, (list, tuple)) else ()
    return next((item for item in items if isinstance(item, torch.Tensor)), None)


@contextlib.contextmanager
def captured_output(module: nn.Module, store: list[torch.Tensor]) -> Iterator[None]:
    """Append the output tensor of each ``module`` call to ``store`` (a headless model's output: its features).

    Example::

        >>> backbone, store = nn.Linear(3, 4), []
        >>> with captured_output(backbone, store):
        ...     logits = nn.Linear(4, 2)(backbone(torch.zeros(5, 3)))
        >>> [tuple(t.shape) for t in store]
        [(5, 4)]
    """
    with hooked(module.register_forward_hook(lambda m, args, output: store.append(_first_tensor(output)))):
        yield
