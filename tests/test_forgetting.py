"""ForgettingMonitor on real (tiny) fine-tunes: figures checked against hand computations on the same data."""

from __future__ import annotations

import copy
import os
import pickle

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from timm.models.mlp_mixer import MlpMixer
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks.callbacks.forgetting import ForgettingMonitor
from peft_callbacks.callbacks.lora import LoRACallback
from peft_callbacks.core.params import freeze, unfreeze


def mixer(num_classes: int) -> MlpMixer:
    torch.manual_seed(0)
    model = MlpMixer(num_classes=num_classes, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)
    nn.init.normal_(model.head.weight, std=0.3)  # timm zero-initialises heads; a "pretrained" one separates classes
    return model


def base_set(model: nn.Module, n: int = 24, agree: float = 1.0) -> DataLoader:
    """Base-task images labelled with ``model``'s own predictions (a share ``1 - agree`` deliberately wrong)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    training = model.training
    with torch.no_grad():
        logits = model.eval()(x)
    model.train(training)
    y = logits.argmax(-1)
    wrong = torch.arange(n) >= int(agree * n)
    y[wrong] = (y[wrong] + 1) % logits.shape[-1]
    return DataLoader(TensorDataset(x, y), batch_size=8)


def new_set(num_classes: int, n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, 32, 32, generator=g) * 2
    return DataLoader(TensorDataset(x, torch.randint(0, num_classes, (n,), generator=g)), batch_size=8)


class NewTask(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float = 0.5) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.model(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(module, callbacks, epochs=2, ckpt_path=None, val=True, **kwargs):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )
    num_classes = module.model.num_classes
    trainer.fit(module, new_set(num_classes), new_set(num_classes) if val else None, ckpt_path=ckpt_path)
    return trainer


def hand_outputs(model: nn.Module, head: nn.Module, loader: DataLoader):
    """Accuracy, log-probabilities and pooled features through timm's forward_features → forward_head → head."""
    training = model.training
    model.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in loader])
        y = torch.cat([b[1] for b in loader])
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)  # (N, 32)
        logits = head(pooled)
    model.train(training)
    return (logits.argmax(-1) == y).float().mean().item(), logits.log_softmax(-1), pooled


def hand_drift(before, after) -> tuple[float, float]:
    (_, logp0, feat0), (_, logp1, feat1) = before, after
    kl = (logp0.exp() * (logp0 - logp1)).sum(-1).mean().item()
    return kl, F.cosine_similarity(feat0, feat1, dim=-1).mean().item()


def test_full_fine_tuning_forgets_and_figures_match_hand_computation(tmp_path):
    model = mixer(4)
    base = base_set(model)
    before = hand_outputs(copy.deepcopy(model), model.head, base)
    monitor = ForgettingMonitor(base, metric="accuracy", plot_dir=str(tmp_path))
    trainer = fit(NewTask(model, lr=0.05), [monitor])
    assert all(m.training for m in model.modules())  # train mode restored after each check

    after = hand_outputs(model, model.head, base)
    rows = monitor.history
    assert [r["epoch"] for r in rows] == [0, 1, 2] and [r["step"] for r in rows] == [0, 2, 4]
    assert monitor.baseline == pytest.approx(before[0]) == 1.0
    assert rows[-1]["value"] == pytest.approx(after[0])
    forgetting = before[0] - after[0]
    assert forgetting > 0 and after[0] > 0  # partly forgotten
    assert rows[-1]["forgetting"] == pytest.approx(forgetting)
    assert rows[-1]["relative_drop_percent"] == pytest.approx(100 * forgetting / before[0])
    assert rows[-1]["max_forgetting"] == pytest.approx(max(r["forgetting"] for r in rows))
    kl, cosine = hand_drift(before, after)
    assert rows[-1]["kl_to_baseline"] == pytest.approx(kl, rel=1e-4) and kl > 0
    assert rows[-1]["feature_cosine"] == pytest.approx(cosine, rel=1e-5) and cosine < 1
    assert rows[0]["kl_to_baseline"] == pytest.approx(0, abs=1e-7)
    assert trainer.callback_metrics["forgetting/forgetting"].item() == pytest.approx(forgetting)
    assert monitor.val_metric == "val_acc" and rows[-1]["val_metric"] is not None
    assert monitor.plot_path == os.path.join(str(tmp_path), "forgetting.png") and os.path.getsize(monitor.plot_path)


def test_new_head_scored_through_original_head_drops_under_full_fine_tuning():
    original = mixer(10)
    base = base_set(original, agree=0.75)
    baseline_by_hand, *_ = hand_outputs(original, original.head, base)
    model = copy.deepcopy(original)
    model.reset_classifier(3)  # the new task's head; the original head is gone from the model
    monitor = ForgettingMonitor(base, base_head=original.get_classifier(), plot=False)
    fit(NewTask(model, lr=1.0), [monitor])

    assert monitor.baseline == pytest.approx(baseline_by_hand)
    now_by_hand, *_ = hand_outputs(model, original.head, base)
    assert monitor.latest["value"] == pytest.approx(now_by_hand)
    assert monitor.latest["value"] < monitor.baseline
    assert model.head.out_features == 3 and isinstance(model.head, nn.Linear)  # original head only lent for scoring


def test_frozen_backbone_with_new_head_forgets_nothing():
    original = mixer(10)
    base = base_set(original, agree=0.75)
    model = copy.deepcopy(original)
    model.reset_classifier(3)
    freeze(model)
    unfreeze(model.head)
    monitor = ForgettingMonitor(base, base_head=original.head, every_n_steps=1, every_n_epochs=None, plot=False)
    fit(NewTask(model), [monitor], epochs=1)

    assert len(monitor.history) == 3  # baseline + one check per step
    assert all(r["forgetting"] == 0 for r in monitor.history)
    assert monitor.latest["kl_to_baseline"] == pytest.approx(0, abs=1e-6)
    assert monitor.latest["feature_cosine"] == pytest.approx(1, abs=1e-6)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.head.parameters()}


@pytest.mark.parametrize("monitor_first", [True, False])
def test_with_lora_baseline_is_the_untouched_model_and_merge_order_does_not_matter(monitor_first, request):
    model = mixer(4)
    base = base_set(model, agree=0.75)
    before = hand_outputs(copy.deepcopy(model), model.head, base)
    monitor = ForgettingMonitor(base, every_n_epochs=None, plot=False)  # checks at start and at on_train_end only
    lora = LoRACallback(rank=4, alpha=8)
    fit(NewTask(model, lr=1.0), [monitor, lora] if monitor_first else [lora, monitor])

    assert monitor.baseline == pytest.approx(before[0])  # LoRA's B = 0 at fit start: still the original model
    assert monitor.history[0]["kl_to_baseline"] == pytest.approx(0, abs=1e-7)
    after = hand_outputs(model, model.head, base)  # LoRA merged: a plain model again
    kl, _ = hand_drift(before, after)
    assert len(monitor.history) == 2 and kl > 0
    assert monitor.latest["value"] == pytest.approx(after[0])
    assert monitor.latest["kl_to_baseline"] == pytest.approx(kl, rel=1e-4, abs=1e-7)


def test_resume_keeps_baseline_and_drift_reference(tmp_path):
    model = mixer(4)
    base = base_set(model)
    before = hand_outputs(copy.deepcopy(model), model.head, base)
    first = ForgettingMonitor(base, plot=False)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    fit(NewTask(model), [first, checkpoint], epochs=1)
    assert first.latest["forgetting"] > 0

    resumed_model = mixer(4)
    second = ForgettingMonitor(base, plot=False)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    fit(NewTask(resumed_model), [second, checkpoint], epochs=2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert second.baseline == first.baseline == pytest.approx(before[0])
    assert second.history[:2] == first.history
    assert [r["epoch"] for r in second.history] == [0, 1, 2]
    kl, cosine = hand_drift(before, hand_outputs(resumed_model, resumed_model.head, base))
    assert second.latest["kl_to_baseline"] == pytest.approx(kl, rel=1e-4)  # still measured from the original
    assert second.latest["feature_cosine"] == pytest.approx(cosine, rel=1e-5)


def test_stop_rule_stops_training_and_warn_rule_warns():
    model = mixer(4)
    base = base_set(model)
    stopper = ForgettingMonitor(base, every_n_steps=1, max_forgetting=0.0, on_exceed="stop", plot=False)
    trainer = fit(NewTask(model), [stopper], epochs=20, val=False)
    assert trainer.should_stop and trainer.global_step < 40
    assert stopper.latest["forgetting"] > 0
    assert "accuracy went from 1.0000 (baseline)" in stopper.stop_reason
    assert "max_forgetting=0.0" in stopper.stop_reason

    warner = ForgettingMonitor(base, max_forgetting=1.0, relative=True, plot=False)
    with pytest.warns(UserWarning, match=r"relative drop .*% > max_forgetting=1.0%"):
        trainer = fit(NewTask(mixer(4)), [warner], epochs=2, val=False)
    assert trainer.global_step == 4  # warn only: training ran to the end


def test_empty_or_shuffled_base_set_fails_at_fit_start_with_a_clear_error():
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="base-task `dataloader` yielded no batches"):
        fit(NewTask(mixer(4)), [ForgettingMonitor(empty, plot=False)], epochs=1, val=False)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffles; .* build it with shuffle=False"):
        fit(NewTask(mixer(4)), [ForgettingMonitor(shuffled, plot=False)], epochs=1, val=False)


class NamedBaseSet(NewTask):
    """Exposes the base set as a method, the way a YAML config names it (``dataloader: base_dataloader``)."""

    def __init__(self, model, base):
        super().__init__(model)
        self._base = base

    def base_dataloader(self):
        return self._base


class BaseDataModule(L.LightningDataModule):
    def __init__(self, loader):
        super().__init__()
        self.loader = loader

    def val_dataloader(self):
        return self.loader


def test_loader_sources_yaml_arguments_and_pickling(tmp_path):
    from jsonargparse import ArgumentParser

    original = mixer(10)
    base = base_set(original, agree=0.75)
    expected, *_ = hand_outputs(original, original.head, base)
    head_file = tmp_path / "original.pt"
    torch.save(original.state_dict(), head_file)

    parser = ArgumentParser()
    parser.add_class_arguments(ForgettingMonitor, "forgetting")
    config = parser.parse_args(
        ["--forgetting.dataloader=base_dataloader", f"--forgetting.base_head={head_file}", "--forgetting.plot=false"]
    )
    from_yaml = parser.instantiate(config).forgetting
    from_datamodule = ForgettingMonitor(BaseDataModule(base), base_head=original, drift=False, plot=False)
    from_callable = ForgettingMonitor(
        lambda: base, base_head=original.head, forward_fn=lambda module, batch: module.model(batch[0]), plot=False
    )
    for monitor in (from_yaml, from_datamodule, from_callable):
        model = copy.deepcopy(original)
        model.reset_classifier(3)
        fit(NamedBaseSet(model, base), [monitor], epochs=1, val=False, limit_train_batches=1)
        assert monitor.baseline == pytest.approx(expected)
    assert ForgettingMonitor(base, prefix="forgetting_imagenet").state_key != from_yaml.state_key
    restored = pickle.loads(pickle.dumps(from_yaml))
    assert restored.history == from_yaml.history and restored.base_head == str(head_file)
