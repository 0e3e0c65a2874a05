"""Half precision: LoRA trains on bf16/fp16 models and merges without losing more than one rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from zoo import HF_MODELS, run

from peft_callbacks import inject_lora, merge_lora
from peft_callbacks.methods.lora.method import lora_adapters

HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 3)).to(dtype)


def _train(model: nn.Module, forward, steps: int = 12, **optimizer_kwargs) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, **optimizer_kwargs)
    losses = []
    for _ in range(steps):
        loss = forward()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _classification_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda: nn.functional.cross_entropy(model(x).float(), y)


@pytest.mark.parametrize("dtype", HALF)
def test_lora_factors_follow_the_model_dtype_and_train(dtype):
    model = inject_lora(_mlp(dtype), rank=4)
    factors = [p for layer in lora_adapters(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    assert factors and all(p.dtype == dtype for p in factors)
    x, y = torch.randn(16, 16, dtype=dtype), torch.randint(0, 3, (16,))
    # fp16 AdamW needs an eps that fp16 can represent (1e-8 rounds to 0 and 0/0 gives NaN)
    losses = _train(model, _classification_loss(model, x, y), eps=1e-4 if dtype == torch.float16 else 1e-8)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(bool(layer.lora_B.weight.abs().sum() > 0) for layer in lora_adapters(model).values())


def test_bf16_transformer_trains_with_lora():
    model, inputs = HF_MODELS["bert"]()
    model = inject_lora(model.to(torch.bfloat16).train(), rank=4)
    labels = torch.tensor([0, 2])
    losses = _train(model, lambda: nn.functional.cross_entropy(run(model, inputs).float(), labels), steps=8)
    assert losses[-1] < losses[0]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", HALF)
def test_fp32_lora_factors_on_a_half_precision_base(dtype):
    """The other recipe: keep the factors in float32 (full-precision optimizer state) around a frozen half base."""
    model = inject_lora(_mlp(dtype), rank=4, train_head=False)
    for layer in lora_adapters(model).values():
        layer.lora_A.float()
        layer.lora_B.float()
    x, y = torch.randn(16, 16, dtype=dtype), torch.randint(0, 3, (16,))
    out = model(x)
    assert out.dtype == dtype  # the LoRA branch is cast back to the base output's dtype
    losses = _train(model, _classification_loss(model, x, y))  # default AdamW eps: fine in float32
    assert losses[-1] < 0.5 * losses[0]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trained)


def test_fp32_model_with_lora_trains_under_bf16_autocast():
    model = inject_lora(_mlp(torch.float32), rank=4)
    x, y = torch.randn(16, 16), torch.randint(0, 3, (16,))

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        return nn.functional.cross_entropy(out.float(), y)

    losses = _train(model, loss)
    assert losses[-1] < 0.5 * losses[0]
    layer = next(iter(lora_adapters(model).values()))
    assert layer.lora_B.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_merge_is_one_rounding_of_the_fp32_merge(dtype):
    torch.manual_seed(0)
    model = inject_lora(nn.Sequential(nn.Linear(256, 192), nn.Linear(192, 2)).to(dtype), rank=8)
    layer, lora = model[0], model[0].adapters["default"]
    with torch.no_grad():  # non-identity factors, so the merge has something to lose
        nn.init.normal_(lora.lora_A.weight, std=0.05)
        nn.init.normal_(lora.lora_B.weight, std=0.05)
    base = layer.base_layer.weight.detach().clone()
    exact = base.float() + (lora.lora_B.weight.float() @ lora.lora_A.weight.float()) * lora.scaling  # float32 merge
    naive = base + (lora.lora_B.weight @ lora.lora_A.weight) * lora.scaling  # merging in half precision
    x = torch.randn(4, 256, dtype=dtype)
    before = model(x)

    merge_lora(model)
    merged = model[0].weight.detach()
    assert merged.dtype == dtype and isinstance(model[0], nn.Linear)

    def error(w):
        return (w.float() - exact).abs()

    assert error(merged).max() <= error(exact.to(dtype)).max()  # no worse than casting the fp32 merge
    assert error(merged).mean() < error(naive).mean()  # and better than merging in half precision
    torch.testing.assert_close(model(x), before, atol=0.05, rtol=0.05)
