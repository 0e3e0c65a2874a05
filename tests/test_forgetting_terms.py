"""Replay, distillation, L2-SP and EWC: every loss term equals a hand computation on a tiny model, replay draws the
stated share, the Fisher equals hand-computed squared mini-batch gradients, and resuming keeps each callback's state."""

from __future__ import annotations

import copy
import pickle

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks.callbacks.lora import LoRACallback
from peft_callbacks.callbacks.mitigation import (
    DistillationCallback,
    ReplayCallback,
    install_loss_term,
    remove_loss_term,
)
from peft_callbacks.callbacks.regularization import EWCCallback, L2SPCallback


class Net(L.LightningModule):
    """A generic network (no timm/transformers contract): backbone ``net.0`` → tanh → new 3-class head ``net.2``."""

    def __init__(self, lr: float = 0.3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def original_head() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(6, 5)  # the base task had 5 classes


def new_loader(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)), 4)


def base_data(n: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 5, (n,), generator=g))


def base_loader(n: int = 10, batch_size: int = 5) -> DataLoader:
    return DataLoader(base_data(n), batch_size=batch_size)


class Recorder(Callback):
    """Keeps, for the last step, the weights and batch it started from and the loss that was backpropagated."""

    def __init__(self) -> None:
        self.first_state: dict | None = None
        self.states, self.batches, self.losses = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = copy.deepcopy(pl_module.state_dict())
        self.first_state = self.first_state or state
        self.states.append(state)
        self.batches.append(batch)

    def on_before_backward(self, trainer, pl_module, loss):
        self.losses.append(loss.detach().clone())


def fit(module, callbacks, epochs=1, ckpt_path=None, **kwargs):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module, new_loader(), ckpt_path=ckpt_path)
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


def features(state: dict, x: torch.Tensor, lora_scaling: float | None = None) -> torch.Tensor:
    """tanh(net.0(x)) from a state dict, for a plain or a LoRA-adapted ``net.0``."""
    if lora_scaling is None:
        return torch.tanh(F.linear(x, state["net.0.weight"], state["net.0.bias"]))
    w = state["net.0.base_layer.weight"] + lora_delta(state, "net.0", lora_scaling)
    return torch.tanh(F.linear(x, w, state["net.0.base_layer.bias"]))


def user_loss(state: dict, batch, lora_scaling: float | None = None) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(F.linear(features(state, x, lora_scaling), state["net.2.weight"], state["net.2.bias"]), y)


# -- the wrapper ---------------------------------------------------------------------------------------------------
def test_the_wrapper_adds_terms_in_order_and_leaves_the_module_as_it_was():
    module = Net()
    own = module.training_step
    install_loss_term(module, "a", lambda loss, batch: loss + 1)
    install_loss_term(module, "b", lambda loss, batch: loss * 10)
    batch = next(iter(new_loader()))
    assert float(module.training_step(batch, 0)) == pytest.approx(10 * (float(own(batch, 0)) + 1))
    remove_loss_term(module, "a")
    remove_loss_term(module, "b")
    assert "training_step" not in module.__dict__ and module.training_step == own
    pickle.dumps(module)  # nothing of the wrapper is left


def test_manual_optimisation_is_refused():
    class Manual(Net):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="manual optimisation"):
        fit(Manual(), [L2SPCallback(weight=1.0)], max_steps=1)


# -- replay ----------------------------------------------------------------------------------------------------------
def test_replay_term_equals_hand_computation_and_draws_the_stated_share():
    head = original_head()
    recorder = Recorder()
    replay = ReplayCallback(base_loader(), fraction=0.5, base_head=head)  # 4 new examples per step -> 4 replayed
    fit(Net(), [recorder, replay], epochs=2)  # 4 steps: base examples 0-3, 4-7, 8-9 + 0-1, 2-5
    assert replay.drawn == replay.seen == 16
    data = base_data()
    order = [i % 10 for i in range(16)]
    for step, (state, batch, loss) in enumerate(zip(recorder.states, recorder.batches, recorder.losses)):
        x, y = data[order[4 * step : 4 * step + 4]]
        base = F.cross_entropy(F.linear(features(state, x), head.weight, head.bias), y)
        expected = 0.5 * user_loss(state, batch) + 0.5 * base  # the mean over the joint batch of 4 + 4
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    assert replay.last_term == pytest.approx(float(base), rel=1e-5)


@pytest.mark.parametrize(("fraction", "expected"), [(0.2, 0.2), (0.25, 0.25), (1 / 3, 1 / 3)])
def test_replay_share_over_many_steps(fraction, expected):
    from peft_callbacks.forgetting.replay import ReplayStream

    stream = ReplayStream(lambda: base_loader(), fraction=fraction)
    for _ in range(50):
        stream.draw(batch_size=7)
    assert stream.seen == 350
    assert abs(stream.drawn - 350 * expected / (1 - expected)) < 1  # carried over: never off by a whole example
    assert stream.drawn / (stream.drawn + stream.seen) == pytest.approx(expected, abs=1 / 400)


def test_replay_with_two_processes_splits_each_draw():
    from peft_callbacks.forgetting.replay import ReplayStream

    ranks = [ReplayStream(lambda: base_loader(), fraction=0.5, rank=r, world_size=2) for r in range(2)]
    single = ReplayStream(lambda: base_loader(), fraction=0.5)
    for _ in range(3):
        together = torch.cat([s.draw(batch_size=2)[0] for s in ranks])
        torch.testing.assert_close(together, single.draw(batch_size=4)[0])


# -- distillation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True])
def test_distillation_term_equals_hand_computation(lora):
    head = original_head()
    recorder = Recorder()
    lwf = DistillationCallback(weight=0.7, temperature=2.0, base_head=head)
    callbacks = [LoRACallback(rank=2, alpha=4, merge_on_train_end=False)] if lora else []
    fit(Net(), [*callbacks, recorder, lwf], max_steps=3)
    scaling = 2.0 if lora else None
    original = recorder.first_state
    for state, batch, loss in zip(recorder.states, recorder.batches, recorder.losses):
        x, _ = batch
        teacher = F.linear(features(original, x, scaling), head.weight, head.bias) / 2.0
        student = F.linear(features(state, x, scaling), head.weight, head.bias) / 2.0
        kl = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
        expected = user_loss(state, batch, scaling) + 0.7 * 4.0 * kl
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    assert lwf.last_term > 0


# -- L2-SP -------------------------------------------------------------------------------------------------------
def test_l2sp_full_fine_tuning_pulls_every_trained_tensor_but_the_new_head():
    recorder = Recorder()
    l2sp = L2SPCallback(weight=0.5, base_head=original_head())
    fit(Net(), [recorder, l2sp], max_steps=3)
    start = recorder.first_state
    for state, batch, loss in zip(recorder.states, recorder.batches, recorder.losses):
        squares = sum((state[k] - start[k]).pow(2).sum() for k in ("net.0.weight", "net.0.bias"))
        torch.testing.assert_close(loss, user_loss(state, batch) + 0.25 * squares, rtol=1e-5, atol=1e-7)
    assert l2sp.last_term > 0


def test_l2sp_on_lora_is_the_norm_of_the_weight_update_and_includes_a_shared_head():
    recorder = Recorder()
    l2sp = L2SPCallback(weight=0.5)  # no base_head: the head is the base task's too, so it is pulled back as well
    fit(Net(), [LoRACallback(rank=2, alpha=4, merge_on_train_end=False), recorder, l2sp], max_steps=3)
    start = recorder.first_state
    for state, batch, loss in zip(recorder.states[1:], recorder.batches[1:], recorder.losses[1:]):
        delta = lora_delta(state, "net.0", 2.0)  # s·B·A
        head = sum((state[k] - start[k]).pow(2).sum() for k in ("net.2.weight", "net.2.bias"))
        expected = user_loss(state, batch, 2.0) + 0.25 * (delta.pow(2).sum() + head)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
        assert delta.abs().sum() > 0


# -- EWC ---------------------------------------------------------------------------------------------------------
def hand_fisher(weight: torch.Tensor, bias: torch.Tensor, head: nn.Linear, loader: DataLoader) -> list[torch.Tensor]:
    """Mean over batches of the squared gradient of the batch's mean cross-entropy w.r.t. (weight, bias)."""
    total = [torch.zeros_like(weight), torch.zeros_like(bias)]
    batches = 0
    for x, y in loader:
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        loss = F.cross_entropy(F.linear(torch.tanh(F.linear(x, w, b)), head.weight, head.bias), y)
        for t, g in zip(total, torch.autograd.grad(loss, [w, b])):
            t += g.pow(2)
        batches += 1
    return [t / batches for t in total]


@pytest.mark.parametrize("lora", [False, True])
def test_ewc_fisher_and_penalty_equal_hand_computation(lora):
    head = original_head()
    recorder = Recorder()
    ewc = EWCCallback(base_loader(batch_size=3), weight=2.0, base_head=head, normalize=not lora)
    callbacks = [LoRACallback(rank=2, alpha=4, merge_on_train_end=False)] if lora else []
    fit(Net(), [*callbacks, recorder, ewc], max_steps=3)
    start = recorder.first_state
    prefix = "net.0.base_layer." if lora else "net.0."
    f_weight, f_bias = hand_fisher(start[prefix + "weight"], start[prefix + "bias"], head, base_loader(batch_size=3))
    torch.testing.assert_close(ewc.fisher["net.0.weight"], f_weight, rtol=1e-5, atol=1e-9)
    if lora:  # the Fisher is over the adapted layer's weight W; its (frozen) bias does not change
        assert set(ewc.fisher) == {"net.0.weight"}
    else:
        torch.testing.assert_close(ewc.fisher["net.0.bias"], f_bias, rtol=1e-5, atol=1e-9)
        assert set(ewc.fisher) == {"net.0.weight", "net.0.bias"}  # the new head has none
    scale = 1.0 if lora else (f_weight.numel() + f_bias.numel()) / float(f_weight.sum() + f_bias.sum())
    for state, batch, loss in zip(recorder.states[1:], recorder.batches[1:], recorder.losses[1:]):
        if lora:
            delta = lora_delta(state, "net.0", 2.0)
            penalty = (f_weight * delta.pow(2)).sum()
        else:
            penalty = (f_weight * (state["net.0.weight"] - start["net.0.weight"]).pow(2)).sum()
            penalty = penalty + (f_bias * (state["net.0.bias"] - start["net.0.bias"]).pow(2)).sum()
        expected = user_loss(state, batch, 2.0 if lora else None) + 0.5 * 2.0 * scale * penalty
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-8)


def test_labels_outside_the_head_name_the_labels_and_the_head():
    base = DataLoader(TensorDataset(torch.randn(4, 4), torch.tensor([0, 1, 4, 7])), batch_size=4)
    with pytest.raises(ValueError, match=r"labels \[4, 7\] are outside the 3 classes .* pass the original head"):
        fit(Net(), [ReplayCallback(base, fraction=0.5)], max_steps=1)
    with pytest.raises(ValueError, match=r"labels \[7\] are outside the 5 classes .*`base_head`"):
        fit(Net(), [EWCCallback(base, base_head=original_head())], max_steps=1)


# -- resume ----------------------------------------------------------------------------------------------------------
def make_callback(kind: str):
    head = original_head()
    return {
        "replay": lambda: ReplayCallback(base_loader(n=7, batch_size=3), fraction=0.4, base_head=head),
        "distillation": lambda: DistillationCallback(weight=0.5, base_head=head),
        "l2sp": lambda: L2SPCallback(weight=0.5, base_head=head),
        "ewc": lambda: EWCCallback(base_loader(), weight=1.0, base_head=head),
    }[kind]()


@pytest.mark.parametrize("kind", ["replay", "distillation", "l2sp", "ewc"])
def test_resume_keeps_the_state_and_ends_where_an_uninterrupted_run_ends(kind, tmp_path):
    straight = Net()
    fit(straight, [make_callback(kind)], epochs=3)

    first = make_callback(kind)
    fit(Net(), [first, ModelCheckpoint(dirpath=str(tmp_path), save_last=True)], epochs=1)
    resumed, second = Net(), make_callback(kind)
    torch.manual_seed(5)  # a resumed run starts from other weights until the checkpoint is loaded
    fit(resumed, [second, ModelCheckpoint(dirpath=str(tmp_path), save_last=True)], epochs=3, ckpt_path="last")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    restored = pickle.loads(pickle.dumps(second))
    assert type(restored) is type(second)
    if kind == "replay":  # 6 steps of 4 new examples at 40%: 16 replayed in all, counted across the resume
        assert (second.drawn, second.seen) == (16, 24)


def test_a_missing_base_loader_is_named():
    with pytest.raises(ValueError, match=r"`dataloader`='base_train_dataloader' names no method or attribute of Net"):
        fit(Net(), [ReplayCallback("base_train_dataloader")], max_steps=1)
    with pytest.raises(ValueError, match=r"`dataloader`='base_train_dataloader' names no method or attribute of Net"):
        fit(Net(), [EWCCallback("base_train_dataloader")], max_steps=1)
    with pytest.raises(TypeError, match="`dataloader` must be a DataLoader"):
        ReplayCallback(None)
    with pytest.raises(ValueError, match=r"`fraction` must be in \(0.0, 1.0\), got 1.0"):
        ReplayCallback(base_loader(), fraction=1.0)
    with pytest.raises(ValueError, match="`weight` must be in"):
        L2SPCallback(weight=0)
