"""VeRA: the projections are rebuilt from the seed (never stored in adapter files), ``save_projection`` decides what
PEFT directories carry, projections that the seed does not give are refused, and bad arguments are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from zoo import HF_MODELS, TIMM_MODELS, run

from peft_callbacks.engine import inject, merge, peft_layers
from peft_callbacks.io import export_peft, import_peft, load_adapter, save_adapter
from peft_callbacks.methods.vera import VeRAConfig, VeRAProjections


def _projections(model) -> VeRAProjections:
    return next(iter(peft_layers(model, "vera").values())).adapters["default"].projections


def _train_a_little(model) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def test_a_reload_rebuilds_the_same_projections_from_the_seed(tmp_path):
    build = HF_MODELS["gpt2"]
    model, inputs = build()
    inject(model, VeRAConfig(rank=16, projection_prng_key=1234))
    _train_a_little(model)
    save_adapter(model, tmp_path)

    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any("vera_A" in k or "vera_B" in k for k in stored)  # only the vectors (and the head) are stored
    assert (
        json.loads((tmp_path / "adapter_recipe.json").read_text())["models"][0]["recipe"][0]["config"][
            "projection_prng_key"
        ]
        == 1234
    )

    torch.manual_seed(99)  # another global RNG state: the projections come from their own generator
    loaded = load_adapter(build()[0], tmp_path)
    ours, again = _projections(model), _projections(loaded)
    assert torch.equal(ours.vera_A, again.vera_A) and torch.equal(ours.vera_B, again.vera_B)
    assert tuple(ours.vera_A.shape) == (16, 128) and tuple(ours.vera_B.shape) == (
        128,
        16,
    )  # widest in / out: c_fc, c_proj
    with torch.no_grad():
        assert torch.equal(run(loaded.eval(), inputs), run(model.eval(), inputs))


def test_another_seed_gives_other_projections():
    a = inject(TIMM_MODELS["vit"]()[0], VeRAConfig(rank=8, projection_prng_key=0))
    b = inject(TIMM_MODELS["vit"]()[0], VeRAConfig(rank=8, projection_prng_key=1))
    assert not torch.equal(_projections(a).vera_A, _projections(b).vera_A)
    layers = peft_layers(a)
    assert len({id(layer.adapters["default"].projections) for layer in layers.values()}) == 1  # shared


def test_projections_follow_the_model_to_another_dtype_and_stay_shared():
    model = inject(HF_MODELS["bert"]()[0], VeRAConfig(rank=8, target_modules=["query", "value"]))
    model.to(torch.float64)
    adapters = [layer.adapters["default"] for layer in peft_layers(model).values()]
    assert len({id(a.projections) for a in adapters}) == 1
    assert adapters[0].projections.vera_A.dtype == torch.float64


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_projection_decides_what_a_peft_directory_carries(tmp_path, save_projection):
    peft = pytest.importorskip("peft")
    build = HF_MODELS["bert"]
    model, inputs = build()
    inject(model, VeRAConfig(rank=8, save_projection=save_projection, target_modules=["query", "value"]))
    _train_a_little(model)
    export_peft(model, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) is save_projection
    assert json.loads((tmp_path / "adapter_config.json").read_text())["save_projection"] is save_projection
    with pytest.warns(UserWarning) if not save_projection else _nothing():
        theirs = peft.PeftModel.from_pretrained(build()[0], str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(run(theirs.eval(), inputs), run(model.eval(), inputs), rtol=0, atol=1e-5)
    again = import_peft(build()[0], tmp_path)  # and back, with or without the stored projections
    with torch.no_grad():
        torch.testing.assert_close(run(again.eval(), inputs), run(model.eval(), inputs), rtol=0, atol=1e-6)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def test_projections_the_seed_does_not_give_are_refused(tmp_path):
    from safetensors.torch import save_file

    model = inject(HF_MODELS["bert"]()[0], VeRAConfig(rank=8, target_modules=["query"]))
    export_peft(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] + 1
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    fresh = HF_MODELS["bert"]()[0]
    keys = list(fresh.state_dict())
    with pytest.raises(ValueError, match=r"vera_A .* is not the one projection_prng_key=0 draws"):
        import_peft(fresh, tmp_path)
    assert list(fresh.state_dict()) == keys  # refused before anything changed for good


def test_vera_merges_into_a_plain_model():
    model, inputs = HF_MODELS["gpt2"]()
    keys = list(model.state_dict())
    inject(model, VeRAConfig(rank=8))
    _train_a_little(model)
    with torch.no_grad():
        adapted = run(model.eval(), inputs)
        merged = run(merge(model), inputs)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == keys


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="`rank` must be an int >= 1, got 0"):
        VeRAConfig(rank=0)
    with pytest.raises(ValueError, match="`projection_prng_key` must be an int >= 0, got -1"):
        VeRAConfig(projection_prng_key=-1)
    with pytest.raises(TypeError, match="`projection_prng_key` must be an int, got float"):
        VeRAConfig(projection_prng_key=1.5)
    with pytest.raises(ValueError, match="`d_initial`"):
        VeRAConfig(d_initial=0)
    with pytest.raises(ValueError, match="`dropout`"):
        VeRAConfig(dropout=1.0)
    with pytest.raises(TypeError, match="`save_projection`"):
        VeRAConfig(save_projection="yes")
    with pytest.raises(ValueError, match=r"'conv1.0' matched conv1.0 \(Conv2d\), which VeRA cannot adapt"):
        inject(TIMM_MODELS["resnet"]()[0], VeRAConfig(target_modules=["conv1.0"]))
    with pytest.raises(
        ValueError, match="No layer of ResNet was selected for VeRA"
    ):  # a CNN whose only Linear is the head
        inject(TIMM_MODELS["resnet"]()[0], VeRAConfig())
