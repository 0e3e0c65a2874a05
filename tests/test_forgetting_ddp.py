"""Two CPU processes report the same forgetting figures as one process.

The two processes are started with ``ddp_spawn`` (``FORGETTING_DDP=ddp_fork`` tries the fork launcher, which is
faster but can hang when the parent already runs an OpenMP thread pool); this module keeps light imports so each
spawned child starts quickly.
"""

from __future__ import annotations

import csv
import glob
import os

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from process_group import ReleaseProcessGroup
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks.callbacks.forgetting import ForgettingMonitor

# spawn, not fork: a child forked after the parent's OpenMP thread pool exists can hang in its first parallel op
STRATEGY = os.environ.get("FORGETTING_DDP", "ddp_spawn")
FIGURES = [f"forgetting/{k}" for k in ("base_accuracy", "forgetting", "kl_to_baseline", "feature_cosine")]


class NewTask(L.LightningModule):
    """A plain (generic) network: backbone + new 3-class head; the original head had 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def original_head() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(32, 5)


def base_loader() -> DataLoader:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 16, generator=g)
    with torch.no_grad():
        y = original_head()(NewTask().backbone(x)).argmax(-1)
    return DataLoader(TensorDataset(x, y), batch_size=4)  # 5 batches: 3 on rank 0, 2 on rank 1


def run(tmp_path, devices: int) -> list[dict[str, float]]:
    g = torch.Generator().manual_seed(4)
    train = TensorDataset(torch.randn(16, 16, generator=g), torch.randint(0, 3, (16,), generator=g))
    monitor = ForgettingMonitor(base_loader(), base_head=original_head(), plot=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=STRATEGY if devices > 1 else "auto",
        max_epochs=2,
        callbacks=[monitor, ReleaseProcessGroup()],
        logger=CSVLogger(str(tmp_path), name=f"devices{devices}"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        use_distributed_sampler=False,  # every process trains on the same batches: the same model as one process
    )
    trainer.fit(NewTask(), DataLoader(train, batch_size=8))
    (path,) = glob.glob(os.path.join(str(tmp_path), f"devices{devices}", "*", "metrics.csv"))
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("forgetting/forgetting")]
    return [{k: float(r[k]) for k in ["step", *FIGURES]} for r in rows]


def test_two_processes_report_the_same_figures_as_one(tmp_path):
    single = run(tmp_path, devices=1)
    double = run(tmp_path, devices=2)
    assert [r["step"] for r in single] == [0.0, 2.0, 4.0]
    assert single[0]["forgetting/base_accuracy"] == 1.0 and single[-1]["forgetting/forgetting"] > 0
    assert len(double) == len(single)
    for one, two in zip(single, double):
        for key in ["step", *FIGURES]:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
