"""LoRA's bias options as HF PEFT has them: ``bias="none" | "all" | "lora_only"`` (which base biases train) and
``lora_bias`` (``lora_B`` gets a bias, merged into the base bias): the same trainable tensors and outputs as PEFT,
PEFT's adapters import, ours export, merges are exact, files round-trip."""

from __future__ import annotations

import pytest
import torch
from test_io_adapter_file import outputs, train_a_little
from zoo import HF_MODELS

from peft_callbacks.io import export_peft, import_peft, load_adapter, save_adapter
from peft_callbacks.methods.lora import LoRAConfig, inject_lora, merge_lora

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")  # PEFT on lora_B.bias (1-D)

OPTIONS = {"lora_bias": dict(lora_bias=True), "all": dict(bias="all"), "lora_only": dict(bias="lora_only")}
TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def trainable(model) -> set[str]:
    """Trainable tensors under PEFT's naming (no adapter name, no ``adapters`` level, no PeftModel prefix)."""
    names = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.removeprefix("base_model.model.").replace(".adapters.default", "").replace(".default", "")
            names.add(name)
    return names


def peft_model(name: str, options: dict):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name], **options)
    return peft.get_peft_model(HF_MODELS[name]()[0], config)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_same_trainable_tensors_and_outputs_as_peft(option):
    build = HF_MODELS["bert"]
    theirs = train_a_little(peft_model("bert", OPTIONS[option]))
    ours = inject_lora(build()[0], rank=4, alpha=8, target_modules=TARGETS["bert"], train_head=False, **OPTIONS[option])
    assert trainable(ours) == trainable(theirs)
    assert any(n.endswith("bias") for n in trainable(ours))


@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_peft_adapter_imports_with_equal_outputs_and_round_trips(tmp_path, option, name):
    build = HF_MODELS[name]
    inputs = build()[1]
    theirs = train_a_little(peft_model(name, OPTIONS[option]))  # A, B, B's bias and the biases moved
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = import_peft(build()[0], tmp_path / "peft")
    expected = outputs(theirs, inputs)
    close(outputs(ours, inputs), expected)
    assert trainable(ours) == trainable(theirs)

    save_adapter(ours, tmp_path / "ours")
    close(outputs(load_adapter(build()[0], tmp_path / "ours"), inputs), expected)
    export_peft(ours, tmp_path / "back")
    close(outputs(peft.PeftModel.from_pretrained(build()[0], str(tmp_path / "back")), inputs), expected)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_our_export_loads_in_peft_and_merge_equals_adapted(tmp_path, option):
    build = HF_MODELS["bert"]
    tuned, inputs = build()
    train_a_little(
        inject_lora(tuned, rank=4, alpha=8, target_modules=TARGETS["bert"], train_head=False, **OPTIONS[option])
    )
    expected = outputs(tuned, inputs)
    export_peft(tuned, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build()[0], str(tmp_path))
    close(outputs(theirs, inputs), expected)
    close(outputs(theirs.merge_and_unload(), inputs), expected)
    merged = merge_lora(tuned)
    assert set(merged.state_dict()) == set(build()[0].state_dict())  # a plain model again
    close(outputs(merged, inputs), expected)


def test_lora_bias_on_a_layer_without_bias_works_unmerged_and_refuses_to_merge():
    build = HF_MODELS["llama"]  # Llama's attention projections have no bias
    model, inputs = build()
    train_a_little(inject_lora(model, rank=4, target_modules=["q_proj"], train_head=False, lora_bias=True))
    before = outputs(model, inputs)
    with pytest.raises(ValueError, match=r"Cannot merge '.*q_proj'.*\(`lora_bias=True` on a Linear without a bias"):
        merge_lora(model)
    close(outputs(model, inputs), before)  # nothing changed


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(bias="lora"), ValueError, r"`bias` must be one of 'none', 'all', 'lora_only'; got 'lora'"),
        (dict(lora_bias="yes"), TypeError, r"`lora_bias` must be True or False, got str 'yes'"),
        (
            dict(lora_bias=True, use_dora=True),
            ValueError,
            r"`lora_bias=True` works with .* got init='default', use_dora",
        ),
        (dict(lora_bias=True, init="gaussian"), ValueError, r"`lora_bias=True` works with .* got init='gaussian'"),
        (
            dict(lora_bias=True, target_parameters="w"),
            ValueError,
            r"`lora_bias=True` cannot be used with `target_param",
        ),
    ],
)
def test_bad_bias_settings_are_refused_clearly(options, error, message):
    with pytest.raises(error, match=message):
        LoRAConfig(**options)
