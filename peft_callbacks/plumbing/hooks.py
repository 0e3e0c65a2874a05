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

from peft_callbacks.plumbing import seam

__all__ = ["replaces_layers", "run_after_configure_model", "run_after_conversion", "run_after_hook"]


def run_after_hook(target: Any, hook: str, surgery: Callable[..., None], *, owner: Any) -> None:
    """Run ``surgery(*args)`` right after Lightning calls ``target.<hook>(*args)`` (once), through the
    :mod:`~peft_callbacks.plumbing.seam`: the hook's own code runs first, then every scheduled surgery in order; a
    surgery scheduled from inside one runs in the same call, after the others. ``target`` is the LightningModule or
    any object whose method Lightning calls (the precision plugin's ``convert_module``); ``owner`` (the callback)
    takes what did not run away again with :func:`~peft_callbacks.plumbing.seam.undo`.
    """
    seam.run_after(target, hook, surgery, owner=owner)


def run_after_configure_model(pl_module: pl.LightningModule, surgery: Callable[[], None], *, owner: Any) -> None:
    """Run ``surgery()`` right after ``pl_module.configure_model()``: the network exists, nothing is restored yet."""
    run_after_hook(pl_module, "configure_model", surgery, owner=owner)


def run_after_conversion(
    trainer: pl.Trainer, pl_module: pl.LightningModule, surgery: Callable[[], None], *, owner: Any
) -> None:
    """Run ``surgery()`` once the network exists and the precision plugin has converted its layers.

    Right after ``configure_model`` (see the module docstring), or, with a plugin that replaces layers
    (``BitsandbytesPrecision``), right after its ``convert_module``.
    """
    if replaces_layers(trainer):
        run_after_hook(trainer.precision_plugin, "convert_module", lambda module: surgery(), owner=owner)
    else:
        run_after_configure_model(pl_module, surgery, owner=owner)


def replaces_layers(trainer: pl.Trainer) -> bool:
    """Does the trainer's precision plugin replace the model's layers in ``convert_module`` (bitsandbytes)?"""
    return isinstance(getattr(trainer, "precision_plugin", None), BitsandbytesPrecision)
