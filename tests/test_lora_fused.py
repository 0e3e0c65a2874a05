"""The LoRA layer as one autograd node: the same outputs and gradients as the plain path, less kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from peft_callbacks.engine import adapt_layer
from peft_callbacks.methods.lora import LoRAConfig


def _layer(kind: str, dtype=torch.float32, bias: bool = True, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=bias) if kind == "linear" else Conv1D(20, 24)
    layer = adapt_layer(base, LoRAConfig(rank=4, alpha=8, dropout=dropout)).to(dtype)
    base.requires_grad_(False)
    nn.init.normal_(layer.adapters["default"].lora_B.weight)
    return layer


def _run(layer: nn.Module, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    lora = layer.adapters["default"]
    saved, lora._fusable = lora._fusable, fused and lora._fusable
    try:
        x = x.detach().requires_grad_(True)
        out = layer(x)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        params = [p for p in (layer.base_layer.weight, layer.base_layer.bias) if p is not None and p.requires_grad]
        inputs = [x, lora.lora_A.weight, lora.lora_B.weight, *params]
        return out, list(torch.autograd.grad((out * weights).sum(), inputs))
    finally:
        lora._fusable = saved


@pytest.mark.parametrize("kind", ["linear", "hf_conv1d"])
@pytest.mark.parametrize("shape", [(6, 24), (2, 3, 24)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_fused_equals_the_plain_path_in_float32(kind, shape, bias):
    if kind == "hf_conv1d" and not bias:
        pytest.skip("Conv1D always has a bias")
    layer = _layer(kind, bias=bias)
    x = torch.randn(*shape)
    fused_out, fused_grads = _run(layer, x, fused=True)
    plain_out, plain_grads = _run(layer, x, fused=False)
    assert fused_out.grad_fn.name() == "LoRALinearFunctionBackward"
    assert plain_out.grad_fn.name() != "LoRALinearFunctionBackward"
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-6, atol=1e-6)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fused_with_a_trainable_base_gives_its_weight_and_bias_gradients():
    layer = _layer("linear")
    layer.base_layer.requires_grad_(True)
    x = torch.randn(5, 24)
    fused_out, fused_grads = _run(layer, x, fused=True)
    plain_out, plain_grads = _run(layer, x, fused=False)
    assert len(fused_grads) == 5
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "hf_conv1d"])
def test_fused_in_bfloat16_is_as_close_to_the_exact_result_as_the_plain_path(kind):
    layer = _layer(kind, dtype=torch.bfloat16)
    x = torch.randn(8, 24).to(torch.bfloat16)
    exact_layer = _layer(kind, dtype=torch.float64)
    with torch.no_grad():
        for p, q in zip(exact_layer.parameters(), layer.parameters()):
            p.copy_(q.double())
    exact_out, exact_grads = _run(exact_layer, x.double(), fused=False)
    for fused in (True, False):
        out, grads = _run(layer, x, fused=fused)
        error = (out.double() - exact_out).abs().max()
        grad_errors = [(g.double() - e).abs().max() for g, e in zip(grads, exact_grads)]
        if fused:
            fused_error, fused_grad_errors = error, grad_errors
        else:
            assert fused_error <= 2 * error + 1e-3
            for f, p in zip(fused_grad_errors, grad_errors):
                assert f <= 2 * p + 1e-3


@pytest.mark.parametrize("kind", ["linear", "hf_conv1d"])
def test_dropout_while_training_equals_the_plain_path_with_the_same_mask(kind):
    """The dropped input feeds the LoRA branch only; its gradient flows back through the dropout outside the node."""
    layer = _layer(kind, dropout=0.3).train()
    x = torch.randn(2, 5, 24)
    torch.manual_seed(7)  # the same dropout mask in both runs: each draws it once, from the same generator state
    fused_out, fused_grads = _run(layer, x, fused=True)
    torch.manual_seed(7)
    plain_out, plain_grads = _run(layer, x, fused=False)
    assert fused_out.grad_fn.name() == "LoRALinearFunctionBackward"
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-6, atol=1e-6)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.manual_seed(7)
    undropped = layer.eval()(x)  # eval: no dropout, so another output
    assert not torch.allclose(undropped, fused_out)


def _saved_bytes(layer: nn.Module, x: torch.Tensor, fused: bool) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    lora = layer.adapters["default"]
    saved, lora._fusable = lora._fusable, fused
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x.requires_grad_(True))
    finally:
        lora._fusable = saved
    return sum(storages.values())


def test_fused_keeps_no_more_for_backward_than_the_plain_path():
    layer = _layer("linear")
    x = torch.randn(64, 24)
    assert _saved_bytes(layer, x, fused=True) <= _saved_bytes(layer, x, fused=False)


def test_autocast_takes_the_plain_path():
    layer = _layer("linear")
    x = torch.randn(4, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() != "LoRALinearFunctionBackward"
