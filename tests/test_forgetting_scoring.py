"""Base-task scoring without a Trainer: transformers heads, language models, saved heads, modes and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.functional.classification import multiclass_f1_score
from zoo import HF_MODELS, VOCAB

from peft_callbacks.callbacks.forgetting import ForgettingMonitor, _named_source
from peft_callbacks.forgetting import BaseTaskScorer, split_batch


def text_batches(num_labels: int, n: int = 12, batch_size: int = 4, label_key: str = "labels") -> list[dict]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (n, 7), generator=g)
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[::3, -2:] = 0
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return [
        {"input_ids": ids[i : i + batch_size], "attention_mask": mask[i : i + batch_size], label_key: labels[i : i + 4]}
        for i in range(0, n, batch_size)
    ]


def pretrained(name: str, num_labels: int, head: str) -> nn.Module:
    original, _ = HF_MODELS[name](num_labels)
    nn.init.normal_(getattr(original, head).weight)  # a trained head separates classes; HF initialises it near 0
    return original


def label_with(model: nn.Module, batches: list[dict]) -> list[dict]:
    """Base labels = the original model's own predictions, so its base accuracy is 1."""
    with torch.no_grad():
        for b in batches:
            b[next(k for k in ("labels", "label") if k in b)] = model(
                b["input_ids"], b["attention_mask"]
            ).logits.argmax(-1)
    return batches


def fine_tuned(original: nn.Module, base: str, head: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``original`` with a new 2-class head and a perturbed backbone (a stand-in for fine-tuning)."""
    model = copy.deepcopy(original)
    for name, module in head.items():
        setattr(model, name, module)
    torch.manual_seed(6)
    with torch.no_grad():
        for p in getattr(model, base).parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def accuracy_of(logits_fn, batches) -> float:
    with torch.no_grad():
        hits = [(logits_fn(b).argmax(-1) == b.get("labels", b.get("label"))).float() for b in batches]
    return torch.cat(hits).mean().item()


def test_bert_new_head_scored_through_original_classifier_from_module_model_or_file(tmp_path):
    original = pretrained("bert", 5, "classifier")
    model = fine_tuned(original, "bert", {"classifier": nn.Linear(32, 2)})
    batches = label_with(original, text_batches(5, label_key="label"))
    by_hand = accuracy_of(lambda b: original.classifier(model.bert(b["input_ids"], b["attention_mask"])[1]), batches)
    assert by_hand < 1.0  # the backbone really changed

    save_file(original.state_dict(), str(tmp_path / "original.safetensors"))
    torch.save(original.classifier.state_dict(), tmp_path / "classifier.pt")
    torch.save({"state_dict": {f"net.{k}": v for k, v in original.state_dict().items()}}, tmp_path / "lit.ckpt")
    sources = [original, original.classifier, *(str(tmp_path / f) for f in ["original.safetensors", "classifier.pt"])]
    for base_head in [*sources, str(tmp_path / "lit.ckpt")]:
        score = BaseTaskScorer(model, metric="accuracy", base_head=base_head).score(batches)
        assert score.value == pytest.approx(by_hand), base_head
    assert model.classifier.out_features == 2


def test_distilbert_two_module_head_needs_the_whole_original_model():
    original = pretrained("distilbert", 5, "classifier")
    model = fine_tuned(original, "distilbert", {"pre_classifier": nn.Linear(32, 32), "classifier": nn.Linear(32, 2)})
    batches = label_with(original, text_batches(5))

    def through_original(b):
        cls = model.distilbert(b["input_ids"], b["attention_mask"]).last_hidden_state[:, 0]
        return original.classifier(F.relu(original.pre_classifier(cls)))

    score = BaseTaskScorer(model, metric="f1", base_head=original).score(batches)
    with torch.no_grad():
        logits = torch.cat([through_original(b) for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert 0 < score.value < 1
    assert score.value == pytest.approx(multiclass_f1_score(logits, labels, 5, average="macro").item())
    with pytest.raises(ValueError, match=r"has 2 modules \(\['pre_classifier', 'classifier'\]\)"):
        BaseTaskScorer(model, base_head=original.classifier)


def test_language_model_loss_perplexity_and_token_accuracy_match_transformers():
    model, _ = HF_MODELS["gpt2"]()
    batches = text_batches(2)
    for b in batches:
        del b["labels"]  # next-token labels come from input_ids, padding ignored
    hand_loss, tokens, hits = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            out = model(**b, labels=labels)
            count = (labels[:, 1:] != -100).sum().item()
            hand_loss += out.loss.item() * count
            tokens += count
            keep = labels[:, 1:] != -100
            hits += (out.logits[:, :-1].argmax(-1) == labels[:, 1:])[keep].sum().item()
    scores = {m: BaseTaskScorer(model, metric=m, drift=False).score(batches).value for m in ["loss", "perplexity"]}
    assert scores["loss"] == pytest.approx(hand_loss / tokens, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(torch.tensor(hand_loss / tokens).exp().item(), rel=1e-5)
    token_accuracy = BaseTaskScorer(model, metric="accuracy").score(batches).value  # classes: lm_head size
    assert token_accuracy == pytest.approx(hits / tokens)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def loader(n: int = 8, labels: bool = True, **kwargs) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    tensors = [torch.randn(n, 6, generator=g)] + ([torch.randint(0, 3, (n,), generator=g)] if labels else [])
    return DataLoader(TensorDataset(*tensors), batch_size=4, **kwargs)


def test_scoring_restores_each_mode_touches_no_gradient_and_resets_user_metrics():
    model = Mixed().train()
    model.body[2].eval()  # a user-frozen BatchNorm stays in eval mode
    model.body[0].weight.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    running_mean = model.body[2].running_mean.clone()
    metric = MulticlassAccuracy(num_classes=3, average="macro")
    scorer = BaseTaskScorer(model, metric=metric, limit_batches=1)
    first, second = scorer.score(loader()), scorer.score(loader())
    assert first.value == second.value and first.batches == second.batches == 1  # reset between evaluations
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters()) and not model.body[0].weight.requires_grad
    assert torch.equal(model.body[2].running_mean, running_mean)


def test_bad_input_raises_clear_errors(tmp_path):
    model = Mixed()
    with pytest.raises(ValueError, match="yielded no batches"):
        BaseTaskScorer(model).score(DataLoader(TensorDataset(torch.empty(0, 6)), batch_size=4))
    with pytest.raises(TypeError, match=r"`metric` must be a name .* got int 5"):
        ForgettingMonitor(loader(), metric=5)
    with pytest.raises(TypeError, match="got CrossEntropyLoss"):
        ForgettingMonitor(loader(), metric=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"`metric` must be one of 'accuracy', 'f1', 'loss', 'perplexity'.*'acc'"):
        ForgettingMonitor(loader(), metric="acc")
    with pytest.raises(TypeError, match=r"cannot read a base-task batch of type list of \(str, str\)"):
        BaseTaskScorer(model).score([["a", "b"]])
    with pytest.raises(TypeError, match=r"dict with keys \['input_ids', 'labels'\]"):
        split_batch({"input_ids": torch.ones(2, 3), "labels": [0, 1]})
    with pytest.raises(ValueError, match="needs base-task labels"):
        BaseTaskScorer(model, metric="accuracy").score(loader(labels=False))
    assert BaseTaskScorer(model, metric=None).score(loader(labels=False)).kl_to_baseline == 0  # label-free drift
    with pytest.raises(TypeError, match="must return a logits tensor"):
        BaseTaskScorer(model, forward_fn=lambda module, batch: "logits").score(loader())
    with pytest.raises(ValueError, match="pass `num_classes=`"):
        BaseTaskScorer(nn.Sequential(nn.Tanh()), forward_fn=lambda m, b: b[0]).score(loader())
    with pytest.raises(ValueError, match="same batches in the same order"):
        scorer = BaseTaskScorer(model)
        scorer.score(loader())
        scorer.score(loader(n=6))


def test_bad_arguments_and_base_heads_raise_clear_errors(tmp_path):
    with pytest.raises(TypeError, match=r"`dataloader` must be a DataLoader.*got int 3"):
        ForgettingMonitor(3)
    with pytest.raises(ValueError, match=r"`every_n_epochs` must be an int >= 1, got 0"):
        ForgettingMonitor(loader(), every_n_epochs=0)
    with pytest.raises(ValueError, match=r"`on_exceed` must be one of 'warn', 'stop'; got 'halt'"):
        ForgettingMonitor(loader(), on_exceed="halt")
    with pytest.raises(ValueError, match="measures nothing"):
        ForgettingMonitor(loader(), metric=None, drift=False)
    with pytest.raises(ValueError, match=r"`base_head`='missing.pt' is not a file"):
        ForgettingMonitor(loader(), base_head="missing.pt")
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"holds no tensors for the head 'head'.*the file has: encoder.weight"):
        BaseTaskScorer(Mixed(), base_head=str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match=r"`dataloader`='base_set' names no method or attribute of Mixed"):
        _named_source("base_set", Mixed(), None)
