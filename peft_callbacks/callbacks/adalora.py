"""``AdaLoRACallback``: AdaLoRA for an unchanged LightningModule, its rank schedule driven by the callback's hooks.

HF PEFT asks the training loop to call ``update_and_allocate(step)`` after each optimizer step and adds the
orthogonality regulariser to the loss inside the model's forward. Here neither touches the user's code:

==========================  ========================================================================================
hook                        what the callback does
==========================  ========================================================================================
``on_after_backward``       adds ``orth_reg_weight · ∇R`` to the AdaLoRA gradients (``R`` the regulariser), scaled
                            like the loss (÷ ``accumulate_grad_batches``, × the AMP loss scale): the gradient of
                            ``loss + orth_reg_weight · R``, as PEFT's forward produces it
``on_before_optimizer_step``  notes that an optimizer step is being taken (not on accumulation-only batches)
``on_train_batch_end``      after that step, with the gradients still in ``.grad`` (Lightning zeroes them at the
                            next batch): the allocator updates the importance scores and masks ranks
                            (:class:`~peft_callbacks.methods.adalora.RankAllocator`), step index
                            ``global_step − 1`` as in PEFT's loop; logs ``adalora/budget`` and ``adalora/orth_reg``
``state_dict``              the allocator's statistics, pattern and schedule, so ``fit(ckpt_path=...)`` resumes it
==========================  ========================================================================================

``total_step=None`` takes the Trainer's ``estimated_stepping_batches`` when the surgery runs.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

from peft_callbacks.callbacks.options import CallbackOptions, typed_callback
from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.methods.adalora import AdaLoRAConfig, RankAllocator, adalora_adapters, orthogonal_regularization
from peft_callbacks.methods.adalora.method import check_schedule

__all__ = ["AdaLoRACallback"]


@typed_callback(AdaLoRAConfig)
class AdaLoRACallback(PEFTCallback):
    """Fine-tune with AdaLoRA: SVD-form low-rank updates whose ranks move between layers during training
    (:mod:`peft_callbacks.methods.adalora`), with PEFT's schedule and regulariser applied from the callback's hooks
    (see the module docstring), no change to ``training_step``; merged into the base weights at the end.

    Its arguments are the fields of :class:`~peft_callbacks.AdaLoRAConfig` and of
    :class:`~peft_callbacks.callbacks.options.CallbackOptions`, as keywords.

    Raises:
        ValueError: at ``fit``: a strategy that shards parameters (FSDP, DeepSpeed; the allocator needs whole
            tensors), or no ``total_step`` and a Trainer that cannot estimate it.

    Example::

        >>> import lightning as L, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from peft_callbacks.demo import ImageClassifier  # any LightningModule; this one wraps a timm model
        >>> data = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))), batch_size=2)
        >>> adalora = AdaLoRACallback(init_r=4, target_r=2, tinit=2, tfinal=2, target_modules="all-linear",
        ...                           merge_on_train_end=False)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[adalora], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ImageClassifier("test_vit", num_classes=3), data)
        >>> adalora.config.total_step, adalora.allocator.budget == 2 * len(adalora.allocator.rank_pattern)
        (8, True)
    """

    drops_uncalled = False  # its rank allocator holds the layers it found at fit start

    def __init__(self, config: AdaLoRAConfig, options: CallbackOptions) -> None:
        self._configure(config, options)
        self.allocator: RankAllocator | None = None
        self._pending_state: dict[str, Any] | None = None
        self._fit_trainer: pl.Trainer | None = None
        self._stepped = False

    # -- surgery: the schedule's length is known once the Trainer has its data ----------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fit_trainer = trainer if stage == "fit" else None
        super().setup(trainer, pl_module, stage)

    def run_surgery(self, pl_module: torch.nn.Module, trainer: pl.Trainer | None = None) -> None:
        if self.config.total_step is None and self._fit_trainer is not None:
            self.config = self.config.replace(total_step=self._estimated_total_step(self._fit_trainer))
        super().run_surgery(pl_module, trainer)

    def _estimated_total_step(self, trainer: pl.Trainer) -> int:
        steps = trainer.estimated_stepping_batches
        if not isinstance(steps, (int, float)) or not math.isfinite(steps) or steps < 1:
            raise ValueError(
                f"{self.name}: `total_step` is None and the Trainer cannot tell how many steps it will take "
                f"(estimated_stepping_batches={steps!r}, e.g. max_steps=-1 with an iterable dataset); pass total_step."
            )
        try:
            return check_schedule(int(steps), self.config.tinit, self.config.tfinal)
        except ValueError as err:
            raise ValueError(f"{self.name}: the Trainer will take {int(steps)} steps: {err}") from None

    # -- the schedule ---------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"{self.name} runs on one device or under DDP; {type(strategy).__name__} shards parameters, and the "
                f"rank allocator needs every AdaLoRA tensor and gradient whole. Use strategy='ddp' or one device."
            )
        self.allocator = RankAllocator(pl_module, self.config, self.adapter_name)
        if self._pending_state is not None:
            self.allocator.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weight = self.config.orth_reg_weight
        if self.allocator is None or weight == 0:
            return
        params = [p for a in adalora_adapters(pl_module, self.adapter_name).values() for p in (a.lora_A, a.lora_B)]
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        with torch.enable_grad():
            regulariser = orthogonal_regularization(pl_module, self.adapter_name)
            loss = regulariser * weight
            if pl_module.automatic_optimization:
                loss = loss / trainer.accumulate_grad_batches  # Lightning divides the loss the same way
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                loss = scaler.scale(loss)  # the gradients in .grad carry the AMP loss scale
            # autograd.grad, not backward: DDP's gradient hooks have fired for this step already
            grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, grad in zip(params, grads):
                if p.grad is None:
                    p.grad = grad.detach().clone()
                else:
                    p.grad.add_(grad)
        pl_module.log("adalora/orth_reg", regulariser.detach(), on_step=True, on_epoch=False)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._stepped = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped or self.allocator is None:
            return
        self._stepped = False
        budget, _ = self.allocator.update_and_allocate(pl_module, trainer.global_step - 1)
        pl_module.log("adalora/budget", float(budget), on_step=True, on_epoch=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._fit_trainer = None

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["allocator"] = self.allocator.state_dict() if self.allocator is not None else self._pending_state
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("allocator")
        if saved is not None and self.allocator is not None:
            self.allocator.load_state_dict(saved)
        else:
            self._pending_state = saved
