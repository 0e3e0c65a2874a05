"""Surgery as a transaction: when any step fails, the model is exactly as it was before.

Surgery only ever adds or replaces child modules, registers forward hooks, flips ``requires_grad``, marks BatchNorm
layers and records recipes. :func:`transaction` snapshots exactly those (one pass over the modules, no tensor is
copied) and puts them back if the block raises, so a refused load or a bad file never leaves a half-adapted,
half-frozen model behind.

Example::

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> try:
    ...     with transaction(net):
    ...         net[0] = nn.Identity()
    ...         _ = net.requires_grad_(False)
    ...         raise ValueError("refused")
    ... except ValueError:
    ...     pass
    >>> type(net[0]).__name__, net[0].weight.requires_grad
    ('Linear', True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn as nn

__all__ = ["transaction"]

_DICTS = (
    "_modules",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)
_MARKERS = ("_peft_callbacks_recipe", "_peft_frozen_stats_hook", "_peft_input_grads_hook")


@contextlib.contextmanager
def transaction(model: nn.Module) -> Iterator[nn.Module]:
    """Undo every structural change to ``model`` made inside the block if it raises (see the module docstring)."""
    modules = list(model.modules())
    saved = [
        (
            m,
            {name: dict(getattr(m, name)) for name in _DICTS if hasattr(m, name)},
            {key: _copy(m.__dict__[key]) for key in _MARKERS if key in m.__dict__},
        )
        for m in modules
    ]
    grads = [(p, p.requires_grad) for m in modules for p in m._parameters.values() if p is not None]
    try:
        yield model
    except BaseException:
        for m, dicts, markers in saved:
            for name, content in dicts.items():
                target = getattr(m, name)
                target.clear()
                target.update(content)
            for key in _MARKERS:
                m.__dict__.pop(key, None)
            m.__dict__.update(markers)
        for p, flag in grads:
            p.requires_grad_(flag)
        raise


def _copy(value):
    return [dict(r) if isinstance(r, dict) else r for r in value] if isinstance(value, list) else value
