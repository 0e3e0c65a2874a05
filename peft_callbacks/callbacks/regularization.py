"""Callbacks that pull the fine-tune back toward its starting point: L2-SP and EWC.

Both penalise the *update* (:mod:`peft_callbacks.forgetting.anchors`): for an adapted layer of any layer method (LoRA,
DoRA, IA3, LoHa, LoKr, OFT, VeRA, AdaLoRA, …, each adapter saying what its update is) the weight-space update ``ΔW``
of the layer — for LoRA ``s·B·A``, the change the merged model will carry — and for every
other trained tensor (full fine-tuning, unfrozen layers, adapters, prompts, norms) ``θ − θ₀`` with ``θ₀`` its value
at fit start. Penalising ``A`` and ``B`` themselves would pull ``A`` toward its random start, which says nothing
about the model; ``ΔW`` is what changes the base task. When a ``base_head`` is given, the current head serves the new
task only and is left out. The terms are added to the loss through the wrapper of
:mod:`peft_callbacks.callbacks.mitigation` (no change to ``training_step``; works under DDP).

Starting values and the Fisher are saved in checkpoints (for full fine-tuning that is one more copy of the trained
tensors), so a resumed run keeps pulling toward the original model.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from peft_callbacks._validation import check_bool, check_positive_float, check_positive_int
from peft_callbacks.callbacks.freezing import may_unfreeze
from peft_callbacks.callbacks.mitigation import _AnchoredTerm
from peft_callbacks.engine.arguments import takes_settings
from peft_callbacks.forgetting.batches import move_to_device
from peft_callbacks.forgetting.penalties import diagonal_fisher, ewc_penalty, l2sp_penalty, normalizing_scale
from peft_callbacks.forgetting.replay import batch_size_of
from peft_callbacks.forgetting.scoring import evaluation_mode
from peft_callbacks.plumbing.base_task import BaseLoader, BaseTaskOptions, check_dataloader, resolve_loader

log = logging.getLogger(__name__)


def _may_unfreeze(trainer: pl.Trainer) -> bool:
    """Is a freezing schedule among the callbacks (one that unfreezes layers while training)?"""
    return any(may_unfreeze(c) for c in trainer.callbacks)


class L2SPCallback(_AnchoredTerm):
    """L2-SP: add ``weight/2 · Σ ‖update‖²``, pulling the fine-tune toward its starting weights.

    Li et al. 2018 ("Explicit inductive bias for transfer learning with convolutional networks", eq. 2, the ``α``
    term). The update is ``ΔW`` for adapted layers of every layer method (each adapter measures its own: LoRA in rank
    space, ``‖s·B·A‖²`` without forming ``B·A``) and ``θ − θ₀`` for every other trained tensor; see the module
    docstring. With ``normalize=True`` the sum is divided by ``S₀ = Σ ‖θ₀‖²`` of the same tensors (the squared
    relative update: one ``α`` means the same on a small and a large model; see
    :mod:`peft_callbacks.forgetting.penalties`). Logged: ``l2sp/loss``.

    Args:
        weight: ``α`` (> 0).
        base_head: the original head (module, whole original model, or state-dict path), when fine-tuning replaced
            it: the current head is then the new task's own and is not pulled back. ``None``: it is.
        module: dotted path of the model inside the LightningModule when it holds several.
        normalize: divide the penalty by ``Σ ‖θ₀‖²`` (``False``, the default: the plain sum).
        prefix: logging namespace and checkpoint key.

    Example::

        >>> import lightning as L, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from peft_callbacks.demo import quiet_trainer
        >>> class Regressor(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(4, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 1)), batch_size=4)
        >>> l2sp = L2SPCallback(weight=0.1)
        >>> trainer = quiet_trainer(max_steps=2, callbacks=[l2sp])
        >>> trainer.fit(Regressor(), data)
        >>> l2sp.last_term > 0
        True
    """

    def __init__(
        self,
        weight: float = 0.01,
        base_head: nn.Module | str | None = None,
        module: str | None = None,
        normalize: bool = False,
        prefix: str = "l2sp",
    ) -> None:
        super().__init__(BaseTaskOptions(base_head=base_head, module=module), prefix=prefix)
        self.weight = check_positive_float("weight", weight)
        self.normalize = check_bool("normalize", normalize)
        self._scale: float | None = None

    def on_new_tensors(self, names: list[str]) -> None:
        self._scale = None  # S₀ covers the tensors unfrozen since

    def term(self, pl_module: pl.LightningModule, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        if self._scale is None:
            self._scale = normalizing_scale(self._anchor) if self.normalize else 1.0
        value = l2sp_penalty(self._anchor, self.weight, self._scale)
        self.log_term(pl_module, "loss", value, batch_size=batch_size_of(batch))
        return loss + value.to(loss.device, loss.dtype)


@takes_settings(BaseTaskOptions)
class EWCCallback(_AnchoredTerm):
    """Elastic weight consolidation: add ``weight/2 · Σ F ⊙ update²`` with ``F`` the base task's diagonal Fisher.

    Kirkpatrick et al. 2017 (eq. 3). At fit start, on the base-task set, ``F`` is computed at the starting weights
    as Avalanche's ``EWCPlugin`` does: the squared mini-batch gradient of the base-task cross-entropy (through the
    original head), averaged over batches, in eval mode (:func:`peft_callbacks.forgetting.penalties.diagonal_fisher`).
    **Over what:** the update space of the module docstring. For an adapted layer ``F`` is over its weight ``W``
    (``out × in``: the gradient with respect to the merged weight) and the penalty is on ``ΔW``, so LoRA is held
    exactly where full fine-tuning of that layer would be; for full fine-tuning, adapters, prompts and unfrozen
    layers it is over the trained tensors themselves. With a freezing schedule among the callbacks
    (``LayerwiseUnfreezing``, ``HeadThenFull``, Lightning's ``BackboneFinetuning``) the Fisher covers every tensor of
    the watched models at fit start, so layers unfrozen later are held from their first step; tensors that start
    training later without one are not penalised (a warning says which). With several processes each computes the
    gradients of its share of the batches and the sums are added, so ``F`` equals one process's.

    With ``normalize=True`` (default) the penalty uses ``F / mean(F)`` (mean over every entry), so ``weight`` has the
    scale of L2-SP's ``α`` whatever the loss scale; ``fisher`` keeps the raw values. ``normalize="start"`` also
    divides by ``Σ F/mean(F) ⊙ θ₀²``, the Fisher-weighted size of the starting weights, as the normalised L2-SP does
    (one ``weight`` means the same on a small and a large model). Logged: ``ewc/loss``.

    Args:
        dataloader: the base-task set for the Fisher: a ``DataLoader``, a ``LightningDataModule``, a callable
            returning a loader, or the name of a LightningModule / DataModule method or attribute (YAML).
        weight: ``λ`` (> 0).
        base_head: the original head (module, whole original model, or state-dict path), when fine-tuning replaced
            it; ``None`` scores the base task through the current head (and then penalises it too).
        fisher_batches: use only the first N base-task batches for the Fisher (``None``: all).
        normalize: ``True``: divide the Fisher by its mean in the penalty; ``"start"``: that, and divide the penalty
            by the Fisher-weighted ``Σ θ₀²``; ``False``: the raw Fisher.
        prefix: logging namespace and checkpoint key.

    Example::

        >>> from peft_callbacks.demo import MLPClassifier, quiet_trainer, random_loader  # any LightningModule, data
        >>> ewc = EWCCallback(random_loader(6, batch_size=3, seed=1), weight=10.0, fisher_batches=1)  # base task
        >>> quiet_trainer(max_steps=2, callbacks=[ewc]).fit(MLPClassifier(lr=0.1), random_loader(8, batch_size=4))
        >>> sorted(ewc.fisher)[:2], ewc.last_term > 0  # the Fisher of one base batch; the penalty once weights moved
        (['net.0.bias', 'net.0.weight'], True)
    """

    def __init__(
        self,
        dataloader: BaseLoader,
        weight: float = 1.0,
        *,
        base_task: BaseTaskOptions,
        fisher_batches: int | None = None,
        normalize: bool | str = True,
        prefix: str = "ewc",
    ) -> None:
        super().__init__(base_task, prefix=prefix)
        self.dataloader = check_dataloader(dataloader)
        self.weight = check_positive_float("weight", weight)
        self.fisher_batches = None if fisher_batches is None else check_positive_int("fisher_batches", fisher_batches)
        if normalize != "start" and not isinstance(normalize, bool):
            raise ValueError(f"`normalize` must be True, False or 'start', got {normalize!r}.")
        self.normalize = normalize
        self.fisher: dict[str, torch.Tensor] = {}
        self._fisher_scale: float | None = None

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().prepare(trainer, pl_module)
        if self.fisher:
            self.fisher = {k: v.to(pl_module.device) for k, v in self.fisher.items()}
            rank_zero_info(f"{self.name}: resumed; keeping the Fisher of {len(self.fisher)} tensor(s).")
            return
        loader = resolve_loader(self.dataloader, trainer, pl_module, owner=self.name)
        scorer = self.scorer(pl_module)
        space = self._anchor
        if _may_unfreeze(trainer):  # a schedule will unfreeze layers: their Fisher must be taken now, at the start
            space = self.anchor(pl_module)
            space.trainable_only = False
        with evaluation_mode(pl_module, grad=True):
            self.fisher = diagonal_fisher(
                space,
                loader,
                lambda batch: scorer.loss(move_to_device(batch, pl_module.device)),
                limit_batches=self.fisher_batches,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
            )
        total = sum(int(f.numel()) for f in self.fisher.values())
        rank_zero_info(f"{self.name}: diagonal Fisher over {len(self.fisher)} tensor(s), {total:,} entries.")

    def reset(self) -> None:
        super().reset()
        self.fisher, self._fisher_scale = {}, None

    def on_new_tensors(self, names: list[str]) -> None:
        names = [n for n in names if n not in self.fisher]
        if not names:
            return
        rank_zero_warn(
            f"{self.name}: {len(names)} tensor(s) started training after fit start ({', '.join(names[:4])}"
            f"{', …' if len(names) > 4 else ''}); they have no Fisher and are not penalised."
        )

    def _scale(self) -> float:
        if not self.normalize:
            return 1.0
        total = sum(float(f.sum()) for f in self.fisher.values())
        count = sum(int(f.numel()) for f in self.fisher.values())
        if self.normalize == "start":  # (F/mean F) / Σ (F/mean F)·θ₀² = F / Σ F·θ₀²
            return normalizing_scale(self._anchor, self.fisher)
        return count / total if total > 0 else 1.0

    def term(self, pl_module: pl.LightningModule, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        if self._fisher_scale is None:
            self._fisher_scale = self._scale()
        value = ewc_penalty(self._anchor, self.fisher, self.weight * self._fisher_scale)
        self.log_term(pl_module, "loss", value, batch_size=batch_size_of(batch))
        return loss + value.to(loss.device, loss.dtype)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._fisher_scale = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fisher": {k: v.cpu() for k, v in self.fisher.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.fisher = dict(state_dict.get("fisher") or {})
