"""Trainable tokens (``LoRAConfig(trainable_token_indices=...)``) equal HF PEFT's: only the chosen rows train and
are saved, a tied output embedding reads the same rows and stays tied after the merge."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn as nn
import transformers as hf
from safetensors.torch import load_file
from test_io_adapter_file import outputs, train_a_little
from test_lora_callback import trainer
from torch.utils.data import DataLoader, TensorDataset
from zoo import _DECODER, HF_MODELS, _hf

from peft_callbacks import LoRACallback
from peft_callbacks.io import export_peft, import_peft, load_adapter, save_adapter
from peft_callbacks.methods.lora import LoRAConfig, inject_lora, merge_lora

peft = pytest.importorskip("peft")

TIED = _hf(hf.LlamaForCausalLM, lambda: hf.LlamaConfig(**{**_DECODER, "tie_word_embeddings": True}))
NEW = [95, 96, 98]  # e.g. special tokens added at the end of the vocabulary
CASES = {  # (build, PEFT's trainable_token_indices)
    "llama-tied": (TIED, NEW),
    "llama-untied": (HF_MODELS["llama"], {"embed_tokens": NEW, "lm_head": [96, 97]}),
    "bert": (HF_MODELS["bert"], NEW),
}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def _inputs_with_new_tokens(inputs: dict) -> dict:
    ids = inputs["input_ids"].clone()
    ids[:, 1:4] = torch.tensor(NEW)
    return {**inputs, "input_ids": ids}


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_trainable_tokens_import_with_the_same_outputs(tmp_path, name):
    build, tokens = CASES[name]
    base, inputs = build()
    inputs = _inputs_with_new_tokens(inputs)
    reference = outputs(base, inputs)
    config = peft.LoraConfig(
        r=2, target_modules=["query" if name == "bert" else "q_proj"], trainable_token_indices=tokens
    )
    theirs = train_a_little(peft.get_peft_model(base, config))
    theirs.save_pretrained(str(tmp_path))
    expected = outputs(theirs, inputs)
    assert not torch.allclose(expected, reference, atol=1e-3 * expected.abs().max().item())  # the rows matter

    ours = import_peft(build()[0], tmp_path)
    _close(outputs(ours, inputs), expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_holds_only_the_rows_and_loads_in_peft(tmp_path, name):
    build, tokens = CASES[name]
    tuned, inputs = build()
    inputs = _inputs_with_new_tokens(inputs)
    targets = ["query" if name == "bert" else "q_proj"]
    train_a_little(inject_lora(tuned, rank=2, target_modules=targets, trainable_token_indices=tokens, train_head=False))
    expected = outputs(tuned, inputs)
    export_peft(tuned, tmp_path)

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    rows = {k: tuple(v.shape) for k, v in saved.items() if "trainable_tokens" in k}
    width = tuned.get_input_embeddings().base_layer.embedding_dim
    assert sorted(rows.values()) == sorted((len(ids), width) for ids in _as_dict(tokens).values())  # rows only
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] and not any("embed" in t for t in config["target_modules"])

    theirs = peft.PeftModel.from_pretrained(build()[0], str(tmp_path))
    _close(outputs(theirs, inputs), expected)
    save_adapter(tuned, tmp_path / "ours")
    _close(outputs(load_adapter(build()[0], tmp_path / "ours"), inputs), expected)


def _as_dict(tokens):
    return tokens if isinstance(tokens, dict) else {"input": tokens}


def test_only_the_chosen_rows_train_and_a_tied_model_stays_tied_and_exact_after_merge():
    model, inputs = TIED()
    model.train()
    inputs = _inputs_with_new_tokens(inputs)
    before = model.get_input_embeddings().weight.detach().clone()
    inject_lora(model, rank=2, target_modules=["q_proj"], trainable_token_indices=NEW)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
    expected = outputs(model, inputs)
    merged = merge_lora(model)
    weight = merged.get_input_embeddings().weight
    assert merged.lm_head.weight is weight  # still one tensor
    changed = (weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == NEW  # every chosen row trained, no other row moved
    _close(outputs(merged, inputs), expected)


class NewTokensModule(L.LightningModule):
    """A causal LM whose ``configure_model`` adds tokens (``resize_token_embeddings``), as chat fine-tuning does."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TIED()[0]
        self.added: list[int] = []

    def configure_model(self) -> None:
        if not self.added:
            old = self.model.get_input_embeddings().num_embeddings
            self.model.resize_token_embeddings(old + 2)
            self.added = [old, old + 1]

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_callback_trains_tokens_added_in_configure_model_and_merges_them(tmp_path):
    module = NewTokensModule()
    vocab = module.model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (8, 6), generator=torch.Generator().manual_seed(0))
    ids[:, 2:4] = torch.tensor([vocab, vocab + 1])  # the tokens configure_model adds
    lora = LoRACallback(rank=2, target_modules=["q_proj"], trainable_token_indices=[vocab, vocab + 1])
    module.configure_model()
    start = module.model.get_input_embeddings().weight.detach().clone()
    trainer(tmp_path, [lora], max_steps=2).fit(module, DataLoader(TensorDataset(ids), batch_size=4))
    weight = module.model.get_input_embeddings().weight  # merged: a plain embedding again
    assert type(module.model.get_input_embeddings()) is nn.Embedding and module.model.lm_head.weight is weight
    assert (weight != start).any(dim=1).nonzero().flatten().tolist() == [vocab, vocab + 1]


def test_bad_token_indices_are_refused_with_what_is_allowed():
    model, _ = HF_MODELS["llama"]()
    with pytest.raises(ValueError, match=r"token ids \[99, 120\] for 'model.embed_tokens', which has 99 rows"):
        inject_lora(model, rank=2, target_modules=["q_proj"], trainable_token_indices=[5, 99, 120])
    with pytest.raises(ValueError, match=r"names 'wte', which matches no embedding .*embeddings: \['model.embed_tok"):
        inject_lora(model, rank=2, target_modules=["q_proj"], trainable_token_indices={"wte": [1]})
    with pytest.raises(ValueError, match=r"`trainable_token_indices` must hold .*ints >= 0\), got \[-1\]"):
        LoRAConfig(trainable_token_indices=[-1])
    with pytest.raises(TypeError, match="must be None, a list of token ids, or a dict"):
        LoRAConfig(trainable_token_indices=5)
    with pytest.raises(ValueError, match="which `target_modules` also adapts with LoRA"):
        inject_lora(model, rank=2, target_modules=["embed_tokens"], trainable_token_indices=[1])
    plain = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"as a list applies to the input embedding .*Embeddings: \['0'\]"):
        inject_lora(plain, rank=2, target_modules=["1"], trainable_token_indices=[1])
    inject_lora(plain, rank=2, target_modules=["1"], trainable_token_indices={"0": [1]})  # named: fine
