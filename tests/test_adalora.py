"""AdaLoRA: the rank allocator equals HF PEFT's on the same weights and gradients, a Lightning fit with
``AdaLoRACallback`` equals PEFT's own training loop (schedule, regulariser, masks), a resumed fit equals an
uninterrupted one, rank-pattern directories import exactly, and bad arguments are refused by name."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from zoo import HF_MODELS, VOCAB, run

from peft_callbacks import AdaLoRACallback
from peft_callbacks.engine import inject, peft_layers
from peft_callbacks.io import export_peft, import_peft
from peft_callbacks.methods.adalora import AdaLoRAConfig, RankAllocator, adalora_adapters, orthogonal_regularization

peft = pytest.importorskip("peft")

SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2)


def _bert() -> nn.Module:
    model, _ = HF_MODELS["bert"]()
    for module in model.modules():  # no dropout: the two runs draw no random numbers
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _pair(total_step: int, targets=("query", "value")) -> tuple[nn.Module, nn.Module, AdaLoRAConfig]:
    """Ours and PEFT's AdaLoRA on the same BERT, with the same starting tensors."""
    config = AdaLoRAConfig(**SCHEDULE, total_step=total_step, train_head=False, target_modules=list(targets))
    model = _bert()
    reference = copy.deepcopy(model)
    inject(model, config)
    theirs = peft.get_peft_model(
        reference, peft.AdaLoraConfig(**SCHEDULE, total_step=total_step, target_modules=list(peft_layers(model)))
    )
    with torch.no_grad():
        for _, (ours, reference) in _tensors(model, theirs):
            reference.copy_(ours)
    return model, theirs, config


def _tensors(model, theirs):
    """``(name, (ours, theirs))`` for every AdaLoRA tensor."""
    out = []
    for path, adapter in adalora_adapters(model).items():
        layer = theirs.base_model.model.get_submodule(path)
        for name in ("lora_A", "lora_E", "lora_B"):
            out.append((f"{path}.{name}", (getattr(adapter, name), getattr(layer, name)["default"])))
    return out


def _their_pattern(theirs) -> dict[str, list[bool]] | None:
    pattern = theirs.peft_config["default"].rank_pattern
    if pattern is None:
        return None
    return {k.removesuffix(".lora_E.default").removesuffix(".lora_E"): v for k, v in pattern.items()}


def test_rank_budget_equals_peft_on_the_same_scores():
    total_step = 16
    model, theirs, config = _pair(total_step)
    allocator = RankAllocator(model, config)
    generator = torch.Generator().manual_seed(0)
    for step in range(total_step + 3):  # the three phases, and steps past the end
        with torch.no_grad():
            for _, (ours, reference) in _tensors(model, theirs):
                value = torch.randn(ours.shape, generator=generator)
                grad = torch.randn(ours.shape, generator=generator)
                ours.copy_(value)
                reference.copy_(value)
                ours.grad, reference.grad = grad.clone(), grad.clone()
        budget, pattern = allocator.update_and_allocate(model, step)
        theirs.base_model.update_and_allocate(step)
        expected = theirs.base_model.rankallocator.budget_schedule(step)[0] if step < total_step - 3 else 8
        assert budget == expected, step
        assert pattern == _their_pattern(theirs), step
        for name, (ours, reference) in _tensors(model, theirs):
            assert torch.equal(ours, reference), (step, name)  # the same triplets masked
    assert sum(sum(kept) for kept in pattern.values()) == allocator.target_bgt == 4 * 2
    assert allocator.init_bgt == 4 * 6


class _Classifier(L.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss  # the user's loss: no regulariser in it

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def _batches(count: int = 8) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2 * count, 7), generator=generator)
    return TensorDataset(ids, torch.randint(0, 3, (2 * count,), generator=generator))


def _trainer(**kwargs) -> L.Trainer:
    options = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    return L.Trainer(**{**options, **kwargs})


def _callback(**kwargs) -> AdaLoRACallback:
    return AdaLoRACallback(**SCHEDULE, target_modules=["query", "value"], train_head=False, **kwargs)


def test_a_lightning_fit_equals_peft_training_loop():
    data = _batches()
    model, theirs, _ = _pair(total_step=8)
    optimizer = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    for step, (ids, labels) in enumerate(DataLoader(data, batch_size=2)):  # PEFT's documented loop
        # AdaLoraModel.forward adds the regulariser to the loss (the task PeftModels call it; a bare PeftModel does not)
        theirs.base_model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()

    callback = _callback(merge_on_train_end=False)  # total_step: the Trainer's 8 steps
    _trainer(max_epochs=1, callbacks=[callback]).fit(_Classifier(model), DataLoader(data, batch_size=2))
    assert callback.config.total_step == 8
    pattern = {path.removeprefix("model."): kept for path, kept in callback.allocator.rank_pattern.items()}
    assert pattern == _their_pattern(theirs)  # the allocator keys layers by their path in the LightningModule
    for name, (ours, reference) in _tensors(model, theirs):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5, msg=name)
    assert sum(a.rank() for a in adalora_adapters(model).values()) == 4 * 2

    ids = data.tensors[0][:2]
    theirs.eval()
    model.eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_rank_pattern_directories_import_exactly_and_exports_load_in_peft(tmp_path):
    model, theirs, config = _pair(total_step=6)
    generator = torch.Generator().manual_seed(2)
    for step in range(6):
        with torch.no_grad():
            for _, (_, reference) in _tensors(model, theirs):
                reference.add_(torch.randn(reference.shape, generator=generator) * 0.1)
                reference.grad = torch.randn(reference.shape, generator=generator)
        theirs.base_model.update_and_allocate(step)
    theirs.save_pretrained(str(tmp_path / "theirs"))  # trimmed to the kept triplets, with the rank pattern
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 7), generator=generator)}
    ours = import_peft(_bert(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(run(ours.eval(), inputs), run(theirs.eval(), inputs), rtol=0, atol=1e-5)
    assert all(a.lora_A.shape[0] == 6 for a in adalora_adapters(ours).values())  # padded back with zero triplets

    export_peft(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(_bert(), str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(run(loaded.eval(), inputs), run(ours, inputs), rtol=0, atol=1e-5)


def test_the_regulariser_is_peft_s():
    model, theirs, config = _pair(total_step=6)
    with torch.no_grad():
        for _, (ours, reference) in _tensors(model, theirs):
            ours.add_(torch.randn(ours.shape) * 0.3)
            reference.copy_(ours)
    ids, labels = torch.randint(3, VOCAB, (2, 7)), torch.tensor([0, 1])
    with torch.no_grad():
        task = model(input_ids=ids, labels=labels).loss
        total = theirs.base_model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(
        total - task, config.orth_reg_weight * orthogonal_regularization(model), atol=1e-6, rtol=0
    )


def test_a_resumed_fit_equals_an_uninterrupted_one(tmp_path):
    data = _batches()

    def fit(max_steps, ckpt_path=None, model=None):
        model = model or _bert()
        callback = _callback(total_step=8, merge_on_train_end=False)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer = _trainer(max_steps=max_steps, callbacks=[callback, checkpoint], enable_checkpointing=True)
        torch.manual_seed(0)
        trainer.fit(_Classifier(model), DataLoader(data, batch_size=2), ckpt_path=ckpt_path)
        return model, callback

    torch.manual_seed(5)
    whole, whole_callback = fit(8)
    torch.manual_seed(5)
    fit(4)  # stops halfway: the budget has started to fall
    torch.manual_seed(5)
    resumed, resumed_callback = fit(8, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed_callback.allocator.rank_pattern == whole_callback.allocator.rank_pattern
    ours, again = adalora_adapters(whole), adalora_adapters(resumed)
    for path in ours:
        for name in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(again[path], name), getattr(ours[path], name), rtol=0, atol=1e-6)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="`target_r` must be <= `init_r`"):
        AdaLoRAConfig(init_r=4, target_r=8)
    with pytest.raises(ValueError, match="`total_step`=10 leaves no budgeting phase"):
        AdaLoRAConfig(total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match="`beta1`"):
        AdaLoRAConfig(beta1=1.0)
    with pytest.raises(ValueError, match="`deltaT` must be an int >= 1"):
        AdaLoRAConfig(deltaT=0)
    with pytest.raises(ValueError, match="`orth_reg_weight`"):
        AdaLoRAConfig(orth_reg_weight=-1.0)
    model = inject(_bert(), AdaLoRAConfig(init_r=2, target_r=1, target_modules=["query"]))
    with pytest.raises(ValueError, match="`total_step` is needed"):
        RankAllocator(model)
    with pytest.raises(ValueError, match="no AdaLoRA adapter named 'other'"):
        RankAllocator(model, adapter_name="other", total_step=10)
    with pytest.raises(ValueError, match="needs `total_step`"):
        export_peft(model, "unused")


class _Endless(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.randint(3, VOCAB, (7,)), torch.tensor(0)


def test_a_trainer_that_cannot_count_its_steps_asks_for_total_step():
    with pytest.raises(ValueError, match="`total_step` is None and the Trainer cannot tell"):
        _trainer(max_epochs=1, callbacks=[_callback()]).fit(_Classifier(_bert()), DataLoader(_Endless(), batch_size=2))
