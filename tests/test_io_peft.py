"""HF PEFT interop: our LoRA exported for ``peft.PeftModel.from_pretrained``, and PEFT LoRA imported into ours."""

from __future__ import annotations

import json

import pytest
import torch
from test_io_adapter_file import outputs, train_a_little
from zoo import HF_MODELS

from peft_callbacks.io import export_peft, import_peft, load_adapter, save_adapter
from peft_callbacks.methods.lora import inject_lora, lora_layers

peft = pytest.importorskip("peft")

TARGETS = {"bert": ["query", "value"], "gpt2_cls": ["c_attn", "c_fc"]}
HEADS = {"bert": "classifier", "gpt2_cls": "score"}


@pytest.mark.parametrize("name", ["bert", "gpt2_cls"])
def test_export_loads_in_peft_with_the_same_outputs(tmp_path, name):
    build = HF_MODELS[name]
    tuned, inputs = build()
    train_a_little(inject_lora(tuned, rank=4, alpha=8, target_modules=TARGETS[name]))
    export_peft(tuned, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["fan_in_fan_out"] is (name == "gpt2_cls")
    assert config["modules_to_save"] == [HEADS[name]]
    theirs = peft.PeftModel.from_pretrained(build()[0], str(tmp_path))
    torch.testing.assert_close(outputs(theirs, inputs), outputs(tuned, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["bert", "gpt2_cls"])
def test_import_of_a_peft_directory_gives_the_same_outputs(tmp_path, name):
    build = HF_MODELS[name]
    base, inputs = build()
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=TARGETS[name], modules_to_save=[HEADS[name]], use_rslora=True
    )
    theirs = train_a_little(peft.get_peft_model(base, config))
    theirs.save_pretrained(str(tmp_path))

    ours = import_peft(build()[0], tmp_path)
    assert len(lora_layers(ours)) == 2 * len(TARGETS[name])
    torch.testing.assert_close(outputs(ours, inputs), outputs(theirs, inputs), atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in ours.get_submodule(HEADS[name]).parameters())

    save_adapter(ours, tmp_path / "ours")  # an imported adapter is ours: it saves and loads as any other
    again = load_adapter(build()[0], tmp_path / "ours")
    assert torch.equal(outputs(again, inputs), outputs(ours, inputs))


def test_peft_dora_directory_imports_with_the_same_outputs(tmp_path):
    build = HF_MODELS["bert"]
    base, inputs = build()
    theirs = train_a_little(peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query"], use_dora=True)))
    theirs.save_pretrained(str(tmp_path))
    ours = import_peft(build()[0], tmp_path)
    torch.testing.assert_close(outputs(ours, inputs), outputs(theirs, inputs), atol=1e-5, rtol=0)


def test_unsupported_peft_directories_are_refused(tmp_path):
    base, _ = HF_MODELS["bert"]()
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query"])).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "layer_replication": [[0, 1]]}))
    with pytest.raises(ValueError, match="does not support: layer_replication"):
        import_peft(HF_MODELS["bert"]()[0], tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"query": 4}}))
    with pytest.raises(ValueError, match=r"shapes differ: .*lora_A.weight \(2, 32\) vs \(4, 32\)"):
        import_peft(HF_MODELS["bert"]()[0], tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "FOURIERFT"}))
    with pytest.raises(ValueError, match="peft_type='FOURIERFT'; peft_callbacks imports .*'LORA'"):
        import_peft(HF_MODELS["bert"]()[0], tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle and is never loaded"):
        import_peft(HF_MODELS["bert"]()[0], tmp_path)


def test_export_needs_lora(tmp_path):
    with pytest.raises(ValueError, match=r"holds no adapter to export \(`adapter_name`\)"):
        export_peft(HF_MODELS["bert"]()[0], tmp_path)
