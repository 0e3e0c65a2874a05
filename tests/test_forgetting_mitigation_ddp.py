"""Replay, distillation, L2-SP, EWC and the forgetting-aware finish under DDP: two CPU processes (``ddp_spawn``,
gloo), each with half of every batch, train to the same weights and log the same terms as one process with the
whole batch. LoRA is injected by ``LoRACallback``, so the terms run through mergeable layers inside the DDP forward
(no unused-parameter error). Light imports, as in ``test_forgetting_ddp.py``: each spawned child starts quickly."""

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
from torch.utils.data import DataLoader, Sampler, TensorDataset

from peft_callbacks.callbacks.finish import ForgettingAwareFinish
from peft_callbacks.callbacks.lora import LoRACallback
from peft_callbacks.callbacks.mitigation import DistillationCallback, ReplayCallback
from peft_callbacks.callbacks.regularization import EWCCallback, L2SPCallback

STRATEGY = os.environ.get("FORGETTING_DDP", "ddp_spawn")
TERMS = [
    f"{t}_{when}"
    for t in ("replay/loss", "replay/fraction", "distillation/loss", "l2sp/loss", "ewc/loss")
    for when in ("step", "epoch")
]


class NewTask(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def original_head() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(16, 5)


def base_loader() -> DataLoader:
    g = torch.Generator().manual_seed(3)
    return DataLoader(TensorDataset(torch.randn(24, 8, generator=g), torch.randint(0, 5, (24,), generator=g)), 6)


class Interleaved(Sampler):
    """Process ``r`` of ``n`` takes examples ``r, r + n, …`` in order (Lightning's own distributed sampler would
    shuffle the training set), so each step's batches together are the single process's batch."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _split(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._split()
        return iter(range(rank, self.size, world))

    def __len__(self) -> int:
        return self.size // self._split()[1]


def run(tmp_path, devices: int) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 8, generator=g)
    train = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    head = original_head()
    callbacks = [
        LoRACallback(rank=2, alpha=4),
        ReplayCallback(base_loader(), fraction=0.5, base_head=head),
        DistillationCallback(weight=0.5, base_head=head),
        L2SPCallback(weight=0.1, base_head=head),
        EWCCallback(base_loader(), weight=1.0, base_head=head),
        ForgettingAwareFinish(base_loader(), max_forgetting=0.5, grid=[0, 0.5, 1], base_head=head, plot=False),
    ]
    module = NewTask()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=STRATEGY if devices > 1 else "auto",
        max_epochs=2,
        callbacks=[*callbacks, ReleaseProcessGroup()],
        logger=CSVLogger(str(tmp_path), name=f"devices{devices}"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    # every batch of 8 is split between the two processes: 4 + 4 = the single process's 8
    loader = DataLoader(train, batch_size=8 // devices, sampler=Interleaved(len(train)))
    # LoRA's A is drawn at fit time: from seed 0 here, and in each spawned process (Lightning re-seeds it with the
    # seed set last), whatever earlier code did to the global generator
    L.seed_everything(0, verbose=False)
    trainer.fit(module, loader, DataLoader(train, batch_size=8 // devices, sampler=Interleaved(len(train))))
    (path,) = glob.glob(os.path.join(str(tmp_path), f"devices{devices}", "*", "metrics.csv"))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    figures = [{k: float(r[k]) for k in r if r[k] and (k in TERMS or k == "step")} for r in rows]
    finish = [{k: float(r[k]) for k in r if r[k] and k.startswith("finish/")} for r in rows]
    return [f for f in figures if len(f) > 1] + [f for f in finish if f], module.state_dict()


def test_two_processes_train_and_log_like_one(tmp_path):
    single, weights_single = run(tmp_path, devices=1)
    double, weights_double = run(tmp_path, devices=2)
    assert {k for row in single for k in row} >= {*TERMS, "finish/scale", "finish/forgetting"}
    assert len(single) == len(double)
    for one, two in zip(single, double):
        assert set(one) == set(two)
        for key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    assert (
        set(weights_single)
        == set(weights_double)
        == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"}
    )  # merged: a plain model
    for name, value in weights_single.items():
        torch.testing.assert_close(weights_double[name], value, rtol=1e-4, atol=1e-5, msg=name)
