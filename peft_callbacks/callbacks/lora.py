"""``LoRACallback``: LoRA fine-tuning of an unchanged LightningModule, merged into a plain model at the end."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from peft_callbacks._validation import check_bool, check_positive_float
from peft_callbacks.callbacks.options import CallbackOptions, typed_callback
from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.core import quantized
from peft_callbacks.core.models import find_models
from peft_callbacks.methods.lora.eva import EVAOptions, eva_init, eva_stored_config
from peft_callbacks.methods.lora.loftq import LoftQOptions, apply_loftq, loftq_quantize
from peft_callbacks.methods.lora.method import LoRAConfig
from peft_callbacks.methods.lora.plus import MARKER, lora_B_parameters, split_loraplus_groups
from peft_callbacks.methods.lora.pro import LoRAProAdamW, apply_lora_pro
from peft_callbacks.plumbing.hooks import run_after_hook
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


@typed_callback(LoRAConfig, LoRATrainingOptions, EVAOptions, LoftQOptions)
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
    targets)`` tuples or tensors.

    Its arguments are the fields of :class:`~peft_callbacks.LoRAConfig`, of :class:`LoRATrainingOptions`, of
    :class:`~peft_callbacks.methods.lora.eva.EVAOptions` and of
    :class:`~peft_callbacks.callbacks.options.CallbackOptions`, as keywords.

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
        options: CallbackOptions,
    ) -> None:
        self._configure(config, options)
        training.check_for(self.config)
        self.loraplus_lr_ratio = training.loraplus_lr_ratio
        self.lora_pro = training.lora_pro
        self.eva = eva
        self.loftq = loftq
        self._fit_trainer: pl.Trainer | None = None

    # -- init="eva" reads the training data -----------------------------------------------------------------------
    def applied_config(self) -> LoRAConfig:
        return eva_stored_config(self.config, self.eva) if self.config.init == "eva" else self.config

    def apply(self, model: torch.nn.Module, path: str) -> None:
        if self.config.init == "loftq":  # quantizes the targets (or reads loftq_weights), then LoRA
            rank_zero_info(
                f"{self.name}: {apply_loftq(model, self.config, self.loftq, adapter_name=self.adapter_name)}"
            )
            return
        if self.config.init != "eva":
            super().apply(model, path)
            return
        if self._fit_trainer is None:
            raise ValueError(
                f"{self.name}(init='eva') takes LoRA's A from the training data, read when `trainer.fit` starts; "
                f"outside fit there is none. Fit first, or load the saved adapter (load_adapter) to evaluate."
            )
        eva_init(
            model, training_batches(self._fit_trainer, self.name), self.config, self.eva, adapter_name=self.adapter_name
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
        self._fit_trainer = trainer if stage == "fit" else None
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
        state["config"].update(dataclasses.asdict(self.eva))
        state["config"].update(dataclasses.asdict(self.loftq))
        return state


def training_batches(trainer: pl.Trainer, name: str) -> Iterable:
    """The fit's training dataloader (the datamodule's, the module's ``train_dataloader`` or the one passed to
    ``fit``), as Lightning will build it, for a look at its first batches before training.

    Raises:
        ValueError: the fit has no training dataloader, or several (a mapping or list of them).
    """
    source = trainer.fit_loop._data_source  # Lightning's record of where `train_dataloader` comes from (read only)
    if not source.is_defined():
        raise ValueError(f"{name}(init='eva') reads the training data, but this fit has no `train_dataloader`.")
    loader = source.dataloader()
    if isinstance(loader, (Mapping, list, tuple)):
        raise ValueError(
            f"{name}(init='eva') reads one training dataloader; this fit has {type(loader).__name__} of them. Call "
            f"`eva_init(model, dataloader, config)` (peft_callbacks.methods.lora.eva) on the model before fitting."
        )
    return loader
