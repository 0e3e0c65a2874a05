"""What the prompt methods share: they add tokens, one set per model, found where each model family keeps its inputs.

Example::

    >>> from peft_callbacks.engine import get_method
    >>> method = get_method("visual_prompts")
    >>> isinstance(method, PromptMethod), method.one_per_model, method.starts_as_identity
    (True, True, False)
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from peft_callbacks.engine import ModuleMethod

__all__ = ["PromptMethod"]


class PromptMethod(ModuleMethod):
    """A method that adds learned tokens to a model's inputs: one set per model (the default adapter name only), and
    the model does not compute what it did before (it sees more tokens). Subclasses give :meth:`places`."""

    one_per_model = True
    starts_as_identity = False

    def places(self, model: nn.Module) -> Any:
        """Where the tokens go in ``model`` (the input embedding, the blocks, …); a ``ValueError`` naming the model
        and the models supported where it has no such place."""
        raise NotImplementedError

    def check_model(self, model: nn.Module) -> None:
        self.places(model)
