"""LoRA on the fused 3-D expert weights of transformers' mixture-of-experts models (``target_parameters``) equals
HF PEFT, keeps the engine's contract, and mixture-of-experts routers stay out of default target selections.

The models are tiny transformers 5 MoE models built from configs: Qwen3-MoE (experts stored ``(E, out, in)``, run by
the eager loop and by ``grouped_mm``) and GPT-OSS (``is_transposed``: ``(E, in, out)``), and Switch Transformers,
whose router is an ``nn.Linear``.
"""

from __future__ import annotations

import copy
import logging

import pytest
import test_contract as contract
import torch
import transformers as hf

from peft_callbacks import LoRACallback
from peft_callbacks.engine import inject, merge, peft_layers, unload
from peft_callbacks.io import export_peft, import_peft
from peft_callbacks.methods.lora import LoRAConfig, ParameterLoRA
from peft_callbacks.methods.lora.plus import lora_B_parameters

peft = pytest.importorskip("peft")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _qwen3_moe(implementation: str = "grouped_mm") -> torch.nn.Module:
    torch.manual_seed(0)
    config = hf.Qwen3MoeConfig(
        **_SMALL, intermediate_size=37, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, vocab_size=99
    )
    model = hf.Qwen3MoeForCausalLM(config).eval()
    model.config._experts_implementation = implementation
    return model


def _gpt_oss() -> torch.nn.Module:
    torch.manual_seed(0)
    config = hf.GptOssConfig(
        **_SMALL, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, vocab_size=99, sliding_window=8
    )
    return hf.GptOssForCausalLM(config).eval()


MODELS = {"qwen3moe-eager": lambda: _qwen3_moe("eager"), "qwen3moe-grouped_mm": _qwen3_moe, "gpt_oss": _gpt_oss}


def _inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(3, 99, (2, 7), generator=generator)}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def _their_key(path: str, layer, key: str) -> str:
    """PEFT's parameter name for our adapter key: one nested ParamWrapper per parameter, the first innermost."""
    adapter = layer.adapters["default"]
    factor, *rest = key.split(".")
    if isinstance(adapter, ParameterLoRA):
        name = rest[0]
        nesting = ".base_layer" * (len(adapter.parameter_names) - 1 - adapter.parameter_names.index(name))
        return f"base_model.model.{path}{nesting}.{factor}.default.weight"
    return f"base_model.model.{path}.{factor}.default.{'.'.join(rest)}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_expert_lora_equals_peft(name, tmp_path):
    build, inputs = MODELS[name], _inputs()
    model = build()
    base, keys = _logits(model, inputs), list(model.state_dict())
    reference = copy.deepcopy(model)
    inject(model, LoRAConfig(rank=2, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS, train_head=False))
    theirs = peft.get_peft_model(
        reference, peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS)
    )
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad)

    generator = torch.Generator().manual_seed(3)
    state = theirs.state_dict()
    with torch.no_grad():
        for path, layer in peft_layers(model).items():
            for key, tensor in layer.adapters["default"].state_dict(keep_vars=True).items():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
                state[_their_key(path, layer, key)].copy_(tensor)
    ours = _logits(model, inputs)
    torch.testing.assert_close(ours, _logits(theirs, inputs), rtol=0, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-3)

    export_peft(model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(build(), str(tmp_path / "ours"))
    torch.testing.assert_close(_logits(loaded, inputs), ours, rtol=0, atol=1e-5)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    imported = import_peft(build(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(imported, inputs), ours, rtol=0, atol=1e-5)

    merged, reference_merged = merge(model).state_dict(), theirs.merge_and_unload().state_dict()
    assert list(merged) == keys and set(reference_merged) == set(keys)  # PEFT's merge may reorder the experts' keys
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, reference_merged[key], rtol=0, atol=1e-5, msg=key)
    torch.testing.assert_close(_logits(model, inputs), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen3moe-eager", "gpt_oss"])
def test_the_engine_contract_holds_for_expert_lora(name, tmp_path):
    config = LoRAConfig(rank=2, alpha=8, target_parameters=EXPERTS)
    contract.check_contract(config, lambda: (MODELS[name](), _inputs()), tmp_path)


def test_unload_gives_the_experts_back_bit_for_bit():
    model = _qwen3_moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, LoRAConfig(rank=2, target_parameters=EXPERTS))
    assert len(lora_B_parameters(model)) == 2 * 2  # LoRA+ finds the experts' B factors too
    unload(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_bad_parameter_targets_are_refused_by_name():
    with pytest.raises(ValueError, match=r"`target_parameters` entry 'experts.up_proj' matched no .* include: model"):
        inject(_qwen3_moe(), LoRAConfig(target_parameters=["experts.up_proj"]))
    with pytest.raises(ValueError, match="`dropout`=0.1 cannot be used with `target_parameters`"):
        LoRAConfig(dropout=0.1, target_parameters=EXPERTS)
    with pytest.raises(ValueError, match="`use_dora=True` cannot be used with `target_parameters`"):
        LoRAConfig(use_dora=True, target_parameters=EXPERTS)
    with pytest.raises(ValueError, match="`init`='pissa' cannot be used with `target_parameters`"):
        LoRAConfig(init="pissa", target_parameters=EXPERTS)
    with pytest.raises(ValueError, match="whose modules `target_modules` adapts as layers too"):
        inject(_qwen3_moe(), LoRAConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"]))
    with pytest.raises(ValueError, match="`lora_pro=True` cannot be combined with `target_parameters"):
        LoRACallback(lora_pro=True, target_parameters=EXPERTS)


def _switch() -> torch.nn.Module:
    torch.manual_seed(0)
    config = hf.SwitchTransformersConfig(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        num_experts=4,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        expert_capacity=8,
    )
    return hf.SwitchTransformersForConditionalGeneration(config)


@pytest.mark.parametrize("target_modules", [None, "all-linear"])
def test_routers_stay_out_of_default_selections(target_modules, caplog):
    with caplog.at_level(logging.INFO, logger="peft_callbacks.core.targets"):
        model = inject(_switch(), LoRAConfig(rank=2, target_modules=target_modules))
    routers = [p for p in dict(model.named_modules()) if p.endswith("router.classifier")]
    assert len(routers) == 2 and not any(p in peft_layers(model) for p in routers)
    assert any(p.endswith("mlp.experts.expert_0.wi") for p in peft_layers(model))  # the experts themselves are in
    assert "left out 2 mixture-of-experts router(s)" in caplog.text
    named = inject(_switch(), LoRAConfig(rank=2, target_modules=["router.classifier"]))  # naming one adapts it
    assert sorted(peft_layers(named)) == sorted(routers)
