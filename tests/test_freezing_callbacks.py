"""FreezeBackbone / HeadOnly / LayerwiseUnfreezing / HeadThenFull inside trainer.fit: schedules, resume, LoRA."""

import pickle

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from zoo import HF_MODELS, TIMM_MODELS, run

from peft_callbacks import (
    FreezeBackbone,
    HeadOnly,
    HeadThenFull,
    LayerwiseUnfreezing,
    LoRACallback,
    split_layers,
)
from peft_callbacks.core.targets import in_subtree
from peft_callbacks.methods.lora import lora_layers


class Task(L.LightningModule):
    def __init__(self, family="timm", name="resnet", lr=0.1, scheduler=False, adam=False):
        super().__init__()
        builders = TIMM_MODELS if family == "timm" else HF_MODELS
        self.model, self.example = builders[name]()
        self.model.train()  # the zoo builds transformers models in eval mode
        self.lr, self.scheduler, self.adam = lr, scheduler, adam

    def training_step(self, batch, batch_idx):
        x, y = batch
        inputs = {"x": x} if "x" in self.example else {"input_ids": x}
        return torch.nn.functional.cross_entropy(run(self.model, inputs), y)

    def configure_optimizers(self):
        optimizer = (torch.optim.AdamW if self.adam else torch.optim.SGD)(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return optimizer
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.9**epoch)]


def _data(family="timm"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g) if family == "timm" else torch.randint(3, 99, (8, 7), generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (8,), generator=g)), batch_size=4)


class Recorder(Callback):
    """At each epoch start (after the freezing callback ran): the frozen set and the optimizer's param groups."""

    def __init__(self):
        self.epochs = {}

    def on_fit_start(self, trainer, pl_module):
        self.fit_start = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)

    def on_train_epoch_start(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        groups = [
            (sorted(names[id(p)] for p in g["params"]), round(g["lr"], 10)) for g in trainer.optimizers[0].param_groups
        ]
        trainable = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)
        self.epochs[trainer.current_epoch] = {"trainable": trainable, "groups": groups}


def _fit(module, callbacks, epochs, family="timm", tmp_path=None, ckpt_path=None):
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, _data(family), ckpt_path=ckpt_path)
    return trainer


def _layer_params(module, index):
    return sorted("model." + n for n in split_layers(module.model)[index].parameters)


def test_layerwise_unfreezing_schedule_and_groups():
    module, recorder = Task(), Recorder()
    _fit(module, [LayerwiseUnfreezing(every_n_epochs=2, lr_decay=0.5), recorder], epochs=5)
    head, layer4, layer3 = (_layer_params(module, i) for i in (5, 4, 3))
    seen = recorder.epochs
    assert seen[0]["trainable"] == seen[1]["trainable"] == head
    assert seen[0]["groups"] == seen[1]["groups"] == [(head, 0.1)]  # frozen parameters left the optimizer
    assert seen[2]["trainable"] == seen[3]["trainable"] == sorted(head + layer4)
    assert seen[2]["groups"] == [(head, 0.1), (layer4, 0.05)]
    assert seen[4]["groups"] == [(head, 0.1), (layer4, 0.05), (layer3, 0.025)]
    assert all(p.requires_grad for p in module.parameters())  # restored when training ends


@pytest.mark.filterwarnings("ignore:Checkpoint directory")
def test_resume_mid_schedule_equals_uninterrupted_run(tmp_path):
    def make():
        torch.manual_seed(0)
        return Task(lr=0.01, scheduler=True, adam=True), Recorder()  # AdamW: its state must resume too

    def checkpoints():
        return ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")

    full, full_rec = make()
    _fit(full, [LayerwiseUnfreezing(lr_decay=0.5), full_rec, checkpoints()], epochs=4, tmp_path=tmp_path)
    resumed, resumed_rec = make()
    ckpt = str(tmp_path / "epoch=1.ckpt")
    callbacks = [LayerwiseUnfreezing(lr_decay=0.5), resumed_rec, checkpoints()]
    trainer = _fit(resumed, callbacks, 4, tmp_path=tmp_path, ckpt_path=ckpt)
    assert sorted(resumed_rec.epochs) == [2, 3]
    assert resumed_rec.fit_start == full_rec.epochs[1]["trainable"]  # the frozen set comes back before epoch 2
    for epoch in (2, 3):
        assert resumed_rec.epochs[epoch] == full_rec.epochs[epoch]
    assert len(full_rec.epochs[3]["groups"]) == 4  # head + three unfrozen layers, lr following the schedule
    lrs = [lr for _, lr in full_rec.epochs[3]["groups"]]
    assert lrs == pytest.approx([0.01 * 0.9**3 * 0.5**d for d in range(4)])
    assert len(trainer.lr_scheduler_configs[0].scheduler.base_lrs) == 4
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_head_then_full_with_lr_multiplier():
    module, recorder = Task("hf", "bert"), Recorder()
    _fit(module, [HeadThenFull(head_epochs=1, lr_multiplier=0.1), recorder], epochs=2, family="hf")
    head = sorted("model." + n for n, _ in module.model.classifier.named_parameters(prefix="classifier"))
    assert recorder.epochs[0]["trainable"] == head
    everything = sorted(n for n, _ in module.named_parameters())
    assert recorder.epochs[1]["trainable"] == everything
    assert recorder.epochs[1]["groups"] == [(head, 0.1), (sorted(set(everything) - set(head)), 0.01)]


def test_head_then_full_with_lora_trains_lora_factors_not_base_weights():
    module, recorder = Task("hf", "bert"), Recorder()
    callbacks = [HeadThenFull(head_epochs=1), LoRACallback(rank=2, merge_on_train_end=False), recorder]
    _fit(module, callbacks, epochs=2, family="hf")
    lora = sorted(n for n, _ in module.named_parameters() if ".lora_" in n)
    head = [n for n, _ in module.named_parameters() if n.startswith("model.classifier.")]
    assert recorder.epochs[0]["trainable"] == sorted(head)
    assert recorder.epochs[1]["trainable"] == sorted(head + lora)
    assert recorder.epochs[1]["groups"][1][0] == lora


@pytest.mark.parametrize("lora_first", [False, True])
def test_freeze_backbone_with_lora_trains_lora_in_top_layers_only(lora_first):
    module, recorder = Task("timm", "deit"), Recorder()  # layers: embeddings, blocks.0, blocks.1 + norm, head
    freeze, lora = FreezeBackbone(freeze=2), LoRACallback(rank=2, merge_on_train_end=False)
    _fit(module, [lora, freeze, recorder] if lora_first else [freeze, lora, recorder], epochs=1)
    trainable = recorder.epochs[0]["trainable"]
    assert trainable and all(n.startswith(("model.blocks.1.", "model.head.")) for n in trainable)
    names = {id(p): n for n, p in module.named_parameters()}
    lora_in_top_block = {  # by identity: the tensors of the LoRA adapters on blocks.1's layers
        names[id(p)]
        for path, layer in lora_layers(module.model).items()
        if in_subtree(path, ["blocks.1"])
        for p in layer.adapters.parameters()
    }
    assert lora_in_top_block and {n for n in trainable if n.startswith("model.blocks.")} == lora_in_top_block
    assert any(p.startswith("blocks.0") for p in lora_layers(module.model))  # present, frozen


def test_head_only_with_lora_is_refused():
    module = Task("timm", "resnet")
    with pytest.raises(ValueError, match="would freeze every LoRA/adapter parameter"):
        _fit(module, [LoRACallback(rank=2), HeadOnly()], epochs=1)


def test_head_only_keeps_frozen_batchnorm_statistics():
    module = Task("timm", "resnet")
    before = {n: t.clone() for n, t in module.state_dict().items()}
    callback = HeadOnly()
    _fit(module, [callback], epochs=1)
    after = module.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"model.fc.weight", "model.fc.bias"}  # running statistics included
    assert callback.parameter_count.trainable == sum(p.numel() for p in module.model.fc.parameters())


def test_callbacks_pickle_and_validate():
    for callback in (FreezeBackbone(3), HeadOnly(), LayerwiseUnfreezing(), HeadThenFull()):
        assert type(pickle.loads(pickle.dumps(callback))) is type(callback)
    with pytest.raises(ValueError, match=r"`every_n_epochs` must be an int >= 1, got -1"):
        LayerwiseUnfreezing(every_n_epochs=-1)
    with pytest.raises(ValueError, match=r"`lr_decay` must be in \(0.0, 1.0\], got 1.5"):
        LayerwiseUnfreezing(lr_decay=1.5)
    with pytest.raises(ValueError, match=r"`lr_decay` must be in \(0.0, 1.0\], got 0.0"):
        LayerwiseUnfreezing(lr_decay=0)
    with pytest.raises(ValueError, match=r"`head_epochs` must be an int >= 1, got -2"):
        HeadThenFull(head_epochs=-2)
    with pytest.raises(ValueError, match=r"`lr_multiplier` must be in \(0.0, inf\]"):
        HeadThenFull(lr_multiplier=0.0)
    with pytest.raises(ValueError, match=r"`freeze` must be an int >= 1, got 0"):
        FreezeBackbone(freeze=0)
    with pytest.raises(TypeError, match=r"`freeze` must be a number of layers"):
        FreezeBackbone(freeze=True)
    with pytest.raises(ValueError, match=r"`freeze`=9 but ResNet has 6 layers"):
        _fit(Task(), [FreezeBackbone(freeze=9)], epochs=1)


def test_two_freezing_callbacks_are_refused():
    with pytest.raises(ValueError, match="cannot be combined with HeadThenFull"):
        _fit(Task(), [FreezeBackbone(2), HeadThenFull()], epochs=1)


def test_callbacks_build_from_cli_arguments():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(FreezeBackbone, "freezing")
    cases = [("3", 3), ("backbone", "backbone"), ("[blocks.0, patch_embed]", ["blocks.0", "patch_embed"])]
    for value, expected in cases:
        config = parser.parse_args([f"--freezing.freeze={value}"])
        assert FreezeBackbone(**config.freezing.as_dict()).freeze == expected
