"""The freezing callbacks keep their own record of the optimizer's param groups (no ``BaseFinetuning`` internals):
a run resumed through ``ModelCheckpoint`` + ``ckpt_path`` follows the uninterrupted run exactly, for every freezing
schedule, whether Lightning restores the checkpoint before ``on_fit_start`` or after it (as FSDP, DeepSpeed and FSDP2
do), and checkpoints written when the callbacks subclassed ``BaseFinetuning`` resume the same way."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks.finetuning import BackboneFinetuning
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader, TensorDataset
from zoo import TIMM_MODELS

from peft_callbacks import FreezeBackbone, HeadThenFull, LayerwiseUnfreezing
from peft_callbacks.callbacks.freezing import may_unfreeze

pytestmark = pytest.mark.filterwarnings("ignore:Checkpoint directory")

SCHEDULES = {
    "FreezeBackbone": lambda: FreezeBackbone(freeze=2),
    "LayerwiseUnfreezing": lambda: LayerwiseUnfreezing(lr_decay=0.5),
    "HeadThenFull": lambda: HeadThenFull(head_epochs=1, lr_multiplier=0.5),
}


class ViT(L.LightningModule):
    """A two-block DeiT (four layers: embeddings, two blocks, head) trained with AdamW and a decaying learning rate."""

    def __init__(self) -> None:
        super().__init__()
        self.model, _ = TIMM_MODELS["deit"]()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.01)  # its state must resume too
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.9**epoch)]


class LateRestore(SingleDeviceStrategy):
    """Restores the checkpoint after ``on_fit_start``, inside ``strategy.load_checkpoint`` (as FSDP2 does)."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


class Recorder(Callback):
    """At each epoch start, after the freezing callback: what trains and the optimizer's groups (names, lr)."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        groups = [(sorted(names[id(p)] for p in g["params"]), g["lr"]) for g in trainer.optimizers[0].param_groups]
        trainable = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)
        self.epochs[trainer.current_epoch] = {"trainable": trainable, "groups": groups}


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)), 4)


def fit(schedule: str, folder, *, late: bool = False, ckpt_path=None) -> tuple[ViT, Recorder]:
    torch.manual_seed(0)
    module, recorder = ViT(), Recorder()
    checkpoints = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = L.Trainer(
        max_epochs=4,
        callbacks=[SCHEDULES[schedule](), recorder, checkpoints],
        strategy=LateRestore("cpu") if late else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data(), ckpt_path=ckpt_path)
    return module, recorder


def assert_same_trajectory(full: tuple[ViT, Recorder], resumed: tuple[ViT, Recorder]) -> None:
    (full_module, full_rec), (resumed_module, resumed_rec) = full, resumed
    assert sorted(resumed_rec.epochs) == [2, 3]
    for epoch in (2, 3):
        assert resumed_rec.epochs[epoch]["trainable"] == full_rec.epochs[epoch]["trainable"]
        full_groups, resumed_groups = full_rec.epochs[epoch]["groups"], resumed_rec.epochs[epoch]["groups"]
        assert [names for names, _ in resumed_groups] == [names for names, _ in full_groups]
        assert [lr for _, lr in resumed_groups] == pytest.approx([lr for _, lr in full_groups], rel=1e-9)
    expected, actual = full_module.state_dict(), resumed_module.state_dict()
    for name, value in expected.items():
        atol = 1e-6 * max(value.abs().max().item(), 1.0)
        torch.testing.assert_close(actual[name], value, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("late", [False, True], ids=["restored-before-fit-start", "restored-in-load-checkpoint"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_resume_follows_the_uninterrupted_run(tmp_path, schedule, late):
    full = fit(schedule, tmp_path / "full")
    groups = [len(g) for g in (full[1].epochs[e]["groups"] for e in range(4))]
    assert (
        groups
        == {"FreezeBackbone": [1] * 4, "LayerwiseUnfreezing": [1, 2, 3, 4], "HeadThenFull": [1, 2, 2, 2]}[schedule]
    )  # the schedule did add param groups (or, for FreezeBackbone, kept one)
    resumed = fit(schedule, tmp_path / "resumed", late=late, ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    assert_same_trajectory(full, resumed)


def test_the_saved_groups_are_plain_data(tmp_path):
    fit("LayerwiseUnfreezing", tmp_path)
    state = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)["callbacks"]["LayerwiseUnfreezing"]
    assert "internal_optimizer_metadata" not in state
    (groups,) = state["optimizer_groups"]  # one optimizer
    assert [g["params"][:1] for g in groups] == [["model.head.weight"], ["model.blocks.1.norm1.weight"]]
    assert all(isinstance(name, str) for g in groups for name in g["params"])
    assert [g["initial_lr"] for g in groups] == [0.01, 0.005]  # the unfrozen layer's group at half the rate


@pytest.mark.parametrize("schedule", ["LayerwiseUnfreezing", "HeadThenFull"])
def test_a_checkpoint_in_the_base_finetuning_layout_resumes(tmp_path, schedule):
    """Checkpoints written before this callback kept its own record: Lightning's ``BaseFinetuning`` state held the
    groups as ``internal_optimizer_metadata`` (optimizer index -> groups, parameters by name), next to ``frozen``."""
    full = fit(schedule, tmp_path)
    path = tmp_path / "epoch=1.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"][schedule]
    state["internal_optimizer_metadata"] = dict(enumerate(state.pop("optimizer_groups")))
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    assert_same_trajectory(full, fit(schedule, tmp_path / "resumed", ckpt_path=old))


def test_unfreezing_schedules_are_told_apart_from_fixed_freezing():
    """L2-SP and EWC look for a callback that may unfreeze tensors while training: the schedules here, and any
    ``BaseFinetuning`` callback of the user's, but not ``FreezeBackbone``."""
    assert [may_unfreeze(SCHEDULES[name]()) for name in SCHEDULES] == [False, True, True]
    assert may_unfreeze(BackboneFinetuning(unfreeze_backbone_at_epoch=1))
