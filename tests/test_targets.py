"""Target resolution, head detection and every validation error of the LoRA surgery."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn as nn
from zoo import HF_MODELS, TIMM_MODELS

from peft_callbacks import LoRACallback, find_models, inject_lora, lora_layers
from peft_callbacks.core.heads import find_head
from peft_callbacks.core.targets import resolve_targets


def vit():
    return TIMM_MODELS["vit"]()[0]


# -- head detection -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "head", "output"),
    [
        ("timm-vit", ["head"], []),
        ("timm-convnext", ["head.fc"], []),
        ("timm-levit", ["head", "head_dist"], []),
        ("hf-bert", ["classifier"], []),
        ("hf-distilbert", ["pre_classifier", "classifier"], []),
        ("hf-gpt2", [], ["lm_head"]),
        ("hf-gpt2_cls", ["score"], []),
        ("hf-t5", [], ["lm_head"]),
        ("hf-bart", ["classification_head"], []),
    ],
)
def test_find_head_uses_each_family_contract(name, head, output):
    family, key = name.split("-", 1)
    model = (TIMM_MODELS if family == "timm" else HF_MODELS)[key]()[0]
    info = find_head(model)
    assert (info.head, info.output_embeddings) == (head, output)


def test_generic_model_head_is_last_layer_with_log(caplog):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with caplog.at_level(logging.INFO):
        assert find_head(model).head == ["2"]
    assert "output layer" in caplog.text


def test_headless_timm_model_has_no_head():
    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    assert find_head(model).head == []


# -- pattern semantics ----------------------------------------------------------------------------------------------
def test_default_targets_skip_head_and_include_convs():
    targets = resolve_targets(vit(), protected=["head"], always_protected=["head"]).targets
    assert "patch_embed.proj" in targets and "blocks.0.attn.qkv" in targets and "head" not in targets


def test_default_adapts_cnn_whose_only_linear_is_the_head():
    model = TIMM_MODELS["resnet"]()[0]
    inject_lora(model, rank=2)
    assert "conv1.0" in lora_layers(model) and "fc" not in lora_layers(model)


def test_all_linear_on_cnn_explains_there_is_nothing_to_adapt():
    with pytest.raises(ValueError, match=r"No layer of ResNet was selected.*conv1"):
        inject_lora(TIMM_MODELS["resnet"]()[0], target_modules="all-linear")


def test_all_linear_excludes_convs():
    model = inject_lora(vit(), target_modules="all-linear")
    assert "patch_embed.proj" not in lora_layers(model) and "blocks.0.mlp.fc1" in lora_layers(model)


def test_name_suffix_regex_and_container_patterns():
    model = vit()
    assert resolve_targets(model, "qkv").targets == [f"blocks.{i}.attn.qkv" for i in range(6)]
    assert resolve_targets(model, ["0.attn.proj", "1.attn.proj"]).targets == [
        "blocks.0.attn.proj",
        "blocks.1.attn.proj",
    ]
    assert resolve_targets(model, r"blocks\.1\..*fc\d").targets == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert resolve_targets(model, "blocks.1").targets == [
        "blocks.1.attn.qkv",
        "blocks.1.attn.proj",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    ]


def test_exclude_modules_removes_whole_subtrees():
    excluded = ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "patch_embed"]
    targets = resolve_targets(vit(), None, exclude_modules=excluded, always_protected=["head"])
    assert targets.targets == ["blocks.5.attn.qkv", "blocks.5.attn.proj", "blocks.5.mlp.fc1", "blocks.5.mlp.fc2"]


def test_grouped_convs_skipped_by_default_with_log(caplog):
    model = TIMM_MODELS["mobilenetv3"]()[0]
    with caplog.at_level(logging.INFO):
        inject_lora(model, rank=2)
    assert "grouped/depthwise" in caplog.text
    assert not any(
        m.groups > 1 for m in (layer.base_layer for layer in lora_layers(model).values()) if hasattr(m, "groups")
    )


# -- errors ---------------------------------------------------------------------------------------------------------
def test_typo_lists_candidate_layers():
    with pytest.raises(ValueError, match=r"'attn\.qkvv' matched no module in VisionTransformer.*blocks\.0\.attn\.qkv"):
        inject_lora(vit(), target_modules=["attn.qkvv"])


def test_unsupported_layer_type_is_named():
    with pytest.raises(ValueError, match=r"'norm1' matched blocks\.0\.norm1 \(LayerNorm\).*cannot adapt"):
        inject_lora(vit(), target_modules=["norm1"])


def test_explicit_grouped_conv_is_an_error():
    with pytest.raises(ValueError, match=r"grouped/depthwise"):
        inject_lora(TIMM_MODELS["mobilenetv3"]()[0], target_modules=["blocks.1.0.conv_dw"])


def test_custom_forward_conv_is_skipped_and_explained():
    model = timm.create_model("test_nfnet", pretrained=False, num_classes=3)
    with pytest.raises(ValueError, match=r"own forward"):
        inject_lora(model, target_modules=["stem.conv1"])
    inject_lora(model)  # the standardised convs are skipped; the plain 1x1 convs of its attention gates are adapted
    assert all(type(layer.base_layer) is nn.Conv2d for layer in lora_layers(model).values())
    assert "stem.conv1" not in lora_layers(model)


def test_targeting_the_trainable_head_is_a_conflict():
    with pytest.raises(ValueError, match=r"only the task head.*train_head=False"):
        inject_lora(vit(), target_modules=["head"])
    model = inject_lora(vit(), target_modules=["head"], train_head=False)
    assert list(lora_layers(model)) == ["head"]


def test_exclude_typo_is_an_error():
    with pytest.raises(ValueError, match=r"`exclude_modules` entry 'blockz' matched no module"):
        inject_lora(vit(), exclude_modules="blockz")


def test_invalid_regex_is_named():
    with pytest.raises(ValueError, match=r"`target_modules` entry 'blocks\.\(' is not a valid regular expression"):
        inject_lora(vit(), target_modules="blocks.(")


def test_injecting_twice_is_refused():
    model = inject_lora(vit(), rank=2)
    with pytest.raises(
        ValueError,
        match=r"already has LoRA.*merge_lora\(model\) or unload_lora\(model\) first, or "
        r"give the new one another `adapter_name`",
    ):
        inject_lora(model, rank=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, r"`rank` must be an int >= 1, got 0"),
        ({"rank": -3}, ValueError, r"`rank` must be an int >= 1, got -3"),
        ({"rank": 2.5}, TypeError, r"`rank` must be an int, got float 2.5"),
        ({"rank": True}, TypeError, r"`rank` must be an int, got bool"),
        ({"alpha": 0}, ValueError, r"`alpha` must be in \(0.0, inf\], got 0.0"),
        ({"alpha": float("nan")}, ValueError, r"`alpha` must be a finite number"),
        ({"alpha": "16"}, TypeError, r"`alpha` must be a number, got str"),
        ({"dropout": 1.0}, ValueError, r"`dropout` must be in \[0.0, 1.0\), got 1.0"),
        ({"dropout": -0.1}, ValueError, r"`dropout` must be in \[0.0, 1.0\)"),
        ({"target_modules": 3}, TypeError, r"`target_modules` must be None, a string or a list of strings, got int"),
        ({"target_modules": []}, ValueError, r"`target_modules` must not be an empty list"),
        ({"target_modules": ["qkv", 1]}, TypeError, r"`target_modules` entries must be non-empty strings"),
        ({"exclude_modules": {"a": 1}}, TypeError, r"`exclude_modules` must be None, a string or a list"),
        ({"train_head": "yes"}, TypeError, r"`train_head` must be True or False, got str"),
        ({"use_rslora": 1}, TypeError, r"`use_rslora` must be True or False, got int"),
    ],
)
def test_bad_arguments_name_argument_value_and_allowed(kwargs, error, match):
    with pytest.raises(error, match=match):
        inject_lora(vit(), **kwargs)
    with pytest.raises(error, match=match):
        LoRACallback(**kwargs)


def test_inject_rejects_non_module():
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got dict"):
        inject_lora({"w": torch.zeros(1)})


def test_callback_rejects_bad_flags():
    with pytest.raises(TypeError, match=r"`merge_on_train_end` must be True or False"):
        LoRACallback(merge_on_train_end=None)
    with pytest.raises(TypeError, match=r"`train_bn` must be True or False"):
        LoRACallback(train_bn="no")
    with pytest.raises(ValueError, match=r"`module` must be a non-empty string or None"):
        LoRACallback(module="")


# -- model discovery ------------------------------------------------------------------------------------------------
class Task(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model("test_vit", pretrained=False, num_classes=0)
        self.text = HF_MODELS["bert"]()[0]
        self.head = nn.Linear(64, 2)


def test_find_models_returns_outermost_timm_and_hf_models():
    assert [(p, type(m).__name__) for p, m in find_models(Task())] == [
        ("backbone", "VisionTransformer"),
        ("text", "BertForSequenceClassification"),
    ]
    assert [p for p, _ in find_models(Task(), module="text")] == ["text"]


def test_find_models_unknown_module_lists_children():
    with pytest.raises(ValueError, match=r"`module`='txt' is not a submodule of Task.*backbone, text, head"):
        find_models(Task(), module="txt")


def test_multihead_attention_out_proj_is_never_a_silent_no_op():
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Linear(8, 2))
    inject_lora(model, rank=2)
    assert "1.self_attn.out_proj" not in lora_layers(model)  # MHA reads out_proj.weight without calling it
    assert "1.linear1" in lora_layers(model)
    fresh = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(ValueError, match=r"own forward"):
        inject_lora(fresh, target_modules=["out_proj"])


def test_lora_layer_classes_refuse_the_wrong_base_layer():
    from peft_callbacks import LoRAConfig, LoRAConv, LoRALinear

    with pytest.raises(TypeError, match=r"`base_layer` of LoRALinear must be a linear layer.*got Conv2d"):
        LoRALinear(nn.Conv2d(2, 2, 1), LoRAConfig(rank=2, alpha=4))
    with pytest.raises(TypeError, match=r"`base_layer` of LoRAConv must be a conv layer.*got Linear"):
        LoRAConv(nn.Linear(2, 2), LoRAConfig(rank=2, alpha=4))
    with pytest.raises(TypeError, match=r"`config` of LoRALinear must be a method config, got int"):
        LoRALinear(nn.Linear(2, 2), 2)
