"""``LoRACallback``: LoRA fine-tuning of an unchanged LightningModule, merged into a plain model at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from peft_callbacks._validation import check_bool, check_positive_float
from peft_callbacks.callbacks.options import CallbackOptions, typed_callback
from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.core import quantized
from peft_callbacks.core.models import find_models
from peft_callbacks.methods.lora.corda import CorDAOptions, corda_init
from peft_callbacks.methods.lora.eva import EVAOptions, eva_init, eva_stored_config
from peft_callbacks.methods.lora.loftq import LoftQOptions, apply_loftq, loftq_quantize
from peft_callbacks.methods.lora.loraga import LoRAGAOptions, lora_ga_init
from peft_callbacks.methods.lora.method import LoRAConfig
from peft_callbacks.methods.lora.plus import MARKER, lora_B_parameters, split_loraplus_groups
from peft_callbacks.methods.lora.pro import LoRAProAdamW, apply_lora_pro
from peft_callbacks.plumbing.hooks import run_after_hook
from peft_callbacks.plumbing.seam import temporarily
from peft_callbacks.plumbing.strategies import is_sharding, strategy_kind

log = logging.getLogger(__name__)

__all__ = ["LoRACallback", "LoRATrainingOptions"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRATrainingOptions:
    """How :class:`LoRACallback` trains the factors beyond plain LoRA: LoRA+ and LoRA-Pro act on the optimizers.

    Attributes:
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): ``lora_B`` trains at this many times the learning rate of its
            param group (the paper suggests 16); the configured optimizer's groups and schedulers are split at
            ``on_fit_start``. ``None`` keeps one learning rate.
        lora_pro: LoRA-Pro (Wang et al. 2024): before each optimizer step, replace the gradients of ``A`` and ``B`` by
            those whose low-rank update best approximates the full fine-tuning gradient
            (:mod:`peft_callbacks.methods.lora.pro`). Exact for SGD; for Adam-type training return
            ``LoRAProAdamW(self, lr)`` from ``configure_optimizers`` instead (the paper's full-Adam variant) and leave
            this ``False``.

    Example::

        >>> LoRATrainingOptions(loraplus_lr_ratio=16).loraplus_lr_ratio
        16.0
        >>> LoRATrainingOptions(loraplus_lr_ratio=16, lora_pro=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `lora_pro=True` cannot be combined with `loraplus_lr_ratio=16.0`: ...
    """

    loraplus_lr_ratio: float | None = None
    lora_pro: bool = False

    def __post_init__(self) -> None:
        if self.loraplus_lr_ratio is not None:
            object.__setattr__(
                self, "loraplus_lr_ratio", check_positive_float("loraplus_lr_ratio", self.loraplus_lr_ratio)
            )
        check_bool("lora_pro", self.lora_pro)
        if self.lora_pro and self.loraplus_lr_ratio is not None:
            raise ValueError(
                f"`lora_pro=True` cannot be combined with `loraplus_lr_ratio={self.loraplus_lr_ratio!r}`: LoRA-Pro "
                f"already sets how A and B move, and a different learning rate for B would undo its equivalent "
                f"gradient. Use `loraplus_lr_ratio=None` with LoRA-Pro."
            )

    def check_for(self, config: LoRAConfig) -> None:
        """Refuse LoRA variants that contradict these options."""
        if self.lora_pro and config.target_parameters:
            raise ValueError(
                f"`lora_pro=True` cannot be combined with `target_parameters={config.target_parameters!r}`: LoRA-Pro's "
                f"gradients are derived for one B·A per layer, not for per-expert factors. Choose one of them."
            )
        if self.lora_pro and config.use_dora:
            raise ValueError(
                "`lora_pro=True` cannot be combined with `use_dora=True`: LoRA-Pro's gradients are derived for "
                "W0 + s*B*A, not for DoRA's rescaled weight. Choose one of them."
            )


DATA_INITS = ("eva", "corda", "lora_ga")  # the inits LoRACallback starts from the fit's data at setup


@typed_callback(LoRAConfig, LoRATrainingOptions, EVAOptions, LoftQOptions, CorDAOptions, LoRAGAOptions)
class LoRACallback(PEFTCallback):
    """Fine-tune with LoRA: inject at ``setup``, train only LoRA factors (+ the task head), merge at the end.

    The timm / transformers models inside the LightningModule are found by themselves; the module's code stays as
    it is. Surgery runs after the module's ``setup``/``configure_model`` (so networks built there are adapted too)
    and before a checkpoint is restored and optimizers are built, so ``trainer.fit(ckpt_path=...)`` resumes the LoRA
    weights. At ``on_train_end`` LoRA is folded into the base weights in float32: the module is a plain model again,
    with its original keys and layer types.

    On a quantized base (a transformers model loaded with ``BitsAndBytesConfig``, or Lightning's
    ``BitsandbytesPrecision``) this is QLoRA: the 4-/8-bit layers stay frozen and bit-identical, the factors train in
    float32, and at the end LoRA stays unmerged and is saved, unless ``merged_dtype`` asks for a merged plain model
    (see :class:`~peft_callbacks.callbacks.peft.PEFTCallback` and the docs page "Quantized bases").

    With ``init="eva"`` the factors ``A`` start from the principal components of each layer's inputs on the first
    ``eva_batches`` batches of the training dataloader, read at ``setup`` through the frozen base model
    (:mod:`peft_callbacks.methods.lora.eva`); batches are mappings of model inputs (transformers), ``(inputs,
    targets)`` tuples or tensors. With ``init="corda"`` the factors come from the SVD of each weight times its inputs'
    covariance on the first ``corda_batches`` batches (of ``corda_dataloader`` if given: for ``corda_method="kpm"``,
    data of the knowledge to keep; else of the training data), and with ``init="lora_ga"`` from the SVD of the
    gradient of the module's own ``training_step`` loss on the first ``lora_ga_batches`` training batches (no
    optimizer step; ``self.log`` calls are dropped meanwhile); both at ``setup``, the base staying as it is
    (:mod:`~peft_callbacks.methods.lora.corda`, :mod:`~peft_callbacks.methods.lora.loraga`). With ``init="loftq"``
    the targeted linear layers of a full-precision model are quantized at ``setup`` (``loftq_bits``) and ``B·A``
    starts as the rank-``r`` part of their quantization error; on a model loaded quantized, ``loftq_weights`` names
    its full-precision weights (:mod:`~peft_callbacks.methods.lora.loftq`).

    Its arguments are the fields of :class:`~peft_callbacks.LoRAConfig`, of :class:`LoRATrainingOptions`, of
    :class:`~peft_callbacks.methods.lora.eva.EVAOptions`, :class:`~peft_callbacks.methods.lora.loftq.LoftQOptions`,
    :class:`~peft_callbacks.methods.lora.corda.CorDAOptions`, :class:`~peft_callbacks.methods.lora.loraga.LoRAGAOptions`
    and of :class:`~peft_callbacks.callbacks.options.CallbackOptions`, as keywords.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from peft_callbacks.demo import ImageClassifier, quiet_trainer  # a LightningModule wrapping a timm model
        >>> data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
        >>> lora = LoRACallback(rank=4)
        >>> trainer = quiet_trainer(max_steps=2, callbacks=[lora])
        >>> trainer.fit(ImageClassifier("test_resnet", num_classes=3), data)
        >>> lora.parameter_count.percent < 25
        True
    """

    def __init__(
        self,
        config: LoRAConfig,
        training: LoRATrainingOptions,
        eva: EVAOptions,
        loftq: LoftQOptions,
        corda: CorDAOptions,
        lora_ga: LoRAGAOptions,
        options: CallbackOptions,
    ) -> None:
        self._configure(config, options)
        training.check_for(self.config)
        self.loraplus_lr_ratio = training.loraplus_lr_ratio
        self.lora_pro = training.lora_pro
        self.eva, self.loftq, self.corda, self.lora_ga = eva, loftq, corda, lora_ga
        if self.config.init == "corda" and corda.corda_method == "kpm" and corda.corda_dataloader is None:
            rank_zero_warn(
                f"{self.name}(init='corda', corda_method='kpm') keeps in the frozen base what the data it reads uses "
                f"most; without `corda_dataloader` that is the training data of the new task. Pass data of the "
                f"knowledge to keep (the base task) as `corda_dataloader`, or use corda_method='ipm'."
            )
        self._fit_trainer: pl.Trainer | None = None
        self._fit_module: pl.LightningModule | None = None

    # -- init="eva" / "corda" / "lora_ga" read the training data ------------------------------------------------------
    def applied_config(self) -> LoRAConfig:
        return eva_stored_config(self.config, self.eva) if self.config.init == "eva" else self.config

    def apply(self, model: torch.nn.Module, path: str) -> None:
        init = self.config.init
        if init == "loftq":  # quantizes the targets (or reads loftq_weights), then LoRA
            rank_zero_info(
                f"{self.name}: {apply_loftq(model, self.config, self.loftq, adapter_name=self.adapter_name)}"
            )
            return
        if init not in DATA_INITS:
            super().apply(model, path)
            return
        trainer, module = self._fit_trainer, self._fit_module
        if trainer is None or module is None:
            raise ValueError(
                f"{self.name}(init={init!r}) starts LoRA's factors from the training data, read when `trainer.fit` "
                f"starts; outside fit there is none. Fit first, or load the saved adapter (load_adapter) to evaluate."
            )
        name = self.adapter_name
        if init == "eva":
            eva_init(model, training_batches(trainer, self.name, init), self.config, self.eva, adapter_name=name)
        elif init == "corda":
            data = self.corda.corda_dataloader
            data = training_batches(trainer, self.name, init) if data is None else data
            corda_init(model, data, self.config, self.corda, adapter_name=name)
        else:
            if not module.automatic_optimization:
                raise ValueError(
                    f"{self.name}(init='lora_ga') takes the gradient of the loss `training_step` returns; with manual "
                    f"optimisation ({type(module).__name__}.automatic_optimization=False) it steps the optimizers "
                    f"itself instead. Call `lora_ga_init(model, loss_fn, config, batches=...)` "
                    f"(peft_callbacks.methods.lora.loraga) in `configure_model`, and use init='default' here."
                )
            with _logging_dropped(module):
                lora_ga_init(
                    model,
                    _training_step_loss(module),
                    self.config,
                    self.lora_ga,
                    batches=training_batches(trainer, self.name, init),
                    adapter_name=name,
                    module=module,
                )

    def _loftq_base(self, pl_module: pl.LightningModule) -> None:
        """A checkpoint of a LoftQ fit (``validate``/``test(ckpt_path=...)`` on a fresh module) holds a LoRA trained
        on LoftQ's quantized base: quantize the full-precision module as the fit did (the same ``Q``), then the
        adapter is re-created and loaded onto it."""
        if self.loftq.loftq_weights is not None or quantized.holds_quantized(pl_module):
            return  # loaded quantized (its own base), or quantized already
        for _, model in find_models(pl_module, self.module):
            loftq_quantize(model, self.config, self.loftq, adapter_name=self.adapter_name, adapter=False)

    # -- LoRA+ and LoRA-Pro act on the optimizers -----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fit_trainer, self._fit_module = (trainer, pl_module) if stage == "fit" else (None, None)
        if stage != "fit" and self.config.init == "loftq":  # before the checkpoint's adapter is re-created
            run_after_hook(pl_module, "on_load_checkpoint", lambda ckpt: self._loftq_base(pl_module), owner=self)
        kind = strategy_kind(trainer)
        if self.lora_pro and is_sharding(trainer):
            raise ValueError(
                f"LoRACallback(lora_pro=True) reads the whole of A, B and their gradients at every step, which "
                f"{type(trainer.strategy).__name__} keeps sharded across processes. Use lora_pro=False (or "
                f"loraplus_lr_ratio) when sharding, or train with DDP."
            )
        if self.loraplus_lr_ratio is not None and kind == "deepspeed":
            raise ValueError(
                f"LoRACallback(loraplus_lr_ratio={self.loraplus_lr_ratio:g}) splits the optimizer's param groups when "
                f"training starts, but DeepSpeed has flattened them by then. Return "
                f"`loraplus_param_groups(self, lr, ratio={self.loraplus_lr_ratio:g})` (peft_callbacks) from "
                f"`configure_optimizers` instead and leave loraplus_lr_ratio=None."
            )
        super().setup(trainer, pl_module, stage)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._fit_trainer, self._fit_module = None, None  # the data inits read them at setup only

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.lora_pro or self.loraplus_lr_ratio is not None:
            self._check_optimizers(trainer.optimizers)
        if self.loraplus_lr_ratio is not None:
            self._split_loraplus(trainer, pl_module)

    def _check_optimizers(self, optimizers: list[torch.optim.Optimizer]) -> None:
        option = "lora_pro=True" if self.lora_pro else f"loraplus_lr_ratio={self.loraplus_lr_ratio:g}"
        for optimizer in optimizers:
            if isinstance(optimizer, LoRAProAdamW):
                raise ValueError(
                    f"LoRACallback({option}) cannot be used with LoRAProAdamW, which already computes LoRA-Pro's "
                    f"updates itself (and steps A and B with one learning rate). Keep the callback's defaults "
                    f"(lora_pro=False, loraplus_lr_ratio=None) with LoRAProAdamW."
                )
            if self.lora_pro and not isinstance(optimizer, torch.optim.SGD):
                rank_zero_warn(
                    f"LoRACallback(lora_pro=True) replaces gradients, which makes the step match the full gradient's "
                    f"projection exactly with SGD; {type(optimizer).__name__} rescales them per coordinate. For "
                    f"Adam-type training the paper's variant is LoRAProAdamW (peft_callbacks.methods.lora.pro)."
                )

    def _split_loraplus(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        b_params = lora_B_parameters(pl_module)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        moved = sum(
            split_loraplus_groups(optimizer, b_params, self.loraplus_lr_ratio, schedulers)
            for optimizer in trainer.optimizers
        )
        already = any(MARKER in g for optimizer in trainer.optimizers for g in optimizer.param_groups)
        if not moved and not already:
            rank_zero_warn(
                f"LoRACallback(loraplus_lr_ratio={self.loraplus_lr_ratio:g}): no optimizer holds the lora_B weights, "
                f"so LoRA+ changes nothing. Pass the LoRA parameters to the optimizer in `configure_optimizers`."
            )
        else:
            rank_zero_info(f"LoRA+: {moved} lora_B weight(s) at {self.loraplus_lr_ratio:g}x their group's lr.")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self.lora_pro:
            apply_lora_pro(pl_module, params=[p for g in optimizer.param_groups for p in g["params"]])

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["config"].update(loraplus_lr_ratio=self.loraplus_lr_ratio, lora_pro=self.lora_pro)
        state["config"].update(
            dataclasses.asdict(self.eva),
            **dataclasses.asdict(self.loftq),
            **self.corda.recorded(),
            **dataclasses.asdict(self.lora_ga),
        )
        return state


def _training_step_loss(module: pl.LightningModule) -> Any:
    """``loss(model, batch)``: what ``module.training_step(batch, i)`` returns for the ``i``-th batch read."""
    index = itertools.count()
    return lambda model, batch: module.training_step(batch, next(index))


@contextlib.contextmanager
def _logging_dropped(module: pl.LightningModule) -> Any:
    """``self.log`` / ``self.log_dict`` as no-ops: a ``training_step`` run at ``setup``, outside Lightning's loop."""
    with temporarily(module, "log", lambda *args, **kwargs: None):
        with temporarily(module, "log_dict", lambda *args, **kwargs: None):
            yield


def training_batches(trainer: pl.Trainer, name: str, init: str = "eva") -> Iterable:
    """The fit's training dataloader (the datamodule's, the module's ``train_dataloader`` or the one passed to
    ``fit``), as Lightning will build it, for a look at its first batches before training.

    Raises:
        ValueError: the fit has no training dataloader, or several (a mapping or list of them).
    """
    source = trainer.fit_loop._data_source  # Lightning's record of where `train_dataloader` comes from (read only)
    if not source.is_defined():
        raise ValueError(f"{name}(init={init!r}) reads the training data, but this fit has no `train_dataloader`.")
    loader = source.dataloader()
    if isinstance(loader, (Mapping, list, tuple)):
        entry = {"eva": "eva_init", "corda": "corda_init", "lora_ga": "lora_ga_init"}[init]
        raise ValueError(
            f"{name}(init={init!r}) reads one training dataloader; this fit has {type(loader).__name__} of them. Call "
            f"`{entry}(model, ...)` (peft_callbacks.methods.lora) on the model before fitting."
        )
    return loader
