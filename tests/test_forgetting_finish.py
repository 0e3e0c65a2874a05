"""ForgettingAwareFinish: it picks the ``s`` a hand sweep picks, and leaves the model exactly at the update scaled by
hand, for LoRA (B scaled, merged by LoRACallback), DoRA (merged at s), bottleneck adapters and full fine-tuning."""

from __future__ import annotations

import copy
import os
import pickle

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks.callbacks.finish import ForgettingAwareFinish
from peft_callbacks.callbacks.forgetting import ForgettingMonitor
from peft_callbacks.callbacks.lora import LoRACallback
from peft_callbacks.callbacks.method_callbacks import AdapterCallback
from peft_callbacks.forgetting.scaling import choose_scale

GRID = [0.0, 0.25, 0.5, 0.75, 1.0]


class Net(L.LightningModule):
    """Generic backbone ``net.0`` → tanh → new 3-class head ``net.2``; the base task had a 5-class head."""

    def __init__(self, lr: float = 2.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def original_head() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(6, 5)


def new_data(n: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=8)


def base_data() -> DataLoader:
    """Base-task inputs labelled by the untouched model through the original head: baseline accuracy 1."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=g)
    with torch.no_grad():
        y = original_head()(Net().net[1](Net().net[0](x))).argmax(-1)
    return DataLoader(TensorDataset(x, y), batch_size=10)


class Trained(Callback):
    """Keeps the weights the finish starts from (it runs before the finish at on_train_end)."""

    def on_fit_start(self, trainer, pl_module):
        self.start = copy.deepcopy(pl_module.state_dict())

    def on_train_end(self, trainer, pl_module):
        self.end = copy.deepcopy(pl_module.state_dict())


def fit(module, callbacks, steps: int = 6):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=100,
    )
    trainer.fit(module, new_data(), new_data())
    return trainer


def lora_tensor(state: dict, layer: str, name: str) -> torch.Tensor:
    """A LoRA tensor of ``layer`` in a state dict, wherever this version of the library keeps it (right under the
    layer, or under its ``adapters.default``)."""
    for key in (f"{layer}.{name}", f"{layer}.adapters.default.{name}"):
        if key in state:
            return state[key]
    raise KeyError(f"no {name} of {layer} among {sorted(state)}")


def lora_delta(state: dict, layer: str, scaling: float) -> torch.Tensor:
    """``s·B·A`` of ``layer`` from a state dict."""
    return scaling * lora_tensor(state, layer, "lora_B.weight") @ lora_tensor(state, layer, "lora_A.weight")


def accuracy(weight, bias, head_w, head_b, loader) -> float:
    correct = total = 0
    for x, y in loader:
        logits = F.linear(torch.tanh(F.linear(x, weight, bias)), head_w, head_b)
        correct += int((logits.argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def hand_sweep(weight_at, bias, new_head, budget: float) -> tuple[list[dict], dict]:
    head = original_head()
    curve = []
    for s in GRID:
        w = weight_at(s)
        base = accuracy(w, bias, head.weight, head.bias, base_data())
        new = accuracy(w, bias, *new_head, new_data())
        curve.append(
            {"s": s, "new_task": new, "forgetting": (curve[0]["base"] if curve else base) - base, "base": base}
        )
    return curve, choose_scale(curve, budget)


@pytest.mark.parametrize("finish_first", [True, False])
def test_lora_finish_picks_the_hand_sweep_and_leaves_the_hand_scaled_merged_model(finish_first):
    trained = Trained()
    lora = LoRACallback(rank=2, alpha=4, train_head=True)
    finish = ForgettingAwareFinish(base_data(), max_forgetting=0.07, grid=GRID, base_head=original_head(), plot=False)
    module = Net()
    fit(module, [trained, finish, lora] if finish_first else [trained, lora, finish])

    end = trained.end
    w0, bias = end["net.0.base_layer.weight"], end["net.0.base_layer.bias"]
    delta = lora_delta(end, "net.0", 2.0)  # s·B·A, scaling = alpha / r = 2
    curve, chosen = hand_sweep(lambda s: w0 + s * delta, bias, (end["net.2.weight"], end["net.2.bias"]), 0.07)
    assert [p["s"] for p in finish.curve] == GRID
    for mine, hand in zip(finish.curve, curve):
        assert mine["new_task"] == pytest.approx(hand["new_task"]) and mine["forgetting"] == pytest.approx(
            hand["forgetting"]
        )
    assert finish.scale == chosen["s"]
    assert curve[-1]["forgetting"] > 0.07 >= chosen["forgetting"]  # the budget bit: the trained model forgets more
    assert 0 < chosen["s"] < 1

    # LoRACallback merged afterwards: a plain Linear holding W0 + s·ΔW; the new head as trained
    assert type(module.net[0]) is nn.Linear
    torch.testing.assert_close(module.net[0].weight.detach(), w0 + chosen["s"] * delta, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(module.net[2].weight.detach(), end["net.2.weight"])


def test_full_fine_tuning_finish_interpolates_start_and_end_weights_like_wise_ft():
    trained = Trained()
    finish = ForgettingAwareFinish(base_data(), max_forgetting=0.2, grid=GRID, base_head=original_head(), plot=False)
    module = Net()
    fit(module, [trained, finish], steps=12)
    start, end = trained.start, trained.end

    def at(s: float, name: str) -> torch.Tensor:
        return start[name] + s * (end[name] - start[name])

    head = original_head()
    curve = []
    for s in GRID:
        w, b = at(s, "net.0.weight"), at(s, "net.0.bias")
        base = accuracy(w, b, head.weight, head.bias, base_data())
        new = accuracy(w, b, end["net.2.weight"], end["net.2.bias"], new_data())  # the new head: as trained
        curve.append(
            {"s": s, "new_task": new, "forgetting": (curve[0]["base"] if curve else base) - base, "base": base}
        )
    chosen = choose_scale(curve, 0.2)
    assert [p["new_task"] for p in finish.curve] == pytest.approx([p["new_task"] for p in curve])
    assert [p["forgetting"] for p in finish.curve] == pytest.approx([p["forgetting"] for p in curve])
    assert finish.scale == chosen["s"] and 0 < chosen["s"] < 1
    for name in ("net.0.weight", "net.0.bias"):
        torch.testing.assert_close(module.state_dict()[name], at(chosen["s"], name), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(module.state_dict()["net.2.weight"], end["net.2.weight"])


def test_dora_layers_are_merged_at_the_chosen_scale():
    trained = Trained()
    finish = ForgettingAwareFinish(base_data(), max_forgetting=0.2, grid=GRID, base_head=original_head(), plot=False)
    module = Net()
    fit(module, [trained, LoRACallback(rank=2, alpha=4, use_dora=True, merge_on_train_end=False), finish])
    end = trained.end
    w0 = end["net.0.base_layer.weight"]
    v = w0 + lora_delta(end, "net.0", 2.0)
    dora = lora_tensor(end, "net.0", "lora_magnitude_vector")[:, None] * v / v.norm(dim=1, keepdim=True)
    s = finish.scale
    assert finish.merged_layers == ["net.0"] and type(module.net[0]) is nn.Linear  # no DoRA form holds W0 + s·ΔW
    torch.testing.assert_close(module.net[0].weight.detach(), w0 + s * (dora - w0), rtol=1e-5, atol=1e-6)


def test_adapter_outputs_are_scaled():
    import timm

    class Vit(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = timm.create_model(
                "deit_tiny_patch16_224",
                pretrained=False,
                num_classes=3,
                img_size=32,
                depth=2,
                embed_dim=32,
                num_heads=2,
            )

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    g = torch.Generator().manual_seed(0)
    images = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,))), 4)
    trained = Trained()
    finish = ForgettingAwareFinish(images, max_forgetting=0.0, grid=[0.0, 0.5, 1.0], val_dataloader=images, plot=False)
    module = Vit()
    L.seed_everything(0, verbose=False)
    L.Trainer(
        max_steps=4,
        callbacks=[trained, AdapterCallback(bottleneck=4), finish],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, images)
    s = finish.scale
    ups = [k for k in trained.end if k.endswith(".up.weight") or k.endswith(".up.bias")]
    assert ups
    for key in ups:  # the adapters' output, h + s·up(act(down(h))), through a scaled up-projection
        torch.testing.assert_close(module.state_dict()[key], s * trained.end[key])
    downs = [k for k in trained.end if k.endswith(".down.weight")]
    for key in downs:
        torch.testing.assert_close(module.state_dict()[key], trained.end[key])


def test_monitor_after_the_finish_reports_the_final_model_and_the_plot_sits_beside_its_own(tmp_path):
    head = original_head()
    monitor = ForgettingMonitor(base_data(), base_head=head, val_metric="val_acc", plot_dir=str(tmp_path))
    finish = ForgettingAwareFinish(base_data(), max_forgetting=0.2, grid=GRID, base_head=head, plot_dir=str(tmp_path))
    module = Net()
    trainer = fit(module, [LoRACallback(rank=2, alpha=4), finish, monitor])
    x, y = next(iter(DataLoader(base_data().dataset, batch_size=30)))
    with torch.no_grad():
        now = (head(module.net[1](module.net[0](x))).argmax(-1) == y).float().mean().item()
    assert monitor.latest["value"] == pytest.approx(now)
    assert monitor.latest["forgetting"] == pytest.approx(finish.chosen["forgetting"])  # same base set, same s
    assert trainer.callback_metrics["finish/scale"].item() == finish.scale
    assert os.path.getsize(os.path.join(str(tmp_path), "finish.png")) > 10_000


def test_bad_arguments_name_the_argument():
    loader = base_data()
    with pytest.raises(ValueError, match=r"`grid` must hold 0 .* 0 missing from \[0.5, 1\]"):
        ForgettingAwareFinish(loader, grid=[0.5, 1])
    with pytest.raises(ValueError, match=r"1 missing"):
        ForgettingAwareFinish(loader, grid=[0, 0.5])
    with pytest.raises(ValueError, match=r"`grid` entries must lie in \[0, 1\], got 1.5"):
        ForgettingAwareFinish(loader, grid=[0, 1, 1.5])
    with pytest.raises(TypeError, match="`grid` must be a list"):
        ForgettingAwareFinish(loader, grid="0,1")
    for budget in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="`max_forgetting` must be"):
            ForgettingAwareFinish(loader, max_forgetting=budget)
    with pytest.raises(ValueError, match="`metric` must be one of 'accuracy', 'f1'"):
        ForgettingAwareFinish(loader, metric="loss")
    with pytest.raises(TypeError, match="`dataloader` must be a DataLoader"):
        ForgettingAwareFinish(3)
    with pytest.raises(ValueError, match="`base_head`='missing.pt' is not a file"):
        ForgettingAwareFinish(loader, base_head="missing.pt")


def test_no_validation_data_is_a_clear_error_at_the_end():
    finish = ForgettingAwareFinish(base_data(), plot=False)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=1,
        callbacks=[finish],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="needs the new task's validation data.*pass `val_dataloader=`"):
        trainer.fit(Net(), new_data())


def test_pickles_parses_from_yaml_and_keeps_state(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ForgettingAwareFinish, "finish")
    config = parser.parse_args(
        ["--finish.dataloader=base_train_dataloader", "--finish.grid=[0, 0.5, 1]", "--finish.max_forgetting=0.1"]
    )
    finish = parser.instantiate(config).finish
    assert finish.grid == [0.0, 0.5, 1.0] and finish.max_forgetting == 0.1
    finish = ForgettingAwareFinish(base_data(), grid=GRID, base_head=original_head(), plot=False)
    fit(Net(), [finish])
    restored = pickle.loads(pickle.dumps(finish))
    assert restored.curve == finish.curve
    other = ForgettingAwareFinish(base_data(), plot=False)
    other.load_state_dict(finish.state_dict())
    assert other.scale == finish.scale and set(other.state_dict()["start"]) == {"net.0.weight", "net.0.bias"}
