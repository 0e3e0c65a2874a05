"""Generic models (no timm/transformers contract): the task head is the layer whose output is the model's output,
found by tracing the forward symbolically, never the last registered layer; when the trace cannot tell, no layer is
guessed, a log line says so, and nothing beyond the adapters trains."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks import LoRACallback, inject_lora, lora_layers
from peft_callbacks.core.heads import find_head
from peft_callbacks.demo import quiet_trainer


class FeedForward(nn.Module):
    """Lightning's tensor-parallel / FSDP2 docs model: ``w3`` is the gate branch, registered last."""

    def __init__(self, dim: int = 8, hidden_dim: int = 16) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DocsModule(L.LightningModule):
    """The docs' LightningModule: no ``forward``, the network called in ``training_step``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = FeedForward()

    def training_step(self, batch):
        return self.model(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return F.log_softmax(self.out(F.relu(self.fc2(F.relu(self.fc1(x))))).view(x.shape[0], -1), dim=-1)


class Branchy(nn.Module):
    """Data-dependent control flow: a symbolic trace cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        return self.a(h) if bool(h.sum() > 0) else self.b(h)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h) + h


def test_the_gate_branch_is_not_the_head_of_the_fsdp2_docs_model():
    assert find_head(FeedForward()).head == ["w2"]  # registered last: w3
    assert find_head(DocsModule()).head == ["model.w2"]


def test_lora_on_the_docs_module_trains_the_output_layer_and_adapts_the_gate():
    module = DocsModule()
    data = DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=4)
    quiet_trainer(max_steps=1, callbacks=[LoRACallback(rank=2, merge_on_train_end=False)]).fit(module, data)
    assert set(lora_layers(module)) == {"model.w1", "model.w3"}  # the gate gets LoRA like w1
    trained_in_full = {n for n, p in module.named_parameters() if p.requires_grad and ".adapters." not in n}
    assert trained_in_full == {"model.w2.weight"}


def test_the_output_layer_trains_in_full_and_the_gate_stays_frozen():
    model = inject_lora(FeedForward(), rank=2)
    full = {n for n, p in model.named_parameters() if p.requires_grad and ".adapters." not in n}
    assert full == {"w2.weight"}
    assert not model.w3.base_layer.weight.requires_grad


@pytest.mark.parametrize(
    ("make", "head"),
    [
        (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), ["2"]),
        (MLP, ["out"]),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)), ["3"]),
    ],
    ids=["sequential", "mlp-log-softmax", "cnn"],
)
def test_a_plain_models_output_layer_is_found(make, head):
    assert find_head(make()).head == head


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (Branchy, "cannot be traced symbolically"),
        (Residual, "residual path"),
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), "module with parameters"),
    ],
    ids=["control-flow", "residual", "norm-after"],
)
def test_no_guess_when_the_forward_does_not_tell(make, reason, caplog):
    with caplog.at_level(logging.INFO, logger="peft_callbacks.core.heads"):
        assert find_head(make()).head == []
    assert reason in caplog.text and "no layer is taken as its task head, so none trains in full" in caplog.text
    from peft_callbacks.core.graph import output_layers

    assert isinstance(output_layers(make()), str)


def test_without_a_head_nothing_beyond_the_adapters_trains():
    model = inject_lora(Branchy(), rank=2)
    assert set(lora_layers(model)) == {"fc", "a", "b"}  # the last registered layer is not protected as a head
    full = [n for n, p in model.named_parameters() if p.requires_grad and ".adapters." not in n]
    assert full == []


def test_an_adapted_output_layer_is_still_found():
    from peft_callbacks.core.graph import output_layers

    model = inject_lora(FeedForward(), rank=2, train_head=False, target_modules=["w2"])
    assert "w2" in lora_layers(model) and output_layers(model) == ["w2"]


def test_finding_the_head_runs_no_module_hook():
    """The trace reads the forward without calling the modules' hooks: FSDP2 (lazy init, all-gathers) and tensor
    parallel plans (redistributions) hang theirs on the blocks, and must not see symbolic inputs."""
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 3))
    calls = []
    for module in model.modules():
        module.register_forward_pre_hook(lambda m, args: calls.append(type(m).__name__))
    assert find_head(model).head == ["1"]
    assert calls == []
