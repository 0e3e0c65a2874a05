"""Label-free drift of sentence embeddings: how far fine-tuning moved what an encoder says about general text.

:class:`EmbeddingDrift` embeds a fixed set of general sentences with the module's own ``embed`` method at fit start
(the untouched encoder) and at the end of every validation, and logs ``1 − mean cosine similarity`` to the
baseline embeddings under ``drift/embedding``. No labels are needed: it measures how much the sentence-embedding
model was changed, which matters when the encoder is reused for retrieval or other tasks.

Example::

    >>> import torch
    >>> a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(embedding_drift(a, torch.tensor([[1.0, 0.0], [1.0, 1.0]])), 4)  # 1 - mean(1, 0.7071)
    0.1464
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from peft_callbacks._validation import check_positive_int
from peft_callbacks.forgetting.scoring import weights_version


def sentence_embedding(pl_module: pl.LightningModule, batch: dict) -> torch.Tensor:
    """``pl_module.embed(input_ids, attention_mask)``: what the drift is measured on, as a ``forward_fn`` for
    callbacks that score a base set (``ForgettingAwareFinish(metric=None, features="output", ...)``)."""
    return pl_module.embed(batch["input_ids"], batch["attention_mask"])


def embedding_drift(baseline: torch.Tensor, current: torch.Tensor) -> float:
    """``1 − mean cosine similarity`` between matching rows of two ``(N, D)`` embedding matrices."""
    return float(1.0 - F.cosine_similarity(baseline.float(), current.float(), dim=-1).mean())


class EmbeddingDrift(Callback):
    """Log ``drift/embedding`` = 1 − mean cosine(baseline embedding, current embedding) on general sentences.

    Measured at the end of every validation, and again at the end of training when the weights changed after the
    last validation (a merge, a forgetting-aware finish). The LightningModule must have
    ``embed(input_ids, attention_mask) -> (N, D)`` (as :class:`~peft_callbacks.demo.TextClassifier` has).

    Args:
        dataloader: batches of dicts with ``input_ids`` and ``attention_mask`` (labels are ignored), or the name of a
            method of the DataModule or the LightningModule that returns such a loader (the YAML way).
        limit_batches: embed at most this many batches.
    """

    def __init__(self, dataloader: DataLoader | str = "base_dataloader", limit_batches: int | None = None) -> None:
        if not isinstance(dataloader, (DataLoader, str)):
            raise TypeError(f"`dataloader` must be a DataLoader or a method name, got {type(dataloader).__name__}.")
        self.dataloader = dataloader
        self.limit_batches = None if limit_batches is None else check_positive_int("limit_batches", limit_batches)
        self.baseline: torch.Tensor | None = None
        self.history: list[float] = []
        self._resolved: DataLoader | None = None
        self._version: int | None = None

    def _loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> DataLoader:
        if not isinstance(self.dataloader, str):
            return self.dataloader
        for owner in (trainer.datamodule, pl_module):
            if owner is not None and hasattr(owner, self.dataloader):
                found = getattr(owner, self.dataloader)
                return found() if callable(found) else found
        raise ValueError(
            f"`dataloader`={self.dataloader!r} is neither a method of the DataModule nor of {type(pl_module).__name__}."
        )

    @torch.no_grad()
    def _embed(self, pl_module: pl.LightningModule) -> torch.Tensor:
        was_training = pl_module.training
        pl_module.eval()
        chunks = []
        for i, batch in enumerate(self._resolved):
            if self.limit_batches is not None and i >= self.limit_batches:
                break
            ids, mask = batch["input_ids"].to(pl_module.device), batch["attention_mask"].to(pl_module.device)
            chunks.append(pl_module.embed(ids, mask).cpu())
        pl_module.train(was_training)
        return torch.cat(chunks)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolved = self._loader(trainer, pl_module)
        if self.baseline is None:
            self.baseline = self._embed(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.baseline is None:
            return
        self._measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.baseline is not None and self.history and weights_version(pl_module) != self._version:
            self._measure(trainer, pl_module)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._version = weights_version(pl_module)
        self.history.append(embedding_drift(self.baseline, self._embed(pl_module)))
        for logger in trainer.loggers:
            logger.log_metrics({"drift/embedding": self.history[-1]}, step=trainer.global_step)

    @property
    def drift(self) -> float | None:
        """The latest drift (``None`` before the first validation)."""
        return self.history[-1] if self.history else None

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.baseline = state_dict.get("baseline", self.baseline)
        self.history = list(state_dict.get("history", []))
