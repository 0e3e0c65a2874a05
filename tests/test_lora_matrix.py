"""The LoRA contract over many real model families (tiny configs, no download).

For each model: only LoRA factors and the task head train; the output is unchanged at injection; one optimizer step
changes the output and leaves every base weight untouched; the merged model computes what the adapted model computed
(with B made non-zero first, so this cannot pass trivially); the merged model has the original keys and layer types.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D
from zoo import MODELS, run

from peft_callbacks import count_parameters, inject_lora, lora_layers, merge_lora
from peft_callbacks.core.heads import find_head
from peft_callbacks.methods.lora.method import lora_adapters


def _randomize_b(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    for lora in lora_adapters(model).values():
        w = lora.lora_B.weight
        w.data.copy_(torch.randn(w.shape, generator=gen) * 0.05)


def _expected_trainable(model: torch.nn.Module) -> set[int]:
    ids = set()
    for lora in lora_adapters(model).values():
        ids |= {id(lora.lora_A.weight), id(lora.lora_B.weight)}
    for path in find_head(model).head:
        ids |= {id(p) for p in model.get_submodule(path).parameters()}
    return ids


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lora_contract(name):
    model, inputs = MODELS[name]()
    model.eval()
    original_keys = list(model.state_dict())
    original_types = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        before = run(model, inputs)

    inject_lora(model, rank=4, alpha=8)
    assert lora_layers(model), "no layer was adapted"

    # only LoRA factors and the head are trainable, by identity
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == _expected_trainable(model)
    assert 0 < count_parameters(model).trainable < count_parameters(model).total

    # unchanged at injection
    with torch.no_grad():
        torch.testing.assert_close(run(model, inputs), before, rtol=0, atol=1e-6)

    # one step: output moves, frozen weights stay bit-identical
    frozen = {id(p): p.detach().clone() for p in model.parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    (run(model, inputs).float() - 1).pow(2).mean().backward()
    optimizer.step()
    for p in model.parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[id(p)])
    with torch.no_grad():
        assert not torch.allclose(run(model, inputs), before)

    # merged output equals adapted output, with non-trivial B
    _randomize_b(model)
    with torch.no_grad():
        adapted = run(model, inputs)
    merged = merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(run(merged, inputs), adapted, rtol=1e-4, atol=1e-5)
    assert list(merged.state_dict()) == original_keys
    assert {n: type(m) for n, m in merged.named_modules()} == original_types


def _merged_by_hand(layer: torch.nn.Module) -> torch.Tensor:
    """``W₀ + s·B·A`` written out here, independently of the library's own ``delta_weight``."""
    lora = layer.adapters["default"]
    base = layer.base_layer
    a, b = lora.lora_A.weight.detach(), lora.lora_B.weight.detach()
    scaling = lora.lora_alpha / lora.r
    if isinstance(base, Conv1D):
        delta = (b @ a).T  # Conv1D stores (in, out)
    elif isinstance(base, torch.nn.Linear):
        delta = b @ a
    else:  # conv: B is 1x1 (out, r, 1, …), A carries the kernel (r, in, k, …)
        delta = torch.einsum("or,rk->ok", b.flatten(1), a.flatten(1)).view(base.weight.shape)
    return base.weight.detach().clone() + scaling * delta


@pytest.mark.parametrize("name", ["timm-vit", "timm-resnet", "hf-bert", "hf-gpt2"])
def test_merge_is_idempotent_and_exact(name):
    model, inputs = MODELS[name]()
    inject_lora(model, rank=2, alpha=4)
    _randomize_b(model)
    layers = lora_layers(model)
    expected = {p: _merged_by_hand(layer) for p, layer in layers.items()}
    bases = {p: layer.base_layer for p, layer in layers.items()}
    merge_lora(model)
    snapshot = copy.deepcopy(model.state_dict())
    merge_lora(model)  # a second merge changes nothing
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key])
    for path, base in bases.items():
        assert model.get_submodule(path) is base  # the original module object is back
        torch.testing.assert_close(base.weight, expected[path], rtol=0, atol=1e-6)
