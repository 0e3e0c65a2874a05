"""The contract every registered method keeps, on every model of the zoo: picked up from the registry automatically.

For each (method, model): the injection changes nothing until training (for methods that start as the identity);
exactly the method's tensors and the task head are trainable, by identity; one optimizer step moves the output and
leaves every frozen tensor bit-identical; with every trained tensor moved away from its initial value, an adapter
file reloads onto a fresh base with the same outputs, a recorded recipe replays onto a fresh base, and mergeable
methods merge into a model with the adapted outputs and the original keys and layer types, while the others unload
back to the original keys. A method registered later gets all of this by registering.

Methods that insert modules (adapters, prompts) apply to the model families they support: the others refuse with a
``ValueError`` that the test accepts as "not applicable", and each such method must apply to some models. Layer
methods defined for Linear layers only (VeRA, as in HF PEFT) are "not applicable" to CNNs whose only Linear layer is
the head; every other layer method adapts every zoo model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from zoo import MODELS, run

from peft_callbacks.core.heads import find_head
from peft_callbacks.core.kinds import layer_kind
from peft_callbacks.core.recipe import surgery_records
from peft_callbacks.core.targets import in_subtree
from peft_callbacks.engine import LayerMethod, get_method, inject, merge, registered_methods, replay, unload
from peft_callbacks.io import load_adapter, save_adapter
from peft_callbacks.io.state import peft_owned
from peft_callbacks.methods.adalora import AdaLoRAConfig
from peft_callbacks.methods.bottleneck import BottleneckConfig
from peft_callbacks.methods.lora import LoRAConfig
from peft_callbacks.methods.prompts import PromptTuningConfig, VisualPromptConfig
from peft_callbacks.methods.vera import VeRAConfig

SMALL = {  # smaller than the defaults, to keep the suite fast; any other method runs with its defaults
    "lora": LoRAConfig(rank=4, alpha=8),
    "adapters": BottleneckConfig(bottleneck=4),
    "prompt_tuning": PromptTuningConfig(num_virtual_tokens=3),
    "visual_prompts": VisualPromptConfig(num_virtual_tokens=3),
    "vera": VeRAConfig(rank=16),
    # P and Q start at N(0, 0.02²) and Λ at 0: a larger alpha makes the first step's change measurable
    "adalora": AdaLoRAConfig(init_r=4, target_r=2, alpha=32.0),
}
CASES = [(method, model) for method in registered_methods() for model in sorted(MODELS)]


def _config(method: str):
    return SMALL.get(method) or get_method(method).config_class()


def _build(model_name: str) -> tuple[nn.Module, dict]:
    model, inputs = MODELS[model_name]()
    return model.eval(), inputs


def _inject(model: nn.Module, method: str, model_name: str) -> None:
    try:
        inject(model, _config(method))
    except ValueError as err:
        layer_method = get_method(method)
        if isinstance(layer_method, LayerMethod) and ("conv" in layer_method.adapter_classes or _has_linear(model)):
            raise  # layer methods adapt every zoo model (those without convolutions: every one with a Linear body)
        pytest.skip(f"{method} does not apply to {model_name}: {err}")


def _has_linear(model: nn.Module) -> bool:
    """Has the model a Linear (or Conv1D) layer outside its task head?"""
    head = find_head(model).all_paths
    return any(
        layer_kind(m) in ("linear", "hf_conv1d") and not in_subtree(path, head) for path, m in model.named_modules()
    )


def _move_trained(model: nn.Module, seed: int = 5) -> None:
    """Stand-in for training: every trainable tensor leaves its initial value (LoRA's B, IA3's ones, …)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.05)


def _outputs(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return run(model, inputs)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """``actual`` equals ``expected`` within ``rel`` times the largest output: float rounding grows with the values
    compared (and with how deep the model is), so an absolute bound passes on one CPU and fails on another."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * max(expected.abs().max().item(), 1e-3))


@pytest.mark.parametrize("method, model_name", CASES)
def test_method_contract(method, model_name, tmp_path):
    model, inputs = _build(model_name)
    original_keys = list(model.state_dict())
    original_types = {n: type(m) for n, m in model.named_modules()}
    before = _outputs(model, inputs)
    _inject(model, method, model_name)

    if get_method(method).starts_as_identity:
        _assert_close(_outputs(model, inputs), before, rel=1e-6)

    # exactly the method's own tensors, the head, and what the method says it trains besides
    head = find_head(model).head if _config(method).train_head else []
    expected = {i for i in peft_owned(model)}
    expected |= {id(p) for path in head for p in model.get_submodule(path).parameters()}
    expected |= {id(p) for m in get_method(method).trainable_extras(model, _config(method)) for p in m.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {i for i in expected if i in {id(p) for p in model.parameters()}}
    assert trainable and trainable <= expected

    # one step: the output moves, every frozen tensor stays bit-identical
    frozen = {id(p): p.detach().clone() for p in model.parameters() if not p.requires_grad}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    (run(model, inputs).float() - 1).pow(2).mean().backward()
    optimizer.step()
    model.eval()
    assert all(torch.equal(p, frozen[id(p)]) for p in model.parameters() if not p.requires_grad)
    stepped = _outputs(model, inputs)
    assert not torch.allclose(stepped, before, atol=1e-6)

    _move_trained(model)
    adapted = _outputs(model, inputs)

    # an adapter file reloads onto a fresh base; the recipe replays onto another
    save_adapter(model, tmp_path)
    loaded = load_adapter(_build(model_name)[0], tmp_path)
    _assert_close(_outputs(loaded, inputs), adapted, rel=1e-6)
    replayed = replay(_build(model_name)[0], surgery_records(model))
    replayed.load_state_dict(model.state_dict())
    _assert_close(_outputs(replayed, inputs), adapted, rel=1e-6)

    if get_method(method).mergeable:
        merged = merge(model)
        _assert_close(_outputs(merged, inputs), adapted, rel=1e-4)
    else:
        unload(model)
    assert list(model.state_dict()) == original_keys
    assert {n: type(m) for n, m in model.named_modules()} == original_types
    assert not surgery_records(model)


@pytest.mark.parametrize("method", [m for m in registered_methods() if not isinstance(get_method(m), LayerMethod)])
def test_every_module_method_applies_to_some_zoo_models(method):
    applied = []
    for name in sorted(MODELS):
        try:
            inject(_build(name)[0], _config(method))
        except ValueError:
            continue
        applied.append(name)
    assert len(applied) >= 2, f"{method} applies to {applied} only"
