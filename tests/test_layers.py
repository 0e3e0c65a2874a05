"""split_layers / describe_layers: each family's contract gives the ordered layers that freeze=N counts."""

import logging
import re

import pytest
import torch.nn as nn
from zoo import HF_MODELS, TIMM_MODELS

from peft_callbacks.core.heads import find_head
from peft_callbacks.core.targets import in_subtree
from peft_callbacks.freezing import describe_layers, split_layers

TIMM = ["vit", "swin", "convnext", "resnet", "efficientnet", "mobilenetv3", "mixer"]
HF = ["bert", "distilbert", "gpt2_cls", "llama", "t5", "bart", "vit_hf"]


def _check_partition(model, layers):
    names = [n for n, _ in model.named_parameters()]
    assigned = [n for layer in layers for n in layer.parameters]
    assert sorted(assigned) == sorted(names)  # every parameter exactly once
    assert [layer.index for layer in layers] == list(range(len(layers)))
    for layer in layers:  # the covering paths hold exactly the layer's parameters
        assert {n for n in names if in_subtree(n, layer.paths)} == set(layer.parameters)


def _check_head(model, layers):
    head = find_head(model).all_paths
    head_params = {n for n, _ in model.named_parameters() if in_subtree(n, head)}
    assert layers[-1].is_head == bool(head_params)
    if head_params:
        assert set(layers[-1].parameters) == head_params
    assert not any(layer.is_head for layer in layers[:-1])


@pytest.mark.parametrize("name", TIMM)
def test_timm_layers_follow_group_matcher(name):
    model, _ = TIMM_MODELS[name]()
    fine = split_layers(model)
    coarse = split_layers(model, coarse=True)
    for layers in (fine, coarse):
        _check_partition(model, layers)
        _check_head(model, layers)
    stem = model.group_matcher()["stem"]
    stem = stem if isinstance(stem, str) else stem[0][0]
    assert all(re.match(stem, n) for n in fine[0].parameters)  # layer 0 is timm's stem
    assert len(fine) >= 4


@pytest.mark.parametrize("name", HF)
def test_transformers_layers_follow_contract(name):
    model, _ = HF_MODELS[name]()
    layers = split_layers(model)
    _check_partition(model, layers)
    _check_head(model, layers)
    embedding_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    params = dict(model.named_parameters())
    assert {id(params[n]) for n in layers[0].parameters} >= embedding_ids
    blocks = [layer for layer in layers if len(layer.paths) == 1 and layer.paths[0].split(".")[-1].isdigit()]
    per_stack = 4 if name in ("t5", "bart") else 2  # two layers per stack in every zoo config
    assert len(blocks) == per_stack


def test_known_orders():
    model, _ = TIMM_MODELS["resnet"]()
    assert [layer.name for layer in split_layers(model)] == ["conv1, bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    model, _ = TIMM_MODELS["convnext"]()
    assert [layer.name for layer in split_layers(model, coarse=True)] == [
        "stem",
        "stages.0",
        "stages.1",
        "stages.2",
        "stages.3",
        "head.norm",
        "head.fc",
    ]
    model, _ = HF_MODELS["bert"]()
    assert [layer.name for layer in split_layers(model)] == [
        "bert.embeddings",
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
        "bert.pooler",
        "classifier",
    ]


def test_tied_lm_head_has_no_layer_of_its_own():
    model, _ = HF_MODELS["gpt2"]()  # lm_head shares the input embedding matrix
    layers = split_layers(model)
    assert not layers[-1].is_head
    assert layers[-1].name == "transformer.ln_f"


def test_generic_fallback_logs(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    with caplog.at_level(logging.INFO, logger="peft_callbacks.freezing.layers"):
        layers = split_layers(model)
    assert "top-level children" in caplog.text
    assert [layer.paths for layer in layers] == [("0",), ("1",), ("4",)]
    assert layers[-1].is_head


def test_describe_layers_lists_every_layer():
    model, _ = TIMM_MODELS["vit"]()
    text = describe_layers(model)
    assert text.splitlines()[0].startswith("VisionTransformer: 8 layers")
    assert "blocks.5, norm" in text and text.rstrip().endswith("[head]")


def test_bad_input():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        split_layers("resnet")
    with pytest.raises(ValueError, match="has no parameters"):
        split_layers(nn.ReLU())
    with pytest.raises(TypeError, match="`coarse` must be True or False"):
        split_layers(nn.Linear(2, 2), coarse="yes")
