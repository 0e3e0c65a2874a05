"""The contract every registered method keeps, for each of its example configs, on the models of the zoo: picked up
from the registry, so a method registered later gets all of this by registering.

Each method declares its examples (:attr:`~peft_callbacks.engine.Method.examples`: one small config per variant —
DoRA, an init, LoKr's ``decompose_both`` …), the models it applies to (:meth:`~peft_callbacks.engine.Method.applies_to`)
and the tolerances of its identity and merge checks. For each (method, example, model) the method applies to: the
injection changes nothing until training (for methods that start as the identity); exactly the method's tensors and the
task head are trainable, by identity; one optimizer step moves the output and leaves every frozen tensor bit-identical;
with every trained tensor moved away from its initial value, an adapter file reloads onto a fresh base with the same
outputs, a recorded recipe replays onto a fresh base, and mergeable methods merge into a model with the adapted outputs
and the original keys and layer types, while the others unload back to the original keys. Any error is a failure.

Where the declaration says the method does not apply to a model, the case is skipped with the declared kind as the
reason, after checking that the method refuses that model with a ``ValueError`` that names it and leaves it unchanged:
a declaration cannot hide a failure, nor claim a refusal the method does not make.

Which cases run (bounded, so the contract stays about a minute on two cores): each method's first example (its plain
form) on every zoo model, and each of its other examples on :data:`REPRESENTATIVES`, one model of each layer kind and
family (a timm transformer and CNN, GPT-2's Conv1D, an encoder, a mixture-of-experts decoder, an encoder-decoder).
Every example on every zoo model would be three times as many cases for little more: the zoo's other models differ
from these in their family, which the first example already meets.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from zoo import MODELS, run

from peft_callbacks.core.heads import find_head
from peft_callbacks.core.recipe import surgery_records
from peft_callbacks.engine import (
    LayerConfig,
    MethodConfig,
    get_method,
    inject,
    merge,
    registered_methods,
    replay,
    unload,
)
from peft_callbacks.io import load_adapter, save_adapter
from peft_callbacks.io.state import peft_owned

Build = Callable[[], tuple[nn.Module, dict]]

# models of each kind the examples apply to: a timm transformer and CNN, a GPT-2 (Conv1D layers), an encoder, a decoder
# with experts, an encoder-decoder
REPRESENTATIVES = ("timm-vit", "timm-resnet", "hf-gpt2", "hf-bert", "hf-qwen3moe", "hf-t5")


def package_methods() -> list[str]:
    """The registered methods of the package (tests register tiny methods of their own, with no examples)."""
    return [m for m in registered_methods() if type(get_method(m)).__module__.startswith("peft_callbacks.")]


def _cases() -> list:
    """The first example of each method (its plain form) on every zoo model; each other example on the
    :data:`REPRESENTATIVES` (see the module's docstring)."""
    cases = []
    for method in package_methods():
        first, *others = get_method(method).example_configs()
        cases += [(method, first, model) for model in sorted(MODELS)]
        cases += [(method, example, model) for example in others for model in REPRESENTATIVES]
    return [pytest.param(*case, id="-".join(case)) for case in cases]


CASES = _cases()


def _build(model_name: str) -> tuple[nn.Module, dict]:
    model, inputs = MODELS[model_name]()
    return model.eval(), inputs


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


def check_contract(config: MethodConfig, build: Build, tmp_path: Path) -> None:
    """The contract for one config on the model ``build()`` makes (a fresh one, with its inputs, at each call)."""
    method = get_method(config)
    model, inputs = build()
    original_keys = list(model.state_dict())
    original_types = {n: type(m) for n, m in model.named_modules()}
    before = _outputs(model, inputs)
    inject(model, config)

    if method.starts_as_identity:
        _assert_close(_outputs(model, inputs), before, rel=method.identity_tolerance)

    # exactly the method's own tensors, the head, and what the method says it trains besides
    head = find_head(model).head if config.train_head else []
    expected = set(peft_owned(model))
    expected |= {id(p) for path in head for p in model.get_submodule(path).parameters()}
    expected |= {id(p) for m in method.trainable_extras(model, config) for p in m.parameters()}
    if getattr(config, "bias", "none") == "all":  # HF PEFT's bias options: every bias, or the adapted layers' own
        expected |= {id(p) for n, p in model.named_parameters() if n.split(".")[-1] == "bias"}
    elif getattr(config, "bias", "none") != "none":
        layers = [getattr(m, "base_layer", None) for m in method.modules(model).values()]
        expected |= {id(b) for b in (getattr(layer, "bias", None) for layer in layers) if b is not None}
    parameters = {id(p): p for p in model.parameters()}
    trainable = {i for i, p in parameters.items() if p.requires_grad}
    assert trainable == {i for i in expected if i in parameters}
    assert trainable and trainable <= expected

    # one step: the output moves, every frozen tensor stays bit-identical
    frozen = {i: p.detach().clone() for i, p in parameters.items() if not p.requires_grad}
    model.train()
    optimizer = torch.optim.SGD([parameters[i] for i in trainable], lr=0.5)
    (run(model, inputs).float() - 1).pow(2).mean().backward()
    optimizer.step()
    model.eval()
    assert frozen and all(torch.equal(parameters[i], value) for i, value in frozen.items())
    stepped = _outputs(model, inputs)
    assert not torch.allclose(stepped, before, atol=1e-6)

    _move_trained(model)
    adapted = _outputs(model, inputs)

    # an adapter file reloads onto a fresh base; the recipe replays onto another
    save_adapter(model, tmp_path)
    loaded = load_adapter(build()[0], tmp_path)
    _assert_close(_outputs(loaded, inputs), adapted, rel=1e-6)
    replayed = replay(build()[0], surgery_records(model))
    replayed.load_state_dict(model.state_dict())
    _assert_close(_outputs(replayed, inputs), adapted, rel=1e-6)

    if method.mergeable:
        merged = merge(model)
        _assert_close(_outputs(merged, inputs), adapted, rel=method.merge_tolerance)
    else:
        unload(model)
    assert list(model.state_dict()) == original_keys
    assert {n: type(m) for n, m in model.named_modules()} == original_types
    assert not surgery_records(model)


def _assert_refused(model: nn.Module, config: MethodConfig) -> None:
    """``inject`` refuses ``model`` with a ValueError naming it (or the module of it that does not fit), and leaves
    it as it was; or, for a config whose adapters train there but cannot be folded (LoRA's ``lora_bias`` on a layer
    without a bias), ``merge`` refuses naming the layer, and unloading gives the model back."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError) as refusal:
        inject(model, config)
        if get_method(config).mergeable:
            try:
                merge(model)
            finally:
                unload(model)
    message = str(refusal.value)
    assert type(model).__name__ in message or any(f"'{path}'" in message for path in types if path), message
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method, example, model_name", CASES)
def test_method_contract(method, example, model_name, tmp_path):
    config = get_method(method).example_configs()[example]
    kind = get_method(method).applies_to(config)
    model, _ = _build(model_name)
    if not kind(model):
        _assert_refused(model, config)
        pytest.skip(f"{method} {example!r} applies to {kind.description}")
    check_contract(config, lambda: _build(model_name), tmp_path)


@pytest.fixture(scope="module")
def zoo() -> dict[str, nn.Module]:
    return {name: _build(name)[0] for name in sorted(MODELS)}


@pytest.mark.parametrize("method", package_methods())
def test_every_example_is_a_config_of_its_method_and_runs_on_some_model(method, zoo):
    """An example that applies to none of the models :data:`CASES` gives it would never run: each one runs."""
    declared = get_method(method)
    runs_on: dict[str, list[str]] = {}
    for case in CASES:
        name, example, model = case.values
        if name == method:
            runs_on.setdefault(example, []).append(model)
    for name, config in declared.example_configs().items():
        assert type(config) is declared.config_class, name
        kind = declared.applies_to(config)
        assert any(kind(zoo[model]) for model in runs_on[name]), (
            f"{method} {name!r} applies to none of {runs_on[name]} ({kind.description})"
        )


def _switches(config_class: type[MethodConfig]) -> list[dataclasses.Field]:
    """The bool fields of a method's own config (not the ones every method or layer method shares)."""
    shared = {f.name for f in dataclasses.fields(LayerConfig)}
    hints = typing.get_type_hints(config_class)
    return [f for f in dataclasses.fields(config_class) if f.name not in shared and hints[f.name] is bool]


@pytest.mark.parametrize("method", package_methods())
def test_examples_turn_every_switch_of_the_method(method):
    """Each bool setting of the method's own config takes its other value in some example, so the contract runs
    every variant it switches on (a setting added later needs an example)."""
    declared = get_method(method)
    examples = declared.example_configs().values()
    for field in _switches(declared.config_class):
        assert any(getattr(config, field.name) is not field.default for config in examples), (
            f"no example of {method} sets {field.name}={not field.default}"
        )
