"""PiSSA / OLoRA (and Gaussian) initialisation of LoRA: the engine's contract on the zoo, exact reloads onto a fresh
original base (the initial factors are stored), the base left untouched, PEFT export of a randomised PiSSA, bad input.
Equality with HF PEFT's outputs, merges and directories: ``test_vera_adalora_peft_parity.py``."""

from __future__ import annotations

import json

import pytest
import test_contract as contract
import torch
from safetensors.torch import load_file
from zoo import HF_MODELS, run

from peft_callbacks.engine import disabled, inject, unload
from peft_callbacks.io import export_peft, load_adapter, save_adapter
from peft_callbacks.methods.lora import LoRAConfig, lora_layers
from peft_callbacks.methods.lora.method import lora_adapters

ZOO = ["timm-vit", "timm-resnet", "timm-efficientnet", "hf-bert", "hf-gpt2", "hf-llama", "hf-t5"]


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2", "gaussian"])
@pytest.mark.parametrize("model_name", ZOO)
def test_contract_holds_with_each_init(model_name, init, tmp_path):
    contract.check_contract(LoRAConfig(rank=4, alpha=8, init=init), lambda: contract._build(model_name), tmp_path)


def _trained(model) -> None:
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_3"])
def test_a_reload_onto_a_fresh_base_equals_the_trained_model(init, tmp_path):
    build = HF_MODELS["llama"]
    model, inputs = build()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        original = run(model, inputs)
    inject(model, LoRAConfig(rank=4, alpha=8, init=init, target_modules="all-linear"))
    layer = next(iter(lora_layers(model).values()))
    assert torch.equal(layer.base_layer.weight, base_state[next(k for k in base_state if k.endswith("q_proj.weight"))])
    _trained(model)
    with torch.no_grad():
        tuned = run(model, inputs)
        with disabled(model):  # the base model itself, not a residual
            torch.testing.assert_close(run(model, inputs), original, rtol=0, atol=0)
    save_adapter(model, tmp_path)
    assert any(k.endswith("lora_A_init") for k in load_file(str(tmp_path / "adapter_model.safetensors")))

    torch.manual_seed(123)  # another random state: a randomised SVD on reload would differ; the stored one is used
    loaded = load_adapter(build()[0], tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, inputs), tuned, rtol=0, atol=0)
    unload(model)  # the original weights, bit for bit
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_state.items())


def test_a_randomised_pissa_is_exported_as_the_lora_it_equals(tmp_path):
    peft = pytest.importorskip("peft")
    build = HF_MODELS["bert"]
    model, inputs = build()
    inject(model, LoRAConfig(rank=4, alpha=8, init="pissa_niter_2", target_modules=["query", "value"]))
    _trained(model)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    theirs = peft.PeftModel.from_pretrained(build()[0], str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(run(theirs.eval(), inputs), run(model.eval(), inputs), rtol=0, atol=1e-5)


def test_gaussian_init_draws_a_with_std_one_over_r():
    model = inject(HF_MODELS["llama"]()[0], LoRAConfig(rank=4, init="gaussian", target_modules=["gate_proj"]))
    weights = torch.cat([a.lora_A.weight.flatten() for a in lora_adapters(model).values()])
    assert abs(weights.std().item() - 0.25) < 0.05
    assert all(not a.lora_B.weight.any() for a in lora_adapters(model).values())


def test_bad_inits_are_refused_by_name():
    with pytest.raises(ValueError, match=r"`init` must be one of \('default', 'gaussian', 'pissa'"):
        LoRAConfig(init="pissa_niter_")
    with pytest.raises(ValueError, match="`init` must be one of"):
        LoRAConfig(init=True)
    with pytest.raises(ValueError, match="`init`='olora' cannot be combined with `use_dora=True`"):
        LoRAConfig(init="olora", use_dora=True)
