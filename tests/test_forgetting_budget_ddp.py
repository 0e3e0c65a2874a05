"""ForgettingBudget under DDP: two CPU processes (``ddp_spawn``, gloo), each with half of every batch and half of the
base batches, read the same forgetting, set the same multiplier and train to the same weights as one process."""

from __future__ import annotations

import csv
import glob
import os

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.loggers import CSVLogger
from process_group import ReleaseProcessGroup
from test_forgetting_mitigation_ddp import Interleaved, NewTask  # 8 → 16 → 16 → 3, SGD lr 0.5
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks.callbacks.budget import ForgettingBudget

STRATEGY = os.environ.get("FORGETTING_DDP", "ddp_spawn")


def run(tmp_path, devices: int, head: nn.Module, base: DataLoader) -> tuple[list[dict], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 8, generator=g)
    train = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    # margin fixed: on 24 base examples the noise margin would leave a target near 0, where readings of ~1e-4
    # weigh 100x more and the order of the sums shows
    budget = ForgettingBudget(base, max_forgetting=0.05, base_head=head, every_n_steps=1, proxy_batches=2, margin=0.2)
    module = NewTask()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=STRATEGY if devices > 1 else "auto",
        max_epochs=3,
        callbacks=[budget, ReleaseProcessGroup()],
        logger=CSVLogger(str(tmp_path), name=f"devices{devices}"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, DataLoader(train, batch_size=8 // devices, sampler=Interleaved(len(train))))
    # ddp_spawn trains in other processes: the budget's readings come back through the log, the weights by Lightning
    (path,) = glob.glob(os.path.join(str(tmp_path), f"devices{devices}", "*", "metrics.csv"))
    with open(path) as f:
        rows = [{k: float(v) for k, v in r.items() if v and k.startswith("budget/")} for r in csv.DictReader(f)]
    return [r for r in rows if "budget/multiplier" in r], module.state_dict()


def test_two_processes_read_and_hold_the_budget_like_one(tmp_path):
    torch.manual_seed(1)
    head = nn.Linear(16, 5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 8, generator=g)
    with torch.no_grad():  # labelled by the original model: base accuracy starts at 1
        y = head(NewTask().net[:4](x)).argmax(-1)
    base = DataLoader(TensorDataset(x, y), batch_size=6)
    single, weights_single = run(tmp_path, 1, head, base)
    double, weights_double = run(tmp_path, 2, head, base)
    assert len(single) == 13 and any(r["budget/multiplier"] > 0 for r in single)  # 12 readings and the end
    assert len(double) == len(single)
    for one, two in zip(single, double):
        assert one.keys() == two.keys()
        for key, value in one.items():
            assert abs(two[key] - value) <= 1e-3 * max(abs(value), 1e-6), key  # sums in another order
    for name, value in weights_single.items():
        torch.testing.assert_close(weights_double[name], value, rtol=1e-4, atol=1e-5, msg=name)
