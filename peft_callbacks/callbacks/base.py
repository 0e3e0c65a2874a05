"""What every surgery callback shares: when surgery runs, on which models, and how the result is reported.

Lightning's order inside ``trainer.fit`` is ``Callback.setup`` → ``LightningModule.setup`` → ``configure_model`` →
checkpoint restore → optimizers. A network built in ``LightningModule.setup`` or ``configure_model`` does not exist
yet at ``Callback.setup``, so the surgery is scheduled to run right after the module's ``configure_model`` (whether
or not the module overrides it): after the network exists, before a checkpoint is restored into it and before
``configure_optimizers`` sees its parameters.

Lightning's ``BitsandbytesPrecision`` plugin replaces the Linear layers later, in ``convert_module`` (called by the
strategy right before it moves the model to its device, where bitsandbytes quantizes the weights), and patches
``torch.nn.Linear`` while ``configure_model`` runs. With that plugin the surgery runs right after ``convert_module``
instead: it then adapts the plugin's quantized layers, and its own layers are neither replaced nor quantized.

Under sharding strategies (:mod:`peft_callbacks.plumbing.strategies`) the same moment holds: with
``ModelParallelStrategy`` the user's ``configure_model`` has sharded the model, and the engine shards the new tensors
alike; ``FSDPStrategy`` and DeepSpeed wrap the model after it. When training ends every rank joins the gathers that
saving and merging need, and global rank 0 writes the files.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from peft_callbacks._validation import check_optional_str
from peft_callbacks.core.models import find_models
from peft_callbacks.core.params import ParameterCount, count_parameters
from peft_callbacks.core.sharding import has_sharded_parameters
from peft_callbacks.io.adapter_file import save_adapter
from peft_callbacks.io.atomic import path_inside
from peft_callbacks.io.weights import save_weights
from peft_callbacks.plumbing import seam
from peft_callbacks.plumbing.hooks import replaces_layers, run_after_conversion, run_after_hook
from peft_callbacks.plumbing.rank_checks import check_first_step, check_saved_tensors, runs_checks
from peft_callbacks.plumbing.strategies import (
    check_sharded_setup,
    full_weights,
    is_sharding,
    outside_zero_init,
    refuse_unbuilt_base,
)

log = logging.getLogger(__name__)


def run_before_surgery(trainer: pl.Trainer, callback: Callback, name: str) -> None:
    """Move ``callback`` before the first :class:`SurgeryCallback` in ``trainer.callbacks`` (if it comes after
    one), so its ``on_train_end`` runs before they save adapters and merge."""
    callbacks = trainer.callbacks
    mine = next(i for i, c in enumerate(callbacks) if c is callback)
    first = next((i for i, c in enumerate(callbacks) if isinstance(c, SurgeryCallback)), None)
    if first is not None and first < mine:
        callbacks.insert(first, callbacks.pop(mine))
        rank_zero_info(f"{name}: moved before {type(callbacks[first + 1]).__name__} in callbacks.")


class SurgeryCallback(Callback):
    """Base class of the callbacks that change a model: LoRA, adapters, prompts, freezing.

    Subclasses implement :meth:`apply` (surgery on one found model) and may override :meth:`finalize`
    (``on_train_end``). This class finds the timm/transformers models inside the LightningModule, schedules the
    surgery at the right moment of ``fit``, and logs trainable/total parameters through the trainer's loggers
    (``peft/trainable_params``, ``peft/total_params``, ``peft/trainable_percent``) and a rank-zero info line.

    Args:
        module: dotted path of the submodule to adapt (e.g. ``"model"``); by default every timm/transformers model
            found inside the LightningModule, or the whole module when it holds none.
        save_adapter_to: a directory to write the adapter file to when training ends, before :meth:`finalize`
            (before LoRA is merged): the trained tensors and the recipe, see :func:`peft_callbacks.io.save_adapter`.
        save_merged_to: a directory to write the adapted model's full weights to when training ends, after
            :meth:`finalize` (LoRA merged): ``save_pretrained`` for transformers models, ``model.safetensors``
            otherwise; one sub-directory per model (named by its path) when several were adapted.
    """

    creates_tensors = True  # inserts new tensors (not only freezing): refused on a base sharding left without values
    check_distributed = True  # the run-time checks of a distributed run (plumbing/rank_checks.py)

    def __init__(
        self, module: str | None = None, save_adapter_to: str | None = None, save_merged_to: str | None = None
    ) -> None:
        self.module = check_optional_str("module", module)
        self.save_adapter_to = check_optional_str("save_adapter_to", save_adapter_to)
        self.save_merged_to = check_optional_str("save_merged_to", save_merged_to)
        self.parameter_count: ParameterCount | None = None
        self.adapted_models: list[str] = []
        self._applied = False
        self._first_step_checked = False

    # -- to implement -------------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, path: str) -> None:
        """Change ``model`` (found at ``path`` inside the LightningModule) in place."""
        raise NotImplementedError

    def is_applied(self, model: nn.Module) -> bool:
        """Does ``model`` already carry this callback's surgery (e.g. a second ``fit`` on the same module)?"""
        return False

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called at ``on_train_end``; LoRA merges here."""

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._applied = False
            self._first_step_checked = False
            run_after_conversion(trainer, pl_module, lambda: self.run_surgery(pl_module, trainer), owner=self)
            if replaces_layers(trainer):
                refuse = self._refuse_early_restore
                run_after_hook(pl_module, "on_load_checkpoint", lambda checkpoint: refuse(), owner=self)

    def _refuse_early_restore(self) -> None:
        """Lightning restores ``fit(ckpt_path=...)`` before the precision plugin converts the layers, so before a
        surgery that waits for the conversion: the checkpoint's tensors would have nowhere to go."""
        if not self._applied:
            raise ValueError(
                f"{self.name} cannot resume from `ckpt_path` under BitsandbytesPrecision: Lightning restores the "
                f"checkpoint before the plugin converts the model's layers, and this callback's surgery waits for "
                f"the conversion. Load the model quantized with transformers' `from_pretrained(..., "
                f"quantization_config=BitsAndBytesConfig(...))` instead (resumable with SlimCheckpoint), or start the "
                f"run without `ckpt_path`."
            )

    def run_surgery(self, pl_module: nn.Module, trainer: pl.Trainer | None = None) -> None:
        """Find the models inside ``pl_module`` and apply the surgery to each (used by :meth:`setup`); with a
        ``trainer``, refuse first a base its strategy left without values, and afterwards set-ups it would break on."""
        self.adapted_models = []
        for path, model in find_models(pl_module, self.module):
            if self.is_applied(model):
                log.info("%s: %s already adapted; continuing with its current weights.", self.name, path or "model")
            elif trainer is None:
                self.apply(model, path)
            else:
                if self.creates_tensors:
                    refuse_unbuilt_base(trainer, model, self.name)
                with outside_zero_init(trainer):
                    self.apply(model, path)
            self.adapted_models.append(path)
        if trainer is not None:
            check_sharded_setup(trainer, pl_module, self.name)
        self.parameter_count = count_parameters(pl_module)
        self._applied = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._applied:
            raise RuntimeError(
                f"{self.name} could not run its surgery: Lightning did not call `configure_model` during fit. "
                f"Call the surgery function on your model before `trainer.fit` instead."
            )
        # counted now, not at surgery time: other callbacks (freezing) may have changed what trains since
        count = self.parameter_count = count_parameters(pl_module)
        rank_zero_info(f"{self.name}: {count} on {self.adapted_models or ['<module>']}")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(count.as_dict("peft/"), step=0)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._first_step_checked:
            self._first_step_checked = True
            if runs_checks(trainer, self, SurgeryCallback):  # every rank got every gradient
                check_first_step(trainer, pl_module, self.name)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        saves = self.save_adapter_to or self.save_merged_to
        with full_weights(trainer):  # FSDP1: the whole model summoned; FSDP2/ZeRO-3 gather layer by layer
            if saves and runs_checks(trainer, self, SurgeryCallback):  # every rank gathered whole, equal tensors
                check_saved_tensors(trainer, pl_module, self.name)
            if self.save_adapter_to and (has_sharded_parameters(pl_module) or trainer.is_global_zero):
                save_adapter(pl_module, self.save_adapter_to, card_sections=_card_sections(trainer))
                rank_zero_info(f"{self.name}: adapter saved to {self.save_adapter_to}")
            self.finalize(trainer, pl_module)
            if self.save_merged_to and (has_sharded_parameters(pl_module) or trainer.is_global_zero):
                self.save_models(pl_module, self.save_merged_to)
        if is_sharding(trainer) and (self.save_adapter_to or self.save_merged_to):
            trainer.strategy.barrier("peft_callbacks_saved")  # no rank reads the files before rank 0 wrote them

    def save_models(self, pl_module: nn.Module, directory: str) -> None:
        """Save the full weights of every adapted model (used for ``save_merged_to``)."""
        found = find_models(pl_module, self.module)
        for path, model in found:
            save_weights(model, path_inside(directory, path) if len(found) > 1 else directory)
        rank_zero_info(f"{self.name}: model weights saved to {directory}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        seam.undo(self)  # what this callback scheduled or installed on Lightning's objects, run or not

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        seam.undo(self)  # Lightning calls no teardown after an exception

    # -- state ----------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return type(self).__name__

    def state_dict(self) -> dict:
        count = self.parameter_count
        return {
            "adapted_models": list(self.adapted_models),
            "parameter_count": None if count is None else {"trainable": count.trainable, "total": count.total},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("parameter_count")
        if saved and self.parameter_count and saved["trainable"] != self.parameter_count.trainable:
            log.warning(
                "%s: the checkpoint was trained with %d trainable parameters, this run has %d; check that the "
                "callback's arguments match the ones used for the checkpoint.",
                self.name,
                saved["trainable"],
                self.parameter_count.trainable,
            )


def _card_sections(trainer: pl.Trainer) -> list[str]:
    """The model card sections the trainer's other callbacks offer (each ``ForgettingMonitor``'s table so far)."""
    offers = (getattr(callback, "model_card_section", None) for callback in trainer.callbacks)
    return [section for offer in offers if callable(offer) and (section := offer()) is not None]
