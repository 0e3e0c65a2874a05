"""VeRA, AdaLoRA and PiSSA/OLoRA-initialised LoRA against HF PEFT (the reference), fp32, on the zoo's ViT, ResNet (where
the method adapts convolutions), BERT, GPT-2 (``Conv1D``) and Llama.

Given the same adapter tensors, moved away from their initial values so that identity cannot pass: the outputs equal
PEFT's at atol 1e-5, the merged weights equal ``merge_and_unload``'s, the trainable-parameter counts are equal, a
directory PEFT saves imports here with equal outputs, and our export loads in PEFT with equal outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from zoo import MODELS, run

from peft_callbacks.engine import inject, merge, peft_layers
from peft_callbacks.io import export_peft, import_peft
from peft_callbacks.methods.adalora import AdaLoRAConfig
from peft_callbacks.methods.lora import LoRAConfig
from peft_callbacks.methods.vera import VeRAConfig

peft = pytest.importorskip("peft")


def _vera(targets, conv1d):
    ours = VeRAConfig(rank=8, projection_prng_key=3, train_head=False, target_modules=targets)
    return ours, lambda paths: peft.VeraConfig(r=8, projection_prng_key=3, target_modules=paths, fan_in_fan_out=conv1d)


def _adalora(targets, conv1d):
    ours = AdaLoRAConfig(init_r=4, target_r=2, alpha=6.0, total_step=20, train_head=False, target_modules=targets)
    return ours, lambda paths: peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=6, total_step=20, target_modules=paths, fan_in_fan_out=conv1d
    )


def _lora_init(init):
    def build(targets, conv1d):
        ours = LoRAConfig(rank=4, alpha=8, init=init, train_head=False, target_modules=targets)
        return ours, lambda paths: peft.LoraConfig(
            r=4, lora_alpha=8, init_lora_weights=init, target_modules=paths, fan_in_fan_out=conv1d
        )

    return build


METHODS = {"vera": _vera, "adalora": _adalora, "pissa": _lora_init("pissa"), "olora": _lora_init("olora")}
TARGETS = {  # None: the default selection (every Linear / Conv1D / conv outside the head)
    "timm-vit": None,
    "timm-resnet": ["layer1.0.conv1", "layer2.0.conv2", "layer2.0.downsample.1"],
    "hf-bert": None,
    "hf-gpt2": None,
    "hf-llama": None,
}
CASES = [
    (method, model)
    for method in METHODS
    for model in TARGETS
    if not (model == "timm-resnet" and method != "adalora")  # PEFT defines VeRA, PiSSA, OLoRA for Linear layers only
    if not (model == "hf-gpt2" and method == "olora")  # PEFT's OLoRA assigns Conv1D's transposed QR factors as is
]


def _peft_key(path: str, key: str) -> str:
    """PEFT's state_dict key of our adapter tensor ``key`` of the layer at ``path`` (adapter name inside)."""
    first, _, rest = key.partition(".")
    return f"base_model.model.{path}.{first}.default" + (f".{rest}" if rest else "")


def _move_and_copy(model: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Move every trained adapter tensor of ours away from its start and give PEFT the same values."""
    generator = torch.Generator().manual_seed(7)
    state = theirs.state_dict()
    copied = 0
    with torch.no_grad():
        for path, layer in peft_layers(model).items():
            for key, tensor in layer.adapters["default"].state_dict(keep_vars=True).items():
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
                if _peft_key(path, key) in state:
                    state[_peft_key(path, key)].copy_(tensor)
                    copied += 1
    trained = [k for k, p in theirs.named_parameters() if p.requires_grad]
    assert copied >= len(trained) > 0


def _outputs(model, inputs):
    with torch.no_grad():
        return run(model.eval(), inputs)


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method, model_name", CASES)
def test_same_tensors_same_model_as_peft(method, model_name, tmp_path):
    build = MODELS[model_name]
    model, inputs = build()
    base = _outputs(model, inputs)
    targets = "all-linear" if method in ("pissa", "olora") and TARGETS[model_name] is None else TARGETS[model_name]
    ours_config, theirs_config = METHODS[method](targets, model_name == "hf-gpt2")  # PEFT: PiSSA/OLoRA on Linear
    reference = copy.deepcopy(model)
    inject(model, ours_config)
    theirs = peft.get_peft_model(reference, theirs_config(list(peft_layers(model))))
    assert _trainable(model) == _trainable(theirs)

    _move_and_copy(model, theirs)
    ours_out, theirs_out = _outputs(model, inputs), _outputs(theirs, inputs)
    torch.testing.assert_close(ours_out, theirs_out, rtol=0, atol=1e-5)
    assert not torch.allclose(ours_out, base, atol=1e-4)  # the adapters really change the output

    export_peft(model, tmp_path / "ours")  # ours -> PEFT
    loaded = peft.PeftModel.from_pretrained(build()[0], str(tmp_path / "ours"))
    torch.testing.assert_close(_outputs(loaded, inputs), ours_out, rtol=0, atol=1e-5)
    theirs.save_pretrained(str(tmp_path / "theirs"))  # PEFT -> ours
    imported = import_peft(build()[0], tmp_path / "theirs")
    torch.testing.assert_close(_outputs(imported, inputs), theirs_out, rtol=0, atol=1e-5)

    merged, reference_merged = merge(model).state_dict(), theirs.merge_and_unload().state_dict()
    assert list(merged) == list(reference_merged)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, reference_merged[key], rtol=0, atol=1e-5, msg=key)
