"""Surgery scheduled right after a hook Lightning calls on an object the library does not own.

Lightning's order inside ``trainer.fit`` is ``Callback.setup`` → ``LightningModule.setup`` → ``configure_model`` →
checkpoint restore → optimizers. A network built in ``LightningModule.setup`` or ``configure_model`` does not exist
yet at ``Callback.setup``, so the surgery is scheduled to run right after the module's ``configure_model`` (whether
or not the module overrides it). With Lightning's ``BitsandbytesPrecision`` the layers are replaced later, in the
plugin's ``convert_module``, so the surgery runs right after that instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import BitsandbytesPrecision

__all__ = [
    "remove_scheduled_hooks",
    "replaces_layers",
    "run_after_configure_model",
    "run_after_conversion",
    "run_after_hook",
]

_PENDING = "_peft_callbacks_pending_{}"


def run_after_hook(pl_module: Any, hook: str, surgery: Callable[..., None]) -> None:
    """Run ``surgery(*args)`` right after Lightning calls ``pl_module.<hook>(*args)`` (once).

    An instance-level hook is installed that calls the class's own hook first, then every scheduled surgery in
    order, and then removes itself, so the module pickles and behaves as before. Several callbacks can schedule
    surgery on the same hook. :func:`remove_scheduled_hooks` drops whatever did not run. ``pl_module`` may be any
    object whose method Lightning calls (the precision plugin's ``convert_module``).
    """
    key = _PENDING.format(hook)
    pending = pl_module.__dict__.get(key)
    if pending is None:
        pending = []
        pl_module.__dict__[key] = pending

        def run_hook(*args, **kwargs):  # no functools.wraps: Lightning must see an overridden hook
            try:
                result = getattr(type(pl_module), hook)(pl_module, *args, **kwargs)
                for scheduled in pending:
                    scheduled(*args, **kwargs)
                return result
            finally:
                pl_module.__dict__.pop(hook, None)
                pl_module.__dict__.pop(key, None)

        pl_module.__dict__[hook] = run_hook
    pending.append(surgery)


def run_after_configure_model(pl_module: pl.LightningModule, surgery: Callable[[], None]) -> None:
    """Run ``surgery()`` right after ``pl_module.configure_model()``: the network exists, nothing is restored yet."""
    run_after_hook(pl_module, "configure_model", surgery)


def run_after_conversion(trainer: pl.Trainer, pl_module: pl.LightningModule, surgery: Callable[[], None]) -> None:
    """Run ``surgery()`` once the network exists and the precision plugin has converted its layers.

    Right after ``configure_model`` (see the module docstring), or, with a plugin that replaces layers
    (``BitsandbytesPrecision``), right after its ``convert_module``.
    """
    if replaces_layers(trainer):
        run_after_hook(trainer.precision_plugin, "convert_module", lambda module: surgery())
    else:
        run_after_configure_model(pl_module, surgery)


def replaces_layers(trainer: pl.Trainer) -> bool:
    """Does the trainer's precision plugin replace the model's layers in ``convert_module`` (bitsandbytes)?"""
    return isinstance(getattr(trainer, "precision_plugin", None), BitsandbytesPrecision)


def remove_scheduled_hooks(pl_module: Any) -> None:
    """Drop instance-level hooks installed by :func:`run_after_hook` that never ran."""
    for hook in ("configure_model", "on_load_checkpoint", "convert_module"):
        if pl_module.__dict__.pop(_PENDING.format(hook), None) is not None:
            pl_module.__dict__.pop(hook, None)
