"""``LoRACallback``: LoRA fine-tuning of an unchanged LightningModule, merged into a plain model at the end."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from peft_callbacks._validation import (
    check_bool,
    check_float,
    check_patterns,
    check_positive_float,
    check_positive_int,
)
from peft_callbacks.callbacks.base import SurgeryCallback, run_after_hook
from peft_callbacks.core.heads import find_head
from peft_callbacks.core.models import find_models
from peft_callbacks.core.params import freeze_batchnorm_stats, unfreeze, unfreeze_batchnorm_stats
from peft_callbacks.core.targets import in_subtree
from peft_callbacks.lora.inject import inject_lora, lora_layers, merge_lora
from peft_callbacks.lora.lora_plus import MARKER, lora_B_parameters, split_loraplus_groups
from peft_callbacks.lora.lora_pro import LoRAProAdamW, apply_lora_pro

log = logging.getLogger(__name__)

_LORA_A_SUFFIX = ".lora_A.weight"
_DORA_SUFFIX = ".lora_magnitude_vector"


def _check_variants(use_dora: bool, loraplus_lr_ratio: float | None, lora_pro: bool) -> None:
    """Reject combinations of LoRA variants that contradict each other."""
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


class LoRACallback(SurgeryCallback):
    """Fine-tune with LoRA: inject at ``setup``, train only LoRA factors (+ the task head), merge at the end.

    The timm / transformers models inside the LightningModule are found by themselves; the module's code stays as
    it is. Surgery runs after the module's ``setup``/``configure_model`` (so networks built there are adapted too)
    and before a checkpoint is restored and optimizers are built, so ``trainer.fit(ckpt_path=...)`` resumes the LoRA
    weights. At ``on_train_end`` LoRA is folded into the base weights in float32: the module is a plain model again,
    with its original keys and layer types.

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
        use_dora: DoRA layers (a trainable magnitude per output unit, :mod:`peft_callbacks.lora.dora`).
        loraplus_lr_ratio: LoRA+: ``lora_B`` trains at this many times the learning rate of its param group
            (the paper suggests 16); the configured optimizer's groups and schedulers are split at ``on_fit_start``.
            ``None`` keeps one learning rate.
        lora_pro: LoRA-Pro: before each optimizer step, replace the gradients of ``A`` and ``B`` by those whose
            low-rank update best approximates the full fine-tuning gradient (:mod:`peft_callbacks.lora.lora_pro`).
            Exact for SGD; for Adam-type training return ``LoRAProAdamW(self, lr)`` from ``configure_optimizers``
            instead (the paper's full-Adam variant) and leave this ``False``.
        save_adapter_to: directory for the adapter file (LoRA factors + head + recipe), written before the merge.
        save_merged_to: directory for the merged model's weights, written after the merge.

    Example::

        >>> import lightning as L, timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Classifier(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return torch.nn.functional.cross_entropy(self.model(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.AdamW(self.parameters(), lr=1e-3)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
        >>> lora = LoRACallback(rank=4)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[lora], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(), data)
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
        loraplus_lr_ratio: float | None = None,
        lora_pro: bool = False,
        save_adapter_to: str | None = None,
        save_merged_to: str | None = None,
    ) -> None:
        super().__init__(module=module, save_adapter_to=save_adapter_to, save_merged_to=save_merged_to)
        self.rank = check_positive_int("rank", rank)
        self.alpha = check_positive_float("alpha", alpha)
        self.dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        if target_modules != "all-linear":
            check_patterns("target_modules", target_modules)
        self.target_modules = target_modules
        self.exclude_modules = check_patterns("exclude_modules", exclude_modules)
        self.train_head = check_bool("train_head", train_head)
        self.train_bn = check_bool("train_bn", train_bn)
        self.merge_on_train_end = check_bool("merge_on_train_end", merge_on_train_end)
        self.use_rslora = check_bool("use_rslora", use_rslora)
        self.use_dora = check_bool("use_dora", use_dora)
        if loraplus_lr_ratio is not None:
            loraplus_lr_ratio = check_positive_float("loraplus_lr_ratio", loraplus_lr_ratio)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.lora_pro = check_bool("lora_pro", lora_pro)
        _check_variants(use_dora, loraplus_lr_ratio, lora_pro)
        self._frozen_bn: list[nn.Module] = []
        self._reinjected = False

    def apply(self, model: nn.Module, path: str) -> None:
        inject_lora(
            model,
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.target_modules,
            exclude_modules=self.exclude_modules,
            train_head=self.train_head,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
        )
        self._handle_batchnorm(model)

    # -- LoRA+ and LoRA-Pro act on the optimizers -----------------------------------------------------------------
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
                    f"Adam-type training the paper's variant is LoRAProAdamW (peft_callbacks.lora.lora_pro)."
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
        if self.lora_pro:
            apply_lora_pro(pl_module, params=[p for g in optimizer.param_groups for p in g["params"]])

    def _handle_batchnorm(self, model: nn.Module) -> None:
        head = find_head(model).head if self.train_head else []
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not in_subtree(name, head):
                if self.train_bn:
                    unfreeze(m)
                else:
                    self._frozen_bn.extend(freeze_batchnorm_stats(m))

    def is_applied(self, model: nn.Module) -> bool:
        return bool(lora_layers(model))

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.merge_on_train_end:
            merge_lora(pl_module)
        for m in self._frozen_bn:
            unfreeze_batchnorm_stats(m)
        self._frozen_bn = []

    # -- validate / test / predict from a checkpoint saved during LoRA training ------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            run_after_hook(pl_module, "on_load_checkpoint", lambda checkpoint: self._reinject(pl_module, checkpoint))

    def _reinject(self, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """A checkpoint written mid-training holds LoRA factors, a merged model has none: re-create them so that
        ``trainer.test(ckpt_path="best")`` loads, and merge again at ``teardown``."""
        state = checkpoint.get("state_dict", {})
        paths = [k[: -len(_LORA_A_SUFFIX)] for k in state if k.endswith(_LORA_A_SUFFIX)]
        if not paths or lora_layers(pl_module):
            return
        use_dora = self.use_dora or any(k.endswith(_DORA_SUFFIX) for k in state)  # the checkpoint says DoRA
        for model_path, model in find_models(pl_module, self.module):
            prefix = f"{model_path}." if model_path else ""
            inside = [p[len(prefix) :] for p in paths if p.startswith(prefix)]
            if inside:
                rank = state[f"{prefix}{inside[0]}{_LORA_A_SUFFIX}"].shape[0]
                inject_lora(
                    model,
                    rank,
                    self.alpha,
                    target_modules=inside,
                    train_head=False,
                    use_rslora=self.use_rslora,
                    use_dora=use_dora,
                )
        self._reinjected = True
        log.info("LoRACallback: re-created LoRA on %d layer(s) to load the checkpoint.", len(paths))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._reinjected and self.merge_on_train_end:
            merge_lora(pl_module)
        self._reinjected = False

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["config"] = {
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "loraplus_lr_ratio": self.loraplus_lr_ratio,
            "lora_pro": self.lora_pro,
        }
        return state
