"""LoRA on ``nn.MultiheadAttention`` (packed ``in_proj`` and ``out_proj``) equals HF PEFT's ``MultiheadAttention``
LoRA layer, on a plain module and on torchvision's Vision Transformer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from test_io_adapter_file import train_a_little

from peft_callbacks.engine import AdaptedParameters
from peft_callbacks.io import export_peft, import_peft, load_adapter, save_adapter
from peft_callbacks.methods.lora import inject_lora, lora_layers, merge_lora
from peft_callbacks.methods.lora.mha import LoRAMultiheadAttention

peft = pytest.importorskip("peft")
vision_transformer = pytest.importorskip("torchvision.models.vision_transformer")


class Attend(nn.Module):
    """Token embeddings → self-attention → mean → classifier (``batch_first`` either way)."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 16)
        self.attention = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h if self.batch_first else h.transpose(0, 1)
        out, _ = self.attention(h, h, h, need_weights=False)
        return self.classifier(out.mean(1 if self.batch_first else 0))


def _attend(batch_first: bool = True):
    torch.manual_seed(0)
    return Attend(batch_first).eval(), torch.randn(2, 5, 6)


def _vit():
    torch.manual_seed(0)
    model = vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24, num_classes=5
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero: outputs would be 0
    return model.eval(), torch.randn(2, 3, 32, 32)


def _open_clip():
    transformer = pytest.importorskip("open_clip.transformer")
    torch.manual_seed(0)
    visual = transformer.VisionTransformer(  # the visual tower of open_clip's CLIP models, tiny
        image_size=32, patch_size=8, width=16, layers=2, heads=2, mlp_ratio=2.0, output_dim=8
    )
    return visual.eval(), torch.randn(2, 3, 32, 32)


MODELS = {  # (build, targets as PEFT names them)
    "attend": (_attend, ["attention", "embed"]),
    "attend-seq-first": (lambda: _attend(False), ["attention"]),
    "torchvision-vit": (_vit, ["self_attention", "mlp.0"]),
    "open-clip-visual": (_open_clip, ["attn", "c_fc"]),
}


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_peft_attention_lora_imports_with_the_same_outputs(tmp_path, name):
    build, targets = MODELS[name]
    base, x = build()
    reference = _out(base, x)
    theirs = train_a_little(peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)))
    theirs.save_pretrained(str(tmp_path))
    expected = _out(theirs, x)
    assert not torch.allclose(expected, reference, atol=1e-3)  # the perturbed adapter changes the output

    ours = import_peft(build()[0], tmp_path)
    attention = [a for layer in lora_layers(ours).values() for a in layer.adapters.values()]
    assert any(isinstance(a, LoRAMultiheadAttention) for a in attention)
    _close(_out(ours, x), expected)


def test_a_file_of_a_peft_that_applied_out_proj_twice_imports_with_that_update_doubled(tmp_path):
    build, targets = MODELS["attend"]
    theirs = train_a_little(peft.get_peft_model(build()[0], peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)))
    theirs.save_pretrained(str(tmp_path))
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config["peft_version"] >= "0.22"  # the PEFT these tests run (it applies the update once)
    once = import_peft(build()[0], tmp_path)
    config["peft_version"] = "0.21.2"  # the same tensors, as PEFT 0.21.2 would have saved them (it applied it twice)
    config_file.write_text(json.dumps(config))
    twice = import_peft(build()[0], tmp_path)
    a_once, a_twice = (
        next(a for layer in lora_layers(m).values() for a in layer.adapters.values() if hasattr(a, "out_proj"))
        for m in (once, twice)
    )
    assert torch.equal(a_twice.out_proj.lora_B.weight, 2 * a_once.out_proj.lora_B.weight)
    assert torch.equal(a_twice.lora_B.weight, a_once.lora_B.weight)  # in_proj's update was applied once by both


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_loads_in_peft_and_merge_equals_adapted(tmp_path, name):
    build, targets = MODELS[name]
    tuned, x = build()
    train_a_little(inject_lora(tuned, rank=4, alpha=8, target_modules=targets))
    expected = _out(tuned, x)
    export_peft(tuned, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not config["target_parameters"]  # the attention is a module target in PEFT's config
    assert config["peft_version"] == "0.22.0"  # for a PEFT that applies out_proj's update once
    theirs = peft.PeftModel.from_pretrained(build()[0], str(tmp_path))
    _close(_out(theirs, x), expected)

    save_adapter(tuned, tmp_path / "ours")
    _close(_out(load_adapter(build()[0], tmp_path / "ours"), x), expected)

    merged = merge_lora(tuned)
    assert not any(isinstance(m, AdaptedParameters) for m in merged.modules())
    assert all(type(p) is nn.Parameter for p in merged.parameters())  # registered parameters again, as built
    _close(_out(merged, x), expected)


def test_torchvision_vit_adapts_its_attention_by_default_and_trains_only_the_factors():
    model, x = _vit()
    base = {id(p): p.detach().clone() for p in model.parameters()}
    inject_lora(model, rank=2)
    layers = lora_layers(model)
    attention = [p for p in layers if p.endswith("self_attention")]
    assert len(attention) == 2 and "heads.head" not in layers
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model.train()(x).square().mean().backward()
        optimizer.step()
    attn = model.encoder.layers[0].self_attention.adapters["default"]
    assert attn.lora_B.weight.abs().sum() > 0 and attn.out_proj.lora_B.weight.abs().sum() > 0  # both got gradients
    frozen = [p for p in model.parameters() if id(p) in base and not p.requires_grad]
    assert len(frozen) == len(base) - 2  # all but the head's weight and bias
    assert all(torch.equal(p, base[id(p)]) for p in frozen)  # the base weights are bit-exact


def test_open_clip_visual_tower_adapts_its_attention_by_default():
    model, x = _open_clip()
    expected = _out(model, x)
    inject_lora(model, rank=2)
    layers = lora_layers(model)
    assert {"transformer.resblocks.0.attn", "transformer.resblocks.1.attn"} <= set(layers)
    _close(_out(model, x), expected)  # B = 0: the same outputs at injection


def test_attention_that_cannot_be_adapted_is_refused_with_its_name():
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)  # separate q, k, v weights
            self.fc = nn.Linear(8, 2)

    with pytest.raises(ValueError, match=r"'attention' matched attention \(MultiheadAttention\), which LoRA cannot"):
        inject_lora(Cross(), rank=2, target_modules=["attention"])
    with pytest.raises(ValueError, match="`use_dora=True` is not supported on nn.MultiheadAttention"):
        inject_lora(_attend()[0], rank=2, target_modules=["attention"], use_dora=True)
