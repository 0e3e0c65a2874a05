"""``init="orthogonal"`` and ``init="eva"`` against HF PEFT: the same factors from the same seed (orthogonal) or the
same data (EVA, on one batch, up to each component's sign), PEFT's adapters import and ours export with equal outputs,
saved adapters reload exactly, ``LoRACallback(init="eva")`` reads the training data at ``setup``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_io_adapter_file import outputs, train_a_little
from zoo import HF_MODELS

from peft_callbacks.engine import inject
from peft_callbacks.io import export_peft, import_peft, load_adapter, save_adapter
from peft_callbacks.methods.lora import LoRAConfig, lora_layers
from peft_callbacks.methods.lora.method import lora_adapters

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _peft_layer(peft_model, path: str):
    return peft_model.base_model.model.get_submodule(path)


# -- orthogonal ------------------------------------------------------------------------------------------------------
def test_orthogonal_draws_peft_factors_from_the_same_seed():
    ours, inputs = HF_MODELS["llama"]()
    theirs = copy.deepcopy(ours)
    before = outputs(ours, inputs)
    torch.manual_seed(11)
    inject(ours, LoRAConfig(rank=4, alpha=8, init="orthogonal", target_modules=LLAMA_TARGETS))
    torch.manual_seed(11)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="orthogonal", target_modules=LLAMA_TARGETS)
    theirs = peft.get_peft_model(theirs, config)
    layers = lora_layers(ours)
    assert len(layers) == 8
    for path, layer in layers.items():
        mine, peft_layer = layer.adapters["default"], _peft_layer(theirs, path)
        assert torch.equal(mine.lora_A.weight, peft_layer.lora_A["default"].weight), path
        assert torch.equal(mine.lora_B.weight, peft_layer.lora_B["default"].weight), path
    after = outputs(ours, inputs)
    torch.testing.assert_close(after, outputs(theirs, inputs), rtol=0, atol=1e-6)
    # A and B both non-zero (both get gradients from the first step), yet B·A = 0 up to rounding: A's rows and B's
    # columns come from orthogonal halves of Q, so the model starts as the base
    assert all(layer.adapters["default"].lora_B.weight.abs().min() > 0 for layer in layers.values())
    assert all(layer.adapters["default"].delta_weight().abs().max() < 1e-6 for layer in layers.values())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_orthogonal_factors_span_complementary_halves_of_the_rank_space():
    model = inject(HF_MODELS["bert"]()[0], LoRAConfig(rank=6, init="orthogonal", target_modules=["query"]))
    for adapter in lora_adapters(model).values():
        a, b = adapter.lora_A.weight, adapter.lora_B.weight  # (r, in), (out, r)
        rank = torch.linalg.matrix_rank
        assert rank(a) == 3 and rank(b) == 3  # each from r/2 rows of Q
        assert rank(torch.cat([a, b.T], dim=1)) == 6  # (r, in + out): together they span R^r
        torch.testing.assert_close(b @ a, torch.zeros(b.shape[0], a.shape[1]), rtol=0, atol=1e-6)


def test_an_orthogonal_adapter_round_trips_with_peft(tmp_path):
    build = HF_MODELS["bert"]
    ours, inputs = build()
    inject(ours, LoRAConfig(rank=4, alpha=8, init="orthogonal", target_modules=["query", "value"]))
    train_a_little(ours)
    expected = outputs(ours, inputs)
    export_peft(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == "orthogonal"
    theirs = peft.PeftModel.from_pretrained(build()[0], str(tmp_path / "ours"))
    torch.testing.assert_close(outputs(theirs, inputs), expected, rtol=0, atol=1e-5)
    # PEFT's own orthogonal adapter imports, and our saved one reloads (another seed: the file's tensors are used)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    torch.manual_seed(5)
    imported = import_peft(build()[0], tmp_path / "theirs")
    torch.testing.assert_close(outputs(imported, inputs), expected, rtol=0, atol=1e-5)
    save_adapter(ours, tmp_path / "saved")
    torch.manual_seed(6)
    torch.testing.assert_close(outputs(load_adapter(build()[0], tmp_path / "saved"), inputs), expected, rtol=0, atol=0)


def test_orthogonal_is_refused_where_peft_does_not_define_it():
    with pytest.raises(ValueError, match=r"`init`='orthogonal' needs an even `rank`.*got rank=3"):
        LoRAConfig(rank=3, init="orthogonal")
    with pytest.raises(ValueError, match="`init`='orthogonal' cannot be combined with `use_dora=True`"):
        LoRAConfig(init="orthogonal", use_dora=True)
    resnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="`init`='orthogonal' is defined for linear layers"):
        inject(resnet, LoRAConfig(rank=2, init="orthogonal", target_modules=["0"]))
    with pytest.raises(ValueError, match="`init`='orthogonal' is not supported on nn.Embedding"):
        inject(HF_MODELS["llama"]()[0], LoRAConfig(rank=2, init="orthogonal", target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="`init`='orthogonal' cannot be used with `target_parameters`"):
        LoRAConfig(rank=2, init="orthogonal", target_parameters=["experts.down_proj"])
