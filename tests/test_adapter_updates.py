"""The update of every registered method through the engine's adapter API: its size and its scale.

Picked up from the registry: each method runs with its default config and the variants listed in ``VARIANTS``, on
zoo models with convolutions, transformers ``Conv1D``, plain Linear layers fed non-contiguous inputs and Linear
layers only. For each, with every trained tensor moved off its initial value:

* every adapted layer's ``update_norm`` and ``delta_weights`` equal ``merged weight − W₀`` of a merged copy;
* ``scale = 0`` gives the base model's outputs and ``scale = 1`` the adapted ones, to the bit;
* at ``scale = 0.5`` the model equals a copy merged at that scale, the update of methods with a linear scale is half
  as large, a scale absorbed into the adapters' tensors leaves the outputs where they were (methods that cannot
  absorb one refuse), and merging in place at a scale then unmerging gives the base weights back.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from zoo import MODELS, run

from peft_callbacks.engine import (
    AdaptedLayer,
    AdaptedParameters,
    MethodConfig,
    get_method,
    inject,
    merge,
    registered_methods,
    scaled,
)
from peft_callbacks.engine.adapters import merge_adapter, unmerge_adapter
from peft_callbacks.engine.scaling import Scalable, scalable_modules
from peft_callbacks.methods.adalora import AdaLoRAConfig
from peft_callbacks.methods.bottleneck import BottleneckConfig
from peft_callbacks.methods.lokr import LoKrConfig
from peft_callbacks.methods.lora import LoRAConfig, ParameterLoRA
from peft_callbacks.methods.oft import OFTConfig
from peft_callbacks.methods.prompts import PromptTuningConfig, VisualPromptConfig
from peft_callbacks.methods.vera import VeRAConfig

VARIANTS: list[MethodConfig] = [  # variants whose update is computed otherwise, and sizes that keep the suite fast
    LoRAConfig(rank=4, alpha=8),
    LoRAConfig(rank=4, use_dora=True),
    LoRAConfig(rank=4, use_rslora=True),
    LoRAConfig(rank=4, init="pissa"),
    LoKrConfig(rank=1, decompose_both=True, use_effective_conv2d=True),
    OFTConfig(oft_block_size=4, coft=True, use_cayley_neumann=False),
    VeRAConfig(rank=8),
    AdaLoRAConfig(init_r=4, target_r=2, alpha=32.0),  # Λ starts at 0 and P, Q at N(0, 0.02²): a visible first step
    BottleneckConfig(bottleneck=4),
]
MODEL_NAMES = ["timm-resnet", "hf-gpt2", "hf-bert", "own-inplace"]
NOT_APPLICABLE = {  # Linear-only VeRA on a CNN; bottleneck adapters need transformer blocks
    ("vera", "timm-resnet"),
    ("adapters", "timm-resnet"),
    ("adapters", "own-inplace"),
}


def configs_of(method: str) -> list[MethodConfig]:
    return [c for c in VARIANTS if c.method == method] or [get_method(method).config_class()]


SCALABLE = [m for m in registered_methods() if get_method(m).starts_as_identity]  # prompts add tokens: no scale
CASES = [
    pytest.param(config, name, id=f"{config.method}-{i}-{name}")
    for method in SCALABLE
    for i, config in enumerate(configs_of(method))
    for name in MODEL_NAMES
    if (method, name) not in NOT_APPLICABLE
]


def _move(model: nn.Module, seed: int = 0) -> None:
    """Stand-in for training: every tensor of the inserted modules leaves its initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in scalable_modules(model).values():
            for p in module.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.05)


def _outputs(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return run(model, inputs)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * max(expected.abs().max().item(), 1e-3))


def _layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {p: m for p, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _check_sizes(model: nn.Module) -> None:
    """Each layer's update as it reports it equals merged − W₀ of a merged copy (at the model's current scales)."""
    merged = merge(copy.deepcopy(model))
    for path, layer in _layers(model).items():
        base = layer.base_layer.weight.detach().float()
        expected = merged.get_submodule(path).weight.detach().float() - base
        with torch.no_grad():
            mine = layer.delta_weights()
            norm = layer.update_norm()
        assert list(mine) == ["weight"]
        torch.testing.assert_close(mine["weight"], expected, rtol=0, atol=1e-5 * base.abs().max().item())
        bound = 1e-4 * expected.norm().item() + 1e-6 * base.norm().item()
        assert torch.isfinite(norm) and abs(norm.item() - expected.norm().item()) <= bound, path


@pytest.mark.parametrize("config, model_name", CASES)
def test_size_and_scale_of_every_method(config, model_name):
    model, inputs = MODELS[model_name]()
    model.eval().requires_grad_(False)  # the base model as surgery leaves it: frozen
    before = _outputs(model, inputs)
    inject(model, config.replace(train_head=False))
    _move(model)
    adapted = _outputs(model, inputs)
    assert not torch.equal(adapted, before)
    mergeable = get_method(config).mergeable
    if mergeable:
        assert _layers(model)
        _check_sizes(model)

    with scaled(model, 0.0):
        assert torch.equal(_outputs(model, inputs), before)
    with scaled(model, 1.0):
        assert torch.equal(_outputs(model, inputs), adapted)
    assert all(m.scale == 1.0 for m in scalable_modules(model).values())  # put back

    with scaled(model, 0.5):
        half = _outputs(model, inputs)
        if mergeable:
            _close(_outputs(merge(copy.deepcopy(model)), inputs), half, rel=1e-4)  # the merge applies the scale
            _check_sizes(model)
            halved = {p: layer.update_norm() for p, layer in _layers(model).items()}
    assert not torch.equal(half, adapted) and not torch.equal(half, before)
    if mergeable:
        for path, layer in _layers(model).items():
            if all(a.linear_scale for a in layer.adapters.values()):
                torch.testing.assert_close(halved[path], 0.5 * layer.update_norm(), rtol=1e-5, atol=1e-7)
        _check_merge_in_place(model, inputs, half)

    modules = list(scalable_modules(model).values())
    for module in modules:
        module.scale = 0.5
    if all(m.absorbs_scale for m in modules):
        for module in modules:
            module.absorb_scale()
        assert all(m.scale == 1.0 for m in modules)
        _close(_outputs(model, inputs), half, rel=1e-5)
    else:
        with pytest.raises(ValueError, match="merge it at this scale"):
            next(m for m in modules if not m.absorbs_scale).absorb_scale()


def _check_merge_in_place(model: nn.Module, inputs: dict, half: torch.Tensor) -> None:
    """Merged in place at 0.5, the model computes the half update whatever the scale is set to afterwards, and
    unmerging takes out what went in."""
    bases = {p: layer.base_layer.weight.detach().clone() for p, layer in _layers(model).items()}
    with scaled(model, 0.5):
        merge_adapter(model)
    _close(_outputs(model, inputs), half, rel=1e-4)
    unmerge_adapter(model)
    for path, layer in _layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, bases[path], rtol=0, atol=1e-5 * bases[path].abs().max())


class Experts(nn.Module):
    """Two fused expert stacks, as transformers' mixture-of-experts blocks hold them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(3, 8, 5))  # (experts, out, in)
        self.down_proj = nn.Parameter(torch.randn(3, 5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (experts, n, 5) -> (experts, n, 5)
        return torch.relu(x @ self.gate_up_proj.transpose(1, 2))[..., :4] @ self.down_proj.transpose(1, 2)


def test_lora_on_expert_parameters_reports_each_parameter_and_scales():
    experts = Experts().requires_grad_(False)
    layer = AdaptedParameters(experts)
    layer.add_adapter(
        "default", ParameterLoRA(experts, LoRAConfig(rank=2), parameter_names=["gate_up_proj", "down_proj"])
    )
    _move(layer)
    x = torch.randn(3, 6, 5)
    base, adapted = experts(x), layer(x)
    merged = {name: value - getattr(experts, name) for name, value in layer.merged_state().items()}
    mine = layer.delta_weights()
    assert list(mine) == ["gate_up_proj", "down_proj"]
    for name, delta in merged.items():
        torch.testing.assert_close(mine[name], delta, rtol=0, atol=1e-5)
    expected = torch.cat([d.flatten() for d in merged.values()]).norm()
    torch.testing.assert_close(layer.update_norm(), expected, rtol=1e-5, atol=1e-6)  # Gram matrices, per expert
    with scaled(layer, 0.0):
        assert torch.equal(layer(x), base)
    with scaled(layer, 0.5):
        half = layer(x)
        torch.testing.assert_close(layer.update_norm(), 0.5 * expected, rtol=1e-5, atol=1e-6)
    layer.adapters["default"].scale = 0.5
    layer.adapters["default"].absorb_scale()
    torch.testing.assert_close(layer(x), half, rtol=0, atol=1e-5 * half.abs().max().item())
    assert not torch.equal(half, adapted)


@pytest.mark.parametrize(
    "config, model_name",
    [(PromptTuningConfig(num_virtual_tokens=2), "hf-bert"), (VisualPromptConfig(num_virtual_tokens=2), "timm-deit")],
)
def test_prompts_refuse_a_scale_and_say_why(config, model_name):
    model, _ = MODELS[model_name]()
    inject(model, config)
    (prompt,) = [m for m in scalable_modules(model).values() if not m.scalable]
    with pytest.raises(ValueError, match=r"`scale`=0.5 cannot apply to .*add tokens to the input"):
        with scaled(model, 0.5):
            pass
    with pytest.raises(ValueError, match=r"cannot scale its update: prompts add tokens .* Got scale=0.0"):
        prompt.scale = 0.0
    with scaled(model, 1.0):
        prompt.scale = 1.0  # 1 is their only scale
    assert prompt.scale == 1.0


def test_a_scale_must_be_a_finite_number():
    net = inject(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), LoRAConfig(rank=1))
    with pytest.raises(ValueError, match=r"`scale` must be a finite number .* got nan"):
        with scaled(net, float("nan")):
            pass
    with pytest.raises(TypeError, match=r"`scale` must be a number .* got True"):
        net[0].adapters["default"].scale = True
    assert isinstance(net[0].adapters["default"], Scalable) and net[0].adapters["default"].scale == 1.0
