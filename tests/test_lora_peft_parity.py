"""Same LoRA factors must give the same outputs as HF peft (the reference implementation), fp32, atol 1e-5."""

from __future__ import annotations

import copy

import pytest
import torch
from zoo import HF_MODELS, TIMM_MODELS, run

from peft_callbacks import inject_lora, lora_layers
from peft_callbacks.methods.lora.method import lora_adapters

peft = pytest.importorskip("peft")

CASES = {
    "timm-vit": (TIMM_MODELS["vit"], False),
    "timm-resnet": (TIMM_MODELS["resnet"], False),  # conv LoRA: kxk lora_A, 1x1 lora_B
    "hf-bert": (HF_MODELS["bert"], False),
    "hf-gpt2": (HF_MODELS["gpt2"], True),  # transformers Conv1D: transposed weight
    "hf-llama": (HF_MODELS["llama"], False),
}


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_same_factors_same_outputs_as_peft(name, use_rslora):
    build, fan_in_fan_out = CASES[name]
    model, inputs = build()
    model.eval()
    reference = copy.deepcopy(model)

    inject_lora(model, rank=4, alpha=12, use_rslora=use_rslora)
    layers = lora_layers(model)
    gen = torch.Generator().manual_seed(0)
    for lora in lora_adapters(model).values():  # non-identity B so the comparison means something
        lora.lora_B.weight.data.copy_(torch.randn(lora.lora_B.weight.shape, generator=gen) * 0.1)

    config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=list(layers),
        fan_in_fan_out=fan_in_fan_out,
        use_rslora=use_rslora,
        init_lora_weights=True,
    )
    reference = peft.get_peft_model(reference, config).eval()
    for path, layer in layers.items():
        layer = layer.adapters["default"]
        theirs = reference.base_model.model.get_submodule(path)
        theirs.lora_A["default"].weight.data.copy_(layer.lora_A.weight)
        theirs.lora_B["default"].weight.data.copy_(layer.lora_B.weight)
        assert theirs.scaling["default"] == pytest.approx(layer.scaling)

    with torch.no_grad():
        ours, expected = run(model, inputs), run(reference, inputs)
        with reference.disable_adapter():
            base = run(reference, inputs)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-4)  # the adapters really changed the output
