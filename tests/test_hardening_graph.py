"""LoRA under torch.compile and activation checkpointing, and surgery on big (meta-device) models."""

from __future__ import annotations

import copy
import os
import pickle
import shutil

import pytest
import torch
import torch.nn as nn
import transformers as hf
from zoo import HF_MODELS, TIMM_MODELS, run

from peft_callbacks import count_parameters, inject_lora, lora_layers, merge_lora
from peft_callbacks.methods.lora.method import lora_adapters


def _tiny_lora_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = inject_lora(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), 2)
    for lora in lora_adapters(model).values():
        nn.init.normal_(lora.lora_B.weight)  # non-identity, so the compiled graph must really run the branch
    return model, torch.randn(3, 8)


def _check_compiled(backend: str) -> None:
    model, x = _tiny_lora_net()
    expected = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: no graph break in LoRA layers
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    for layer in lora_layers(model).values():
        lora = layer.adapters["default"]
        assert lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad is not None
        assert layer.base_layer.weight.grad is None
    merge_lora(model)  # the compiled wrapper keeps the old graph; the merged eager model gives the same answer
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_torch_compile_traces_lora_without_graph_breaks():
    _check_compiled("aot_eager")  # dynamo + AOTAutograd, no C++ compiler needed


@pytest.mark.skipif(
    os.environ.get("PEFT_CALLBACKS_TEST_INDUCTOR") != "1",
    reason="inductor C++ compilation takes 10-60 s on CPU; set PEFT_CALLBACKS_TEST_INDUCTOR=1 to run it",
)
def test_torch_compile_inductor_on_cpu():
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler found for the inductor CPU backend")
    _check_compiled("inductor")


def _enable_checkpointing(model: nn.Module, **kwargs) -> None:
    """transformers >= 5 renamed ``gradient_checkpointing_enable`` (kept as a deprecated alias)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(kwargs or None)


def _lora_grads(model: nn.Module) -> list[bool]:
    return [lora.lora_B.weight.grad is not None for lora in lora_adapters(model).values()]


@pytest.mark.parametrize("enable_first", [True, False], ids=["checkpointing-then-lora", "lora-then-checkpointing"])
def test_reentrant_checkpointing_reaches_lora_behind_frozen_embeddings(enable_first):
    # HF ViT: transformers itself only makes text-model inputs require grad; the patch embedding stays frozen here.
    model, inputs = HF_MODELS["vit_hf"]()
    model.train()
    if enable_first:
        _enable_checkpointing(model, use_reentrant=True)
    inject_lora(model, rank=2, target_modules="q_proj")
    if not enable_first:
        _enable_checkpointing(model, use_reentrant=True)
    run(model, inputs).sum().backward()
    assert _lora_grads(model) == [True, True]


def test_without_the_input_hook_reentrant_checkpointing_starves_lora():
    model, inputs = HF_MODELS["vit_hf"]()
    _enable_checkpointing(model.train(), use_reentrant=True)
    inject_lora(model, rank=2, target_modules="q_proj")
    model.get_input_embeddings()._peft_input_grads_hook.remove()
    with pytest.warns(UserWarning, match="requires_grad"):
        run(model, inputs).sum().backward()
    assert _lora_grads(model) == [False, False]  # what the hook prevents


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_default_checkpointing_trains_lora(family):
    model, inputs = HF_MODELS[family]()
    _enable_checkpointing(model.train())
    inject_lora(model, rank=2)
    run(model, inputs).float().sum().backward()
    assert all(_lora_grads(model))


def test_timm_checkpointing_trains_lora():
    model, inputs = TIMM_MODELS["deit"]()
    model.set_grad_checkpointing(True)
    inject_lora(model.train(), rank=2, target_modules="qkv")
    run(model, inputs).sum().backward()
    assert all(_lora_grads(model))


def test_hooked_model_pickles_and_copies():
    model, inputs = HF_MODELS["bert"]()
    inject_lora(model, rank=2)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(run(clone, inputs), run(model, inputs))
        assert clone.get_input_embeddings()._peft_input_grads_hook is not None


def test_surgery_on_a_meta_device_7b_wide_llama_copies_nothing():
    config = hf.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=2,  # the 7B width; the benchmark does all 32 layers
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = hf.LlamaForCausalLM(config)
    base = {name: p for name, p in model.named_parameters()}
    inject_lora(model, rank=8, target_modules="all-linear")
    layers = lora_layers(model)
    assert len(layers) == 2 * 7
    after = dict(model.named_parameters())
    for name, p in base.items():  # every base weight is the same object, still on meta: nothing was copied
        key = name.replace(".weight", ".base_layer.weight") if name.rsplit(".", 1)[0] in layers else name
        assert after[key] is p
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model).trainable == sum(
        layer.adapters["default"].r * (layer.in_features + layer.out_features) for layer in layers.values()
    )


def test_surgery_on_a_real_model_shares_base_storage():
    model, _ = TIMM_MODELS["deit"]()
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    inject_lora(model, rank=2)
    after = {name.replace(".base_layer", ""): p.data_ptr() for name, p in model.named_parameters()}
    assert all(after[name] == ptr for name, ptr in pointers.items())
