"""The smallest LightningModule and data there are, for the runnable examples in the docstrings.

Example::

    >>> trainer = quiet_trainer(max_steps=1)
    >>> trainer.fit(MLPClassifier(), random_loader())
    >>> trainer.global_step
    1
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["MLPClassifier", "quiet_trainer", "random_loader"]


class MLPClassifier(pl.LightningModule):
    """``Linear → ReLU → Linear`` (held as ``self.net``) trained with cross-entropy and SGD.

    Args:
        features: input width.
        classes: number of classes.
        lr: SGD learning rate.
    """

    def __init__(self, features: int = 4, classes: int = 3, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 8), nn.ReLU(), nn.Linear(8, classes))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def random_loader(
    samples: int = 8, shape: tuple[int, ...] = (4,), classes: int = 3, batch_size: int = 4, seed: int = 0
) -> DataLoader:
    """A loader of ``samples`` random inputs of ``shape`` with random labels in ``[0, classes)``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *shape, generator=generator)
    y = torch.randint(0, classes, (samples,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def quiet_trainer(**kwargs) -> pl.Trainer:
    """``lightning.Trainer(**kwargs)`` with logging, checkpoints, the progress bar and the model summary off (unless
    given): what a short runnable example needs."""
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**quiet, **kwargs})
