"""The fused LoRA forward (one ``addmm``) computes exactly what the plain formula computes, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from peft_callbacks import LoRAConv1D, LoRALinear


def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    """``W₀x + s·B·A·x`` written out with plain tensor ops, in float32."""
    base = layer.base_layer(x)
    update = x.float() @ layer.lora_A.weight.float().T @ layer.lora_B.weight.float().T * layer.scaling
    return base.float() + update


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        layer = LoRALinear(nn.Linear(12, 10), r=3, lora_alpha=6)
    else:
        layer = LoRAConv1D(Conv1D(10, 12), r=3, lora_alpha=6)
    layer.base_layer.requires_grad_(False)
    nn.init.normal_(layer.lora_B.weight)
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
    inputs = [x, layer.lora_A.weight, layer.lora_B.weight]
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


def test_a_subclass_that_redefines_the_branch_is_respected():
    class Doubled(LoRALinear):
        def lora_branch(self, x):
            return 2 * super().lora_branch(x)

    torch.manual_seed(0)
    layer = Doubled(nn.Linear(12, 10), r=3, lora_alpha=6)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), 2 * (_reference(layer, x) - layer.base_layer(x)))


def test_disabled_layer_is_the_base_layer():
    layer = _layer("linear")
    layer.disabled = True
    x = torch.randn(5, 12)
    assert torch.equal(layer(x), layer.base_layer(x))
