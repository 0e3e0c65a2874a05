"""A headless backbone (timm ``num_classes=0``, a transformers base model) with the LightningModule's own head: the
base task is scored through the module's ``forward`` (or ``forward_fn`` / ``base_head``), never by taking the
backbone's pooled features as class scores; without any of them every base-task callback refuses, naming what to pass.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks.callbacks.forgetting import ForgettingMonitor
from peft_callbacks.callbacks.mitigation import DistillationCallback, ReplayCallback
from peft_callbacks.callbacks.regularization import EWCCallback
from peft_callbacks.demo import quiet_trainer
from peft_callbacks.forgetting.scoring import BaseTaskScorer

CLASSES = 10


class HeadlessModule(L.LightningModule):
    """The common pattern: a timm backbone built without a classifier, the head in the LightningModule."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)
        self.head = nn.Linear(self.backbone.num_features, CLASSES)
        self.lr = lr

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class NoForward(HeadlessModule):
    """The same model, but the head is applied inside ``training_step`` only: nothing says how to score."""

    forward = L.LightningModule.forward

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)


class FeaturesForward(HeadlessModule):
    """A ``forward`` that returns the backbone's features (an embedding model): not class scores."""

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self(x)), y)


def loader(n: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (n,), generator=g))
    return DataLoader(data, batch_size=4)


def first_batch(data: DataLoader):
    return next(iter(data))


def test_replay_scores_the_base_task_through_the_modules_own_head():
    module, base = HeadlessModule(), loader(seed=1)
    start = copy.deepcopy(module).train()
    replay = ReplayCallback(base, fraction=0.5)
    quiet_trainer(max_steps=1, callbacks=[replay]).fit(module, loader())
    x, y = first_batch(base)  # step 1 on 4 new examples replays the first 4 base examples
    with torch.no_grad():
        expected = F.cross_entropy(start(x), y)
    assert replay.last_term == pytest.approx(float(expected), rel=1e-5)
    # the scale of a 10-class loss, not of the backbone's 96 features taken as logits (ln 96 = 4.56)
    features = module.backbone.num_features
    assert abs(replay.last_term - math.log(CLASSES)) < abs(replay.last_term - math.log(features))


def test_monitor_scores_through_the_modules_head_and_reads_its_classes():
    module, base = HeadlessModule(), loader(seed=1)
    with torch.no_grad():
        logits = torch.cat([module.eval()(x) for x, _ in base])
    labels = torch.cat([y for _, y in base])
    expected = {
        "accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "loss": float(F.cross_entropy(logits, labels)),
    }
    for metric, value in expected.items():
        monitor = ForgettingMonitor(base, metric=metric, plot=False)
        quiet_trainer(max_steps=1, callbacks=[monitor]).fit(HeadlessModule(), loader())
        assert monitor.baseline == pytest.approx(value, rel=1e-5, abs=1e-7)
    assert monitor._scorers == {} and isinstance(monitor.latest["feature_cosine"], float)


def test_ewc_fisher_is_over_the_modules_head_and_the_base_task_loss():
    module, base = HeadlessModule(), loader(seed=1)
    start = copy.deepcopy(module).eval()
    ewc = EWCCallback(base, fisher_batches=1)
    quiet_trainer(max_steps=1, callbacks=[ewc]).fit(module, loader())
    x, y = first_batch(base)
    F.cross_entropy(start(x), y).backward()
    assert "head.weight" in ewc.fisher  # the module's head scores the base task, so it is held too
    expected = start.head.weight.grad.square()
    torch.testing.assert_close(ewc.fisher["head.weight"], expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


def test_base_head_is_applied_to_the_backbones_pooled_features(tmp_path):
    module, base = NoForward(), loader(seed=1)
    torch.manual_seed(5)
    original = nn.Linear(module.backbone.num_features, 7)
    x, y = first_batch(base)
    y = y % 7
    with torch.no_grad():
        expected = F.cross_entropy(original(module.backbone.eval()(x)), y)
    torch.save(original.state_dict(), tmp_path / "head.pt")
    for base_head in (original, str(tmp_path / "head.pt")):
        scorer = BaseTaskScorer(module, metric="loss", base_head=base_head, drift=False)
        assert scorer.num_classes == 7
        with torch.no_grad():
            assert float(scorer.loss((x, y))) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda base: ReplayCallback(base, fraction=0.5),
        lambda base: EWCCallback(base),
        lambda base: DistillationCallback(),
        lambda base: ForgettingMonitor(base, plot=False),
        lambda base: ForgettingMonitor(base, metric="loss", num_classes=CLASSES, plot=False),
    ],
    ids=["replay", "ewc", "distillation", "monitor", "monitor-loss"],
)
def test_without_a_head_to_score_through_every_callback_refuses(make):
    callback = make(loader(seed=1))
    with pytest.raises(ValueError, match=r"ResNet has no classifier.*forward_fn=.*base_head="):
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(NoForward(), loader())


def test_a_forward_returning_the_features_is_refused():
    with pytest.raises(ValueError, match=r"FeaturesForward.forward returns the features .*forward_fn=.*base_head="):
        quiet_trainer(max_steps=1, callbacks=[ReplayCallback(loader(seed=1))]).fit(FeaturesForward(), loader())


def test_label_free_drift_of_a_headless_model_still_works_on_its_features():
    scorer = BaseTaskScorer(NoForward(), metric=None)  # no class scores needed: no refusal
    first = scorer.score(loader(seed=1))
    assert first.feature_cosine == pytest.approx(1.0) and first.value is None


class TextNoForward(L.LightningModule):
    """A transformers base model (no task head) with the module's own head on the first token."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
        )
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(16, 3)


class Text(TextNoForward):
    def forward(self, input_ids):
        return self.head(self.encoder(input_ids=input_ids).last_hidden_state[:, 0])


def test_transformers_base_model_with_the_modules_own_head():
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 30, (4, 6), generator=g), "labels": torch.tensor([0, 1, 2, 0])}
    module = Text()
    scorer = BaseTaskScorer(module, metric="accuracy", drift=False)
    with torch.no_grad():
        expected = float((module.eval()(batch["input_ids"]).argmax(-1) == batch["labels"]).float().mean())
    assert scorer.score([batch]).value == pytest.approx(expected) and scorer.num_classes == 3
    with pytest.raises(ValueError, match=r"BertModel is a transformers base model without a task head.*forward_fn="):
        BaseTaskScorer(TextNoForward(), metric="accuracy")
