"""The fused LoRA forward (one ``addmm``) computes exactly what the plain formula computes, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from peft_callbacks import LoRAConfig, LoRALinear
from peft_callbacks.engine import AdaptedLayer, adapt_layer


def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    """``W₀x + s·B·A·x`` written out with plain tensor ops, in float32."""
    base = layer.base_layer(x)
    lora = layer.adapters["default"]
    update = x.float() @ lora.lora_A.weight.float().T @ lora.lora_B.weight.float().T * lora.scaling
    return base.float() + update


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    layer = adapt_layer(base, LoRAConfig(rank=3, alpha=6))
    layer.base_layer.requires_grad_(False)
    nn.init.normal_(layer.adapters["default"].lora_B.weight)
    return layer


@pytest.mark.parametrize("kind", ["linear", "hf_conv1d"])
@pytest.mark.parametrize("shape", [(5, 12), (2, 4, 12)], ids=["2d", "3d"])
def test_fused_forward_and_gradients_match_the_formula(kind, shape):
    layer = _layer(kind)
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert out.shape == (*shape[:-1], 10)
    torch.testing.assert_close(out, _reference(layer, x))
    weights = torch.randn_like(out)
    lora = layer.adapters["default"]
    inputs = [x, lora.lora_A.weight, lora.lora_B.weight]
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    expected = torch.autograd.grad((_reference(layer, x) * weights).sum(), inputs)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_float32_factors_on_a_bf16_base_take_the_unfused_path():
    layer = _layer("linear")
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference(layer, x), atol=0.05, rtol=0.02)


def test_a_subclass_that_redefines_the_update_is_respected():
    class Doubled(LoRALinear):
        def forward(self, layer, x, result):
            return result + 2 * (super().forward(layer, x, result) - result)

    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = AdaptedLayer(base)
    layer.add_adapter("default", Doubled(base, LoRAConfig(rank=3, alpha=6)))
    nn.init.normal_(layer.adapters["default"].lora_B.weight)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), 2 * (_reference(layer, x) - layer.base_layer(x)))


def test_disabled_layer_is_the_base_layer():
    layer = _layer("linear")
    layer.disabled = True
    x = torch.randn(5, 12)
    assert torch.equal(layer(x), layer.base_layer(x))
