"""``LoRACallback``: LoRA fine-tuning of an unchanged LightningModule, merged into a plain model at the end."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from peft_callbacks._validation import check_bool, check_positive_float
from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.methods.lora.method import LoRAConfig
from peft_callbacks.methods.lora.plus import MARKER, lora_B_parameters, split_loraplus_groups
from peft_callbacks.methods.lora.pro import LoRAProAdamW, apply_lora_pro
from peft_callbacks.plumbing.strategies import is_sharding, strategy_kind

log = logging.getLogger(__name__)


def _check_variants(use_dora: bool, loraplus_lr_ratio: float | None, lora_pro: bool, target_parameters: Any) -> None:
    """Reject combinations of LoRA variants that contradict each other."""
    if lora_pro and target_parameters:
        raise ValueError(
            f"`lora_pro=True` cannot be combined with `target_parameters={target_parameters!r}`: LoRA-Pro's gradients "
            f"are derived for one B·A per layer, not for per-expert factors. Choose one of them."
        )
    if lora_pro and use_dora:
        raise ValueError(
            "`lora_pro=True` cannot be combined with `use_dora=True`: LoRA-Pro's gradients are derived for "
            "W0 + s*B*A, not for DoRA's rescaled weight. Choose one of them."
        )
    if lora_pro and loraplus_lr_ratio is not None:
        raise ValueError(
            f"`lora_pro=True` cannot be combined with `loraplus_lr_ratio={loraplus_lr_ratio!r}`: LoRA-Pro already "
            f"sets how A and B move, and a different learning rate for B would undo its equivalent gradient. "
            f"Use `loraplus_lr_ratio=None` with LoRA-Pro."
        )


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

    Args:
        rank: LoRA rank ``r`` (> 0).
        alpha: ``lora_alpha`` (> 0); ``scaling = alpha / rank``.
        dropout: dropout on the LoRA branch input, in ``[0, 1)``.
        target_modules: ``None`` (every Linear/Conv/``Conv1D`` outside the head, so CNNs work too),
            ``"all-linear"``, a name, a regex or a list (see :mod:`peft_callbacks.core.targets`).
        exclude_modules: patterns of modules to leave alone.
        train_head: keep the task head fully trainable (a new task usually has a new head).
        train_bn: let BatchNorm layers train (affine weights and running statistics). By default they stay frozen,
            running statistics included, so the base model really is unchanged.
        module: dotted path of the submodule to adapt (``"model"``); by default every timm/transformers model found.
        merge_on_train_end: fold LoRA into the base weights when training ends.
        use_rslora: scale by ``alpha / sqrt(rank)`` (rsLoRA).
        use_dora: DoRA layers (a trainable magnitude per output unit, :mod:`peft_callbacks.methods.lora.dora`).
        init: how the factors start, as HF PEFT's ``init_lora_weights``: ``"default"``, ``"gaussian"``, or from the
            base weight, which then acts as the residual: ``"pissa"``, ``"pissa_niter_<K>"``, ``"olora"``
            (:mod:`peft_callbacks.methods.lora.init`).
        target_parameters: parameters to adapt directly, e.g. ``["experts.gate_up_proj", "experts.down_proj"]`` for
            the fused expert weights of mixture-of-experts blocks (one ``A``, ``B`` per expert,
            :mod:`peft_callbacks.methods.lora.params`); with ``target_modules=None`` only these are adapted.
        loraplus_lr_ratio: LoRA+: ``lora_B`` trains at this many times the learning rate of its param group
            (the paper suggests 16); the configured optimizer's groups and schedulers are split at ``on_fit_start``.
            ``None`` keeps one learning rate.
        lora_pro: LoRA-Pro: before each optimizer step, replace the gradients of ``A`` and ``B`` by those whose
            low-rank update best approximates the full fine-tuning gradient (:mod:`peft_callbacks.methods.lora.pro`).
            Exact for SGD; for Adam-type training return ``LoRAProAdamW(self, lr)`` from ``configure_optimizers``
            instead (the paper's full-Adam variant) and leave this ``False``.
        save_adapter_to: directory for the adapter file (LoRA factors + head + recipe), written before the merge.
        save_merged_to: directory for the merged model's weights, written after the merge.
        adapter_name: the name of the adapter (several can share a model).
        adapter_dtype: dtype of the LoRA factors (``"float32"``, ``"bfloat16"``, ``"float16"``); ``None``: the base
            weight's dtype, float32 on quantized layers.
        merged_dtype: merge into a plain model of this dtype (``"bfloat16"``, …; quantized layers dequantized);
            ``None`` keeps each weight's dtype, and LoRA unmerged on a quantized base.

    Example::

        >>> import lightning as L, torch
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
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        train_head: bool = True,
        train_bn: bool = False,
        module: str | None = None,
        merge_on_train_end: bool = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "default",
        target_parameters: str | list[str] | None = None,
        loraplus_lr_ratio: float | None = None,
        lora_pro: bool = False,
        save_adapter_to: str | None = None,
        save_merged_to: str | None = None,
        adapter_name: str = "default",
        adapter_dtype: str | None = None,
        merged_dtype: str | None = None,
    ) -> None:
        config = LoRAConfig.from_arguments(locals())
        super().__init__(
            config, adapter_name, module, merge_on_train_end, save_adapter_to, save_merged_to, merged_dtype
        )
        if loraplus_lr_ratio is not None:
            loraplus_lr_ratio = check_positive_float("loraplus_lr_ratio", loraplus_lr_ratio)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.lora_pro = check_bool("lora_pro", lora_pro)
        _check_variants(use_dora, loraplus_lr_ratio, lora_pro, target_parameters)

    # -- LoRA+ and LoRA-Pro act on the optimizers -----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
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
        return state
