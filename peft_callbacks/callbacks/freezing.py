"""Freezing strategies as callbacks: freeze N layers, linear probing, gradual unfreezing, head-then-full (LP-FT).

The callbacks are thin glue over :mod:`peft_callbacks.freezing` (plain PyTorch); they keep their own record of the
optimizer's param groups in the checkpoint and put them back on resume. What they do:

* **When.** Freezing runs right after ``configure_model`` and after every other surgery scheduled there (LoRA,
  adapters), whatever the order of the callbacks, so it sees the final model; then ``configure_optimizers`` runs.
* **The optimizer.** At ``on_fit_start`` the parameters these callbacks froze are taken out of the optimizer (by
  identity); each unfrozen layer comes back as a new param group with its own learning rate, and the LR schedulers
  are told about it.
* **Resume.** Which layers are frozen and the optimizer's param groups (as plain data: parameter names and
  hyper-parameters) are saved in the callback state; ``trainer.fit(ckpt_path=...)`` restores both before the
  optimizer state loads, so a resumed run continues the schedule as if never interrupted. Checkpoints written while
  these callbacks subclassed Lightning's ``BaseFinetuning`` (its ``internal_optimizer_metadata``) resume too.
* **With LoRA (or any other surgery).** Unfreezing gives back what was trainable after that surgery: with
  ``LoRACallback`` a layer's LoRA factors, not its base weights. ``FreezeBackbone(freeze=N)`` + LoRA trains LoRA in the
  top layers only; ``HeadThenFull`` + LoRA trains the head, then the LoRA factors. ``HeadOnly`` + LoRA is refused:
  the LoRA factors would never train.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.finetuning import BaseFinetuning
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer

from peft_callbacks._validation import check_bool, check_float, check_int, check_patterns
from peft_callbacks.callbacks.base import SurgeryCallback
from peft_callbacks.core.modules import peft_modules
from peft_callbacks.core.params import count_parameters
from peft_callbacks.freezing.freeze import FreezeSpec, LayerFreezer, freeze_layers, resolve_freeze
from peft_callbacks.freezing.layers import split_layers
from peft_callbacks.freezing.optim import add_param_group, extend_schedulers, remove_parameters
from peft_callbacks.plumbing.hooks import run_after_configure_model
from peft_callbacks.plumbing.strategies import run_before_checkpoint_load, strategy_kind

log = logging.getLogger(__name__)

_RUNTIME = ("freezers", "_schedulers", "_trainer")
Groups = dict[int, list[dict]]  # optimizer index -> its param groups, each with "params" as parameter names


def may_unfreeze(callback: Callback) -> bool:
    """Can ``callback`` make tensors trainable while training: a schedule here (not ``FreezeBackbone``/``HeadOnly``),
    or any ``BaseFinetuning`` callback of Lightning's or the user's?

    Example::

        >>> may_unfreeze(LayerwiseUnfreezing()), may_unfreeze(FreezeBackbone()), may_unfreeze(Callback())
        (True, False, False)
    """
    if isinstance(callback, _FreezingCallback):
        return type(callback).due is not _FreezingCallback.due
    return isinstance(callback, BaseFinetuning)


class _FreezingCallback(SurgeryCallback):
    """Shared mechanics: freeze after all other surgery, prune the optimizer, unfreeze on schedule, resume."""

    creates_tensors = False

    def __init__(self, *, train_bn: bool, module: str | None) -> None:
        super().__init__(module=module)
        self.train_bn = check_bool("train_bn", train_bn)
        self.freezers: dict[str, LayerFreezer] = {}
        self._saved_frozen: dict[str, list[int]] | None = None
        self._saved_groups: Groups | None = None  # from a checkpoint, put back before the optimizer state loads
        self._groups: Groups = {}  # as the last fit left them, for a checkpoint written after it
        self._schedulers: list[object] = []
        self._trainer: pl.Trainer | None = None

    # -- to implement -------------------------------------------------------------------------------------------
    def make_freezer(self, model: nn.Module) -> LayerFreezer:
        """Freeze ``model`` as it should be before the first epoch and return the freezer."""
        raise NotImplementedError

    def due(self, freezer: LayerFreezer, epoch: int) -> list[tuple[list[int], float]]:
        """``(layer indices, lr scale)`` to unfreeze at the start of ``epoch`` (frozen layers only)."""
        return []

    # -- surgery ------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if strategy_kind(trainer) == "deepspeed" and type(self).due is not _FreezingCallback.due:
            raise ValueError(
                f"{self.name} adds param groups to the optimizer while training, but DeepSpeed flattens the "
                f"optimizer's param groups once, when training starts, so groups added later never train. With "
                f"DeepSpeed use FreezeBackbone (the frozen set and the groups stay fixed), or train with "
                f"ModelParallelStrategy (FSDP2) or DDP for an unfreezing schedule."
            )
        others = [type(c).__name__ for c in trainer.callbacks if isinstance(c, _FreezingCallback) and c is not self]
        if others:
            raise ValueError(
                f"{self.name} cannot be combined with {', '.join(others)}: each decides on its own which layers are "
                f"frozen and which param groups the optimizer gets. Use one freezing callback."
            )
        self._applied = False
        self.freezers = {}
        self._saved_frozen, self._saved_groups = None, None  # a checkpoint, if any, is loaded after this
        self._trainer = trainer
        if trainer.strategy.restore_checkpoint_after_setup:
            # FSDP, DeepSpeed and FSDP2 load the optimizer state after on_fit_start, into the groups they find: put
            # back the frozen set and the param groups from this callback's saved state just before that
            restore = self._restore_before_load
            run_before_checkpoint_load(trainer.strategy, lambda path: restore(trainer, path), owner=self)

        # Scheduling from inside a scheduled surgery appends to the list being run, so the freezing runs after the
        # surgery every other callback scheduled on configure_model (LoRA, adapters), whatever the callback order.
        def schedule_last() -> None:
            run_after_configure_model(pl_module, lambda: self.run_surgery(pl_module, trainer), owner=self)

        run_after_configure_model(pl_module, schedule_last, owner=self)

    def apply(self, model: nn.Module, path: str) -> None:
        self.freezers[path] = self.make_freezer(model)

    # -- optimizer and resume -----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._applied:
            SurgeryCallback.on_fit_start(self, trainer, pl_module)  # raises with an explanation
        if self._saved_frozen is not None:
            self._restore_frozen(self._saved_frozen)
            self._saved_frozen = None
        restoring = bool(self._saved_groups)
        if restoring:
            self._restore_groups(trainer, pl_module)  # the optimizer state, loaded after this, fits them
        self._schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        frozen = [p for freezer in self.freezers.values() for p in freezer.frozen_parameters()]
        for optimizer in trainer.optimizers:
            if not restoring and strategy_kind(trainer) != "deepspeed":  # DeepSpeed's groups are fixed; it skips
                remove_parameters(optimizer, frozen)  # frozen tensors itself
            extend_schedulers(optimizer, self._schedulers)
        self.parameter_count = count_parameters(pl_module)
        SurgeryCallback.on_fit_start(self, trainer, pl_module)

    def _restore_before_load(self, trainer: pl.Trainer, path: str | os.PathLike) -> None:
        state = saved_callback_state(path, self.state_key)
        if state is None:
            return
        self.load_state_dict(state)
        self._restore_frozen(self._saved_frozen or {})
        self._saved_frozen = None
        if self._saved_groups:
            self._restore_groups(trainer, trainer.lightning_module)
        for optimizer in trainer.optimizers:
            extend_schedulers(optimizer, self._schedulers)

    def _restore_frozen(self, saved: dict[str, list[int]]) -> None:
        for path, freezer in self.freezers.items():
            if path not in saved:
                continue
            wanted = set(saved[path])
            freezer.unfreeze(freezer.frozen - wanted)
            freezer.freeze(wanted - freezer.frozen)

    def _restore_groups(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        """Give each optimizer the param groups saved in the checkpoint (``_saved_groups``), in their order."""
        named = dict(pl_module.named_parameters())
        for index, optimizer in enumerate(trainer.optimizers):
            groups = self._saved_groups.get(index)
            if groups:
                optimizer.param_groups = [_group_of(group, named, self.name) for group in groups]
        self._saved_groups = None

    def _layout(self) -> Groups:
        """The param groups of the fit's optimizers now, as plain data (parameters by name)."""
        trainer = self._trainer
        if trainer is None or not trainer.optimizers:
            return self._groups
        names = {id(p): n for n, p in trainer.lightning_module.named_parameters()}
        return {
            index: [_group_data(g, names) for g in opt.param_groups] for index, opt in enumerate(trainer.optimizers)
        }

    def unfreeze_due(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Unfreeze what :meth:`due` names for ``epoch``, each step as a new param group of ``optimizer``."""
        for path, freezer in self.freezers.items():
            for indices, scale in self.due(freezer, epoch):
                params = freezer.unfreeze(indices)
                names = "; ".join(f"layer {i}: {freezer.layers[i].name}" for i in indices)  # one entry per layer
                add_param_group(
                    optimizer, params, scale, name=f"{path or 'model'}: {names}", schedulers=self._schedulers
                )
                rank_zero_info(
                    f"{self.name}: epoch {epoch}: unfroze {len(indices)} layer(s) of {path or 'the model'} ({names}), "
                    f"lr x{scale:.4g}; {count_parameters(pl_module)}"
                )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1 and any(f.frozen for f in self.freezers.values()):
            raise ValueError(
                f"{self.name} adds unfrozen layers to the optimizer, so it needs exactly one optimizer; "
                f"configure_optimizers returned {len(trainer.optimizers)}."
            )
        for optimizer in trainer.optimizers:
            self.unfreeze_due(pl_module, trainer.current_epoch, optimizer)

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for freezer in self.freezers.values():
            freezer.restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        SurgeryCallback.teardown(self, trainer, pl_module, stage)
        self._end_fit(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        SurgeryCallback.on_exception(self, trainer, pl_module, exception)
        self._end_fit(trainer, pl_module)

    def _end_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._groups = self._layout()
        self.finalize(trainer, pl_module)  # a no-op after on_train_end; after an exception, puts the model back
        self.freezers, self._schedulers, self._trainer = {}, [], None

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = SurgeryCallback.state_dict(self)
        state["frozen"] = {path: sorted(f.frozen) for path, f in self.freezers.items()}
        state["num_layers"] = {path: len(f.layers) for path, f in self.freezers.items()}
        groups = self._saved_groups if self._saved_groups is not None else self._layout()
        state["optimizer_groups"] = [groups.get(i, []) for i in range(max(groups, default=-1) + 1)]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved_frozen = state_dict.get("frozen")
        groups = state_dict.get("optimizer_groups")
        if groups is None:  # written while this subclassed Lightning's BaseFinetuning, which kept the groups here
            self._saved_groups = {int(i): g for i, g in (state_dict.get("internal_optimizer_metadata") or {}).items()}
        else:
            self._saved_groups = {i: g for i, g in enumerate(groups) if g}
        for path, n in state_dict.get("num_layers", {}).items():
            freezer = self.freezers.get(path)
            if freezer is not None and len(freezer.layers) != n:
                raise ValueError(
                    f"{self.name}: the checkpoint was written for {n} layers in {path or 'the model'}, this model "
                    f"has {len(freezer.layers)}; resume with the same model and the same `coarse` setting."
                )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in _RUNTIME:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.freezers, self._schedulers, self._trainer = {}, [], None


def _group_data(group: dict, names: dict[int, str]) -> dict:
    """A param group as plain data: its hyper-parameters, and its parameters by name (ones the module does not name,
    which it cannot put back either, are left out)."""
    return {
        **{k: v for k, v in group.items() if k != "params"},
        "params": [names[id(p)] for p in group["params"] if id(p) in names],
    }


def _group_of(data: dict, named: dict[str, nn.Parameter], owner: str) -> dict:
    """The param group ``data`` (from :func:`_group_data`) with the module's parameters."""
    missing = [n for n in data["params"] if n not in named]
    if missing:
        raise ValueError(
            f"{owner}: the checkpoint's optimizer param groups name parameters this module does not have "
            f"({', '.join(missing[:4])}{', …' if len(missing) > 4 else ''}); resume with the same model and callbacks."
        )
    return {**{k: v for k, v in data.items() if k != "params"}, "params": [named[n] for n in data["params"]]}


def saved_callback_state(path: str | os.PathLike, key: str) -> dict | None:
    """A callback's state in a Lightning checkpoint (a file, or a sharded checkpoint's ``meta.pt``), or ``None``.

    The file is read with ``weights_only=True``: plain data and tensors only, nothing in it is unpickled or run.

    Raises:
        pickle.UnpicklingError: the file holds other Python objects (torch's message names the first one; a class
            of your own can be allowed with ``torch.serialization.add_safe_globals``).

    Example::

        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "last.ckpt")
        >>> torch.save({"callbacks": {"FreezeBackbone": {"frozen": {"": [0]}}}}, path)
        >>> saved_callback_state(path, "FreezeBackbone"), saved_callback_state(path, "Other")
        ({'frozen': {'': [0]}}, None)
    """
    folder = Path(path)
    file = folder / _METADATA_FILENAME if folder.is_dir() else folder
    if not file.is_file():
        return None
    checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=not folder.is_dir())
    return (checkpoint.get("callbacks") or {}).get(key)


def _check_freeze(freeze: FreezeSpec) -> FreezeSpec:
    if isinstance(freeze, int) and not isinstance(freeze, bool):
        return check_int("freeze", freeze, minimum=1)
    if freeze == "backbone":
        return freeze
    if isinstance(freeze, (str, list, tuple)):
        return check_patterns("freeze", freeze)
    raise TypeError(
        f"`freeze` must be a number of layers (int >= 1), 'backbone' or a list of name patterns, got "
        f"{type(freeze).__name__} {freeze!r}."
    )


def _inserted_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in peft_modules(model).values() for p in m.parameters() if p.requires_grad]


class FreezeBackbone(_FreezingCallback):
    """Freeze the first ``freeze`` layers, the whole backbone, or the modules matching patterns, for all of training.

    Layers are counted as :func:`peft_callbacks.describe_layers` prints them: timm's ``group_matcher()`` blocks, each
    transformer layer of a Hugging Face model, the head last. BatchNorm layers in the frozen part keep their running
    statistics unless ``train_bn=True``. Logs trainable/total parameters at the start of fit.

    With ``LoRACallback`` (in any order) the LoRA factors inside frozen layers are frozen too: LoRA trains in the top
    layers only (pass ``exclude_modules`` to ``LoRACallback`` to not insert it there at all). Freezing every LoRA
    factor (e.g. ``freeze="backbone"``) is refused.

    Args:
        freeze: ``N`` (layers ``0 … N-1``), ``"backbone"`` (everything but the head) or name patterns (a list, or a
            string other than ``"backbone"``; same rules as ``target_modules``).
        train_bn: keep BatchNorm layers in the frozen part trainable (weights and running statistics).
        coarse: timm only: count stages instead of blocks.
        module: dotted path of the submodule to freeze; by default every timm/transformers model found.

    Example::

        >>> import lightning as L
        >>> from peft_callbacks.demo import ImageClassifier, quiet_trainer, random_loader  # any LightningModule, data
        >>> data = random_loader(4, shape=(3, 32, 32), classes=3, batch_size=4)
        >>> callback = FreezeBackbone(freeze=4)  # stem, layer1, layer2, layer3
        >>> trainer = quiet_trainer(max_steps=1, callbacks=[callback])
        >>> trainer.fit(ImageClassifier("test_resnet", num_classes=3), data)
        >>> callback.parameter_count.percent > 50  # layer4 and fc hold most of the weights
        True
    """

    def __init__(
        self,
        freeze: int | str | list[str] = "backbone",
        train_bn: bool = False,
        coarse: bool = False,
        module: str | None = None,
    ) -> None:
        super().__init__(train_bn=train_bn, module=module)
        self.freeze = _check_freeze(freeze)
        self.coarse = check_bool("coarse", coarse)

    def make_freezer(self, model: nn.Module) -> LayerFreezer:
        inserted = _inserted_parameters(model)
        freezer = freeze_layers(model, self.freeze, train_bn=self.train_bn, coarse=self.coarse)
        still = [p for p in inserted if p.requires_grad]
        if inserted and not still:
            freezer.restore()
            raise ValueError(
                f"{self.name}(freeze={self.freeze!r}) would freeze every LoRA/adapter parameter inserted into "
                f"{type(model).__name__}, so they would never train. Freeze fewer layers (e.g. freeze=N), or use "
                f"HeadThenFull to train the head first and the inserted parameters after."
            )
        if len(still) < len(inserted):
            log.info(
                "%s: %d of %d LoRA/adapter parameters lie in frozen layers and stay frozen.",
                self.name,
                len(inserted) - len(still),
                len(inserted),
            )
        return freezer


class HeadOnly(FreezeBackbone):
    """Linear probing: train the task head only (``FreezeBackbone(freeze="backbone")``).

    Args:
        train_bn: keep BatchNorm layers in the backbone trainable (weights and running statistics).
        module: dotted path of the submodule to freeze; by default every timm/transformers model found.

    Example::

        >>> HeadOnly().freeze
        'backbone'
    """

    def __init__(self, train_bn: bool = False, module: str | None = None) -> None:
        super().__init__(freeze="backbone", train_bn=train_bn, module=module)


def _check_something_trains(name: str, model: nn.Module, freezer: LayerFreezer) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        freezer.restore()
        raise ValueError(
            f"{name}: at the start only the last layer of {type(model).__name__} ({freezer.layers[-1].name}) trains, "
            f"and it has no trainable parameter (e.g. LoRACallback(train_head=False) froze it)."
        )


class LayerwiseUnfreezing(_FreezingCallback):
    """Gradual unfreezing (ULMFiT): train the head, then one more layer from the top every ``every_n_epochs``.

    Layer ``i`` of ``n`` (see :func:`peft_callbacks.describe_layers`) is unfrozen at the start of epoch
    ``(n - 1 - i) * every_n_epochs`` and joins the optimizer as a new param group with learning rate
    ``lr * lr_decay ** (n - 1 - i)``, where ``lr`` is the learning rate of the optimizer's first group (its current
    value; schedulers are told about the new groups). ``lr_decay=1`` gives every layer the same rate. Works with the
    optimizer and LR schedulers ``configure_optimizers`` returns (one optimizer). With ``LoRACallback``, unfreezing a
    layer trains its LoRA factors.

    Args:
        every_n_epochs: epochs between two unfreezing steps (>= 1).
        lr_decay: learning-rate factor per layer below the head, in ``(0, 1]`` (timm's layer decay; ULMFiT ≈ 0.38).
        train_bn: keep BatchNorm layers in frozen layers trainable (weights and running statistics).
        coarse: timm only: unfreeze a stage at a time instead of a block.
        module: dotted path of the submodule to freeze; by default every timm/transformers model found.

    Example::

        >>> callback = LayerwiseUnfreezing(every_n_epochs=2, lr_decay=0.5)
        >>> [callback.unfreeze_epoch(i, num_layers=4) for i in range(4)]  # the head (layer 3) trains from the start
        [6, 4, 2, 0]
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        lr_decay: float = 0.75,
        train_bn: bool = False,
        coarse: bool = False,
        module: str | None = None,
    ) -> None:
        super().__init__(train_bn=train_bn, module=module)
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=1)
        self.lr_decay = check_float("lr_decay", lr_decay, low=0.0, high=1.0, low_inclusive=False)
        self.coarse = check_bool("coarse", coarse)

    def unfreeze_epoch(self, index: int, num_layers: int) -> int:
        """The epoch at whose start layer ``index`` (of ``num_layers``) becomes trainable."""
        return (num_layers - 1 - index) * self.every_n_epochs

    def make_freezer(self, model: nn.Module) -> LayerFreezer:
        freezer = LayerFreezer(model, train_bn=self.train_bn, coarse=self.coarse)
        n = len(freezer.layers)
        if n < 2:
            raise ValueError(f"{self.name}: {type(model).__name__} has a single layer; there is nothing to unfreeze.")
        freezer.freeze(range(n - 1))
        _check_something_trains(self.name, model, freezer)
        return freezer

    def due(self, freezer: LayerFreezer, epoch: int) -> list[tuple[list[int], float]]:
        n = len(freezer.layers)
        return [
            ([i], self.lr_decay ** (n - 1 - i))
            for i in sorted(freezer.frozen, reverse=True)
            if self.unfreeze_epoch(i, n) <= epoch
        ]


class HeadThenFull(_FreezingCallback):
    """Head first, then everything (incremental fine-tuning, LP-FT): linear probing for ``head_epochs``, then full.

    At the start of epoch ``head_epochs`` every other layer is unfrozen and joins the optimizer as one new param group
    with learning rate ``lr_multiplier`` times the first group's. With ``LoRACallback`` the second phase trains the
    LoRA factors (plus the head), not the base weights.

    Args:
        head_epochs: epochs of head-only training (>= 1).
        lr_multiplier: learning-rate factor of the newly trainable part (> 0).
        train_bn: keep BatchNorm layers in the backbone trainable (weights and running statistics) in both phases.
        module: dotted path of the submodule to freeze; by default every timm/transformers model found.

    Example::

        >>> HeadThenFull(head_epochs=2, lr_multiplier=0.1).head_epochs
        2
    """

    def __init__(
        self,
        head_epochs: int = 1,
        lr_multiplier: float = 0.1,
        train_bn: bool = False,
        module: str | None = None,
    ) -> None:
        super().__init__(train_bn=train_bn, module=module)
        self.head_epochs = check_int("head_epochs", head_epochs, minimum=1)
        self.lr_multiplier = check_float("lr_multiplier", lr_multiplier, low=0.0, low_inclusive=False)

    def make_freezer(self, model: nn.Module) -> LayerFreezer:
        layers = split_layers(model)
        backbone = resolve_freeze(model, layers, "backbone")
        freezer = LayerFreezer(model, layers, train_bn=self.train_bn)
        freezer.freeze(layer.index for layer in backbone)
        _check_something_trains(self.name, model, freezer)
        return freezer

    def due(self, freezer: LayerFreezer, epoch: int) -> list[tuple[list[int], float]]:
        if epoch >= self.head_epochs and freezer.frozen:
            return [(sorted(freezer.frozen), self.lr_multiplier)]
        return []
