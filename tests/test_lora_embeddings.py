"""LoRA on ``nn.Embedding`` (and transformers' scaled embeddings) equals HF PEFT's LoRA ``Embedding`` layer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import transformers as hf
from test_io_adapter_file import outputs, train_a_little
from zoo import HF_MODELS, _hf

from peft_callbacks.io import export_peft, import_peft, load_adapter, save_adapter
from peft_callbacks.methods.lora import inject_lora, lora_layers, merge_lora
from peft_callbacks.methods.lora.embedding import LoRAEmbedding

peft = pytest.importorskip("peft")

_GEMMA = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    tie_word_embeddings=False,
)
MODELS = {  # (build, the input embedding's name, another layer)
    "llama": (HF_MODELS["llama"], "embed_tokens", "q_proj"),
    "bert": (HF_MODELS["bert"], "word_embeddings", "query"),
    # Gemma3TextScaledWordEmbedding multiplies its output by embed_scale = sqrt(hidden_size) in its forward
    "gemma3": (_hf(hf.Gemma3ForCausalLM, lambda: hf.Gemma3TextConfig(**_GEMMA)), "embed_tokens", "q_proj"),
}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_peft_embedding_lora_imports_with_the_same_outputs(tmp_path, name):
    build, embedding, other = MODELS[name]
    base, inputs = build()
    reference = outputs(base, inputs)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[embedding, other])
    theirs = train_a_little(peft.get_peft_model(base, config))
    theirs.save_pretrained(str(tmp_path))
    keys = json.dumps(list(theirs.state_dict()))
    assert "lora_embedding_A" in keys

    ours = import_peft(build()[0], tmp_path)
    adapters = [layer.adapters["default"] for layer in lora_layers(ours).values()]
    assert sum(isinstance(a, LoRAEmbedding) for a in adapters) == 1
    expected = outputs(theirs, inputs)
    assert not torch.allclose(expected, reference, atol=1e-3)  # the perturbed adapter changes the output
    _close(outputs(ours, inputs), expected)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_loads_in_peft_and_merge_equals_adapted(tmp_path, name):
    build, embedding, other = MODELS[name]
    tuned, inputs = build()
    train_a_little(inject_lora(tuned, rank=4, alpha=8, target_modules=[embedding, other]))
    expected = outputs(tuned, inputs)
    export_peft(tuned, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build()[0], str(tmp_path))
    assert isinstance(theirs.base_model.model.get_input_embeddings(), peft.tuners.lora.Embedding)
    _close(outputs(theirs, inputs), expected)

    save_adapter(tuned, tmp_path / "ours")  # our own format replays it too
    _close(outputs(load_adapter(build()[0], tmp_path / "ours"), inputs), expected)

    merged = merge_lora(tuned)
    assert type(merged.get_input_embeddings()) is type(build()[0].get_input_embeddings())
    _close(outputs(merged, inputs), expected)


def test_same_start_as_peft_and_zero_update_at_injection():
    base = nn.Embedding(20, 6, padding_idx=0)
    torch.manual_seed(0)
    ours = inject_lora(nn.Sequential(copy.deepcopy(base)), rank=3, target_modules=["0"])[0].adapters["default"]
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), peft.LoraConfig(r=3, target_modules=["0"]))
    layer = theirs.base_model.model[0]
    assert ours.lora_embedding_A.shape == layer.lora_embedding_A["default"].shape == (3, 20)
    assert ours.lora_embedding_B.shape == layer.lora_embedding_B["default"].shape == (6, 3)
    assert torch.count_nonzero(ours.lora_embedding_A) == 0 and ours.lora_embedding_B.std() > 0.5  # A = 0, B ~ N(0, 1)


def test_embeddings_only_when_named():
    model, _ = HF_MODELS["llama"]()
    inject_lora(model, rank=2)  # the default selection, like "all-linear", leaves embeddings alone
    assert "model.embed_tokens" not in lora_layers(model)
    model, _ = HF_MODELS["llama"]()
    inject_lora(model, rank=2, target_modules="all-linear")
    assert "model.embed_tokens" not in lora_layers(model)


def test_tied_embedding_and_unsupported_variants_are_refused():
    model, _ = HF_MODELS["gpt2"]()  # wte is tied to lm_head
    with pytest.raises(ValueError, match="tied weights"):
        inject_lora(model, rank=2, target_modules=["wte"])
    model, _ = HF_MODELS["llama"]()
    with pytest.raises(ValueError, match="`use_dora=True` is not supported on nn.Embedding"):
        inject_lora(model, rank=2, target_modules=["embed_tokens"], use_dora=True)
    with pytest.raises(ValueError, match="matched .*Embedding.*which LoRA cannot adapt"):
        inject_lora(nn.Sequential(nn.Embedding(5, 4, max_norm=1.0), nn.Linear(4, 2)), rank=2, target_modules=["0"])
