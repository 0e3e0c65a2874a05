"""PiSSA / OLoRA initialisation of LoRA: the contract on the zoo, exact reloads onto a fresh base, and bad input."""

from __future__ import annotations

import pytest
import test_contract as contract

from peft_callbacks.methods.lora import LoRAConfig

ZOO = ["timm-vit", "timm-resnet", "timm-efficientnet", "hf-bert", "hf-gpt2", "hf-llama", "hf-t5"]


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2", "gaussian"])
@pytest.mark.parametrize("model_name", ZOO)
def test_contract_holds_with_each_init(model_name, init, tmp_path, monkeypatch):
    monkeypatch.setitem(contract.SMALL, "lora", LoRAConfig(rank=4, alpha=8, init=init))
    contract.test_method_contract("lora", model_name, tmp_path)
