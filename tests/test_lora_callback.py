"""``LoRACallback`` in real Lightning fits, on unchanged LightningModules."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from process_group import ReleaseProcessGroup
from torch.utils.data import DataLoader, TensorDataset
from zoo import HF_MODELS

from peft_callbacks import LoRACallback, lora_layers


def image_data(n: int = 16, size: int = 32, classes: int = 3, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def text_data(n: int = 16, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (n, 8), generator=gen)
    return DataLoader(TensorDataset(ids, torch.randint(0, 3, (n,), generator=gen)), batch_size=batch_size)


class ImageClassifier(L.LightningModule):
    """A plain user module: nothing in it knows about LoRA."""

    def __init__(self, name: str = "test_resnet", build_in: str = "init"):
        super().__init__()
        self.name, self.build_in = name, build_in
        if build_in == "init":
            self.model = self._build()

    def _build(self):
        torch.manual_seed(0)
        return timm.create_model(self.name, pretrained=False, num_classes=3)

    def setup(self, stage):
        if self.build_in == "setup" and not hasattr(self, "model"):
            self.model = self._build()

    def configure_model(self):
        if self.build_in == "configure_model" and not hasattr(self, "model"):
            self.model = self._build()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.model(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class TextClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = HF_MODELS["bert"]()[0]

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return self.encoder(input_ids=ids, labels=y).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path: Path, callbacks, **kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


def test_timm_fit_trains_lora_then_merges_into_a_plain_model(tmp_path):
    module = ImageClassifier()
    keys = list(module.state_dict())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    lora = LoRACallback(rank=4)
    logger = CSVLogger(tmp_path)
    trainer(tmp_path, [lora], logger=logger, max_steps=3, log_every_n_steps=1).fit(module, image_data())

    assert not lora_layers(module)
    assert list(module.state_dict()) == keys
    assert type(module.model.conv1[0]) is nn.Conv2d
    assert not torch.equal(module.model.conv1[0].weight, before["model.conv1.0.weight"])  # merged update
    count = lora.parameter_count
    assert 0 < count.trainable < count.total and count.percent < 25
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("peft/") and v}
    assert logged["peft/trainable_params"] == count.trainable
    assert logged["peft/total_params"] == count.total


def test_hf_fit_with_unchanged_module(tmp_path):
    module = TextClassifier()
    lora = LoRACallback(rank=2, target_modules=["query", "value"], merge_on_train_end=False)
    trainer(tmp_path, [lora], max_steps=2).fit(module, text_data())
    assert sorted(lora_layers(module)) == [
        f"encoder.bert.encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")
    ]
    assert module.encoder.classifier.weight.requires_grad  # the new task head trains in full


def test_frozen_base_weights_bit_identical_after_training(tmp_path):
    module = ImageClassifier("test_vit")
    base = {k: v.clone() for k, v in module.model.state_dict().items() if not k.startswith("head")}
    trainer(tmp_path, [LoRACallback(rank=4, merge_on_train_end=False)], max_steps=3).fit(module, image_data(size=160))
    state = module.model.state_dict()
    for key, value in base.items():
        adapted_key = (
            key if key in state else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(state[adapted_key], value), key
    assert any(layer.adapters["default"].lora_B.weight.abs().sum() > 0 for layer in lora_layers(module).values())


@pytest.mark.parametrize("build_in", ["setup", "configure_model"])
def test_network_built_in_setup_or_configure_model(tmp_path, build_in):
    module = ImageClassifier(build_in=build_in)
    lora = LoRACallback(rank=2, merge_on_train_end=False)
    trainer(tmp_path, [lora], max_steps=2).fit(module, image_data())
    assert lora_layers(module)
    assert "configure_model" not in module.__dict__  # the scheduling hook removed itself
    pickle.dumps(module)


def test_user_head_outside_the_backbone_stays_trainable(tmp_path):
    class WithOwnHead(ImageClassifier):
        def __init__(self):
            super().__init__()
            self.model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
            self.head = nn.Linear(self.model.num_features, 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.head(self.model(x)), y)

    module = WithOwnHead()
    trainer(tmp_path, [LoRACallback(rank=2, merge_on_train_end=False)], max_steps=1).fit(module, image_data())
    assert module.head.weight.requires_grad and lora_layers(module.model)


def test_batchnorm_statistics_stay_frozen_unless_train_bn(tmp_path):
    for train_bn in (False, True):
        module = ImageClassifier()
        bn = module.model.conv1[1]
        stats = bn.running_mean.clone()
        lora = LoRACallback(rank=2, train_bn=train_bn, merge_on_train_end=False)
        trainer(tmp_path, [lora], max_steps=2).fit(module, image_data())
        assert torch.equal(bn.running_mean, stats) is (not train_bn)
        assert bn.weight.requires_grad is train_bn
        assert bn.training  # the module's own train/eval mode is left alone
        lora.finalize(None, module)
        assert not hasattr(bn, "_peft_frozen_stats_hook")  # a plain model after training


def test_resume_continues_lora_training(tmp_path):
    def run(max_epochs, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        module = ImageClassifier()
        t = trainer(
            tmp_path,
            [LoRACallback(rank=2, merge_on_train_end=False), *callbacks],
            max_epochs=max_epochs,
            enable_checkpointing=bool(callbacks),
        )
        t.fit(module, image_data(), ckpt_path=ckpt_path)
        return module

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    run(1, callbacks=[checkpoint])
    resumed = run(2, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    straight = run(2)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    assert lora_layers(resumed)


def test_test_from_best_checkpoint_after_merge(tmp_path):
    module = ImageClassifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    t = trainer(tmp_path, [LoRACallback(rank=2), checkpoint], max_epochs=2, enable_checkpointing=True)
    t.fit(module, image_data(), image_data())
    assert not lora_layers(module)
    with torch.no_grad():  # the module's weights now differ from every checkpoint's
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    results = t.test(module, image_data(), ckpt_path="best")  # the checkpoint holds LoRA factors
    # the test and validation data are the same: the loss of the best checkpoint's weights, LoRA factors and all
    assert results[0]["test_loss"] == pytest.approx(checkpoint.best_model_score.item(), rel=1e-5)
    assert not lora_layers(module)  # merged again after testing


def test_second_fit_injects_fresh_lora(tmp_path):
    module = ImageClassifier()
    lora = LoRACallback(rank=2)
    for _ in range(2):
        trainer(tmp_path, [lora], max_steps=1).fit(module, image_data())
        assert not lora_layers(module)


def test_callback_pickles_before_and_after_fit(tmp_path):
    lora = LoRACallback(rank=2, target_modules=["conv1"], merge_on_train_end=False)
    pickle.loads(pickle.dumps(lora))
    trainer(tmp_path, [lora], max_steps=1).fit(ImageClassifier(), image_data())
    restored = pickle.loads(pickle.dumps(lora))
    assert restored.state_dict() == lora.state_dict()
    assert restored.state_dict()["config"]["rank"] == 2


def test_module_argument_narrows_and_validates(tmp_path):
    with pytest.raises(ValueError, match=r"`module`='backbone' is not a submodule of ImageClassifier.*model"):
        trainer(tmp_path, [LoRACallback(module="backbone")], max_steps=1).fit(ImageClassifier(), image_data())


def test_ddp_two_processes_gloo(tmp_path):
    # spawn, not fork: a child forked after the parent's OpenMP thread pool exists can hang in its first parallel op
    module = ImageClassifier()
    keys = list(module.state_dict())
    lora = LoRACallback(rank=2, save_adapter_to=str(tmp_path / "adapter"))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="ddp", every_n_train_steps=2)
    t = trainer(
        tmp_path,
        [lora, checkpoint, ReleaseProcessGroup()],
        strategy="ddp_spawn",
        devices=2,
        max_steps=2,
        enable_checkpointing=True,
    )
    t.fit(module, image_data())
    # no "unused parameters" error; each rank merged; rank zero alone wrote the adapter file and the checkpoint
    assert list(module.state_dict()) == keys and not lora_layers(module)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "ddp.ckpt")  # the plain model
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_logged_count_reflects_freezing_done_after_lora(tmp_path):
    from peft_callbacks import FreezeBackbone, count_parameters

    counts = {}

    class Probe(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            counts["actual"] = count_parameters(pl_module).trainable

    lora = LoRACallback(rank=2, merge_on_train_end=False)
    trainer(tmp_path, [lora, FreezeBackbone(freeze=3), Probe()], max_steps=1).fit(ImageClassifier(), image_data())
    assert lora.parameter_count.trainable == counts["actual"]
