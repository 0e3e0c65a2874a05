"""L2-SP, EWC, the forgetting-aware finish and the monitor's update figures for every registered method: the
forgetting code asks each adapter for the size and the scale of its update, so a method gets them by registering.

Without a Trainer, on a zoo model: the update space's squared norm (what L2-SP adds) equals ``Σ ‖merged − W₀‖²`` of
a merged copy plus ``Σ ‖θ − θ₀‖²`` of the other trained tensors; the EWC Fisher has one entry per update; scaling the
update gives the base model at 0 and the trained one at 1 exactly; committing it at 0.5 leaves the model computing
what it computed at 0.5. Then a small Lightning run per method with L2-SP, a ForgettingMonitor and the finish.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from test_adapter_updates import SCALABLE, _close, _move, _outputs, configs_of
from torch.utils.data import DataLoader, TensorDataset
from zoo import MODELS, run

from peft_callbacks.callbacks import finish as finish_module
from peft_callbacks.callbacks.finish import ForgettingAwareFinish
from peft_callbacks.callbacks.forgetting import ForgettingMonitor
from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.callbacks.regularization import L2SPCallback
from peft_callbacks.engine import get_method, inject, merge, scaled
from peft_callbacks.forgetting.anchors import UpdateAnchor
from peft_callbacks.forgetting.penalties import diagonal_fisher
from peft_callbacks.forgetting.scaling import UpdateScaler

CONFIGS = [pytest.param(c, id=f"{c.method}-{i}") for m in SCALABLE for i, c in enumerate(configs_of(m))]
MERGEABLE = [p for p in CONFIGS if get_method(p.values[0]).mergeable]


def _expected_square_norm(model: nn.Module, anchor: UpdateAnchor) -> float:
    """``Σ ‖merged − W₀‖²`` over the adapted layers (from a merged copy) + ``Σ ‖θ − θ₀‖²`` over the others."""
    merged = merge(copy.deepcopy(model))
    total = sum(
        (merged.get_submodule(p).weight.double() - layer.base_layer.weight.double()).pow(2).sum().item()
        for p, layer in anchor.layers.items()
    )
    live = dict(model.named_parameters())
    return total + sum((live[n].double() - start.double()).pow(2).sum().item() for n, start in anchor.start.items())


@pytest.mark.parametrize("config", CONFIGS)
def test_the_update_space_of_every_method(config):
    model, inputs = MODELS["hf-bert"]()
    model.eval().requires_grad_(False)
    before = _outputs(model, inputs)
    inject(model, config.replace(train_head=False))
    anchor = UpdateAnchor(model)
    anchor.capture()  # θ₀ of what trains outside adapted layers (bottleneck adapters)
    _move(model)
    adapted = _outputs(model, inputs)

    with torch.no_grad():
        square = anchor.square_norm().item()
    expected = _expected_square_norm(model, anchor)
    assert square == pytest.approx(expected, rel=1e-4) and expected > 0  # what L2-SP adds, over 2
    names = [name for name, _ in anchor.updates()]
    assert len(names) == len(anchor.layers) + len(anchor.start)
    fisher = diagonal_fisher(anchor, [inputs], lambda batch: run(model, batch).logsumexp(-1).mean())
    assert sorted(fisher) == sorted(names) and all(torch.isfinite(f).all() for f in fisher.values())
    _close(_outputs(model, inputs), adapted, rel=0)  # the Fisher's folded weights were put back

    scaler = UpdateScaler(anchor)
    with scaler.scaled(0.0):
        assert torch.equal(_outputs(model, inputs), before)
    with scaler.scaled(1.0):
        assert torch.equal(_outputs(model, inputs), adapted)
    with scaled(model, 0.5):
        half = _outputs(model, inputs)
    merged = scaler.commit(model, 0.5)
    absorbing = all(m.absorbs_scale for m in [*anchor.layers.values(), *scaler.adapters.values()] for m in _adapters(m))
    assert (merged == []) == absorbing  # the scale written into the adapters, else their layers merged at 0.5
    _close(_outputs(model, inputs), half, rel=1e-5)


def _adapters(module: nn.Module) -> list:
    return list(module.adapters.values()) if hasattr(module, "adapters") else [module]


class Net(L.LightningModule):
    """A backbone of two Linear layers and a 3-class head (``net.4``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _data(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (16,), generator=g)), batch_size=8)


class Probe(Callback):
    """At the end of training, before the finish: the outputs at every ``s`` of the grid, and the squared norm of
    the update as L2-SP sees it against one taken from a merged copy."""

    def __init__(self, grid: list[float]) -> None:
        self.grid, self.x = grid, torch.randn(5, 8, generator=torch.Generator().manual_seed(9))

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            self.outputs = {}
            for s in self.grid:
                with scaled(pl_module, s):
                    self.outputs[s] = pl_module(self.x)
            anchor = UpdateAnchor(pl_module.net)
            self.square_norm, self.expected = anchor.square_norm().item(), _expected_square_norm(pl_module.net, anchor)


@pytest.mark.parametrize("config", MERGEABLE)
def test_l2sp_the_monitor_and_the_finish_run_with_every_method(config, monkeypatch):
    grid = [0.0, 0.5, 1.0]
    monkeypatch.setattr(finish_module, "choose_scale", lambda curve, budget: curve[1])  # s = 0.5: a real commit
    probe = Probe(grid)
    l2sp = L2SPCallback(weight=0.1)
    monitor = ForgettingMonitor(_data(1), plot=False)
    finish = ForgettingAwareFinish(_data(1), max_forgetting=1.0, grid=grid, val_dataloader=_data(0), plot=False)
    peft = PEFTCallback(config.replace(train_head=False), merge_on_train_end=False)
    module = Net()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=4,
        callbacks=[probe, peft, l2sp, monitor, finish],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, _data(0))

    assert l2sp.last_term > 0 and probe.square_norm == pytest.approx(probe.expected, rel=1e-4)
    first, trained = monitor.history[0], monitor.history[1]  # the baseline, and after the first epoch
    assert first["relative_update"] < 1e-5 < trained["relative_update"]  # every method starts at ΔW = 0
    assert torch.isfinite(torch.tensor(trained["update_norm"]))
    assert float(trainer.callback_metrics["forgetting/update_norm"]) >= 0
    assert [p["s"] for p in finish.curve] == grid and finish.scale == 0.5
    assert bool(finish.merged_layers) == (not all(a.absorbs_scale for a in _adapters(peft_layer(config))))
    _close(module(probe.x).detach(), probe.outputs[0.5], rel=1e-5)  # left at the chosen s


def peft_layer(config) -> nn.Module:
    """One adapted layer of ``config``'s method, to ask its adapters whether they hold a scale."""
    return inject(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)), config.replace(train_head=False))[0]
