"""freeze_layers / LayerFreezer / optimizer helpers: plain PyTorch, no Trainer."""

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from zoo import HF_MODELS, TIMM_MODELS, run

from peft_callbacks.core.targets import in_subtree
from peft_callbacks.freezing import (
    LayerFreezer,
    add_param_group,
    freeze_layers,
    remove_parameters,
    split_layers,
)
from peft_callbacks.methods.lora import inject_lora

TIMM = ["vit", "swin", "convnext", "resnet", "efficientnet", "mobilenetv3", "regnet"]
HF = ["bert", "distilbert", "gpt2_cls", "llama", "t5", "bart", "vit_hf"]
BUILDERS = {**{f"timm-{k}": TIMM_MODELS[k] for k in TIMM}, **{f"hf-{k}": HF_MODELS[k] for k in HF}}


def _bn_state(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_freeze_n_freezes_exactly_the_first_n_layers(name):
    model, inputs = BUILDERS[name]()
    layers = split_layers(model)
    n = len(layers) // 2
    freeze_layers(model, freeze=n)
    params = dict(model.named_parameters())
    for layer in layers:
        assert all(params[p].requires_grad == (layer.index >= n) for p in layer.parameters), layer.name

    before = _bn_state(model)
    model.train()
    run(model, inputs).float().square().mean().backward()
    for layer in layers:
        got_grad = [params[p].grad is not None for p in layer.parameters]
        assert not any(got_grad) if layer.index < n else any(got_grad), layer.name
    after = _bn_state(model)
    frozen_paths = [p for layer in layers[:n] for p in layer.paths]
    for key in before:  # frozen BatchNorm statistics do not move in train mode; trainable ones do
        moved = not torch.equal(before[key], after[key])
        assert moved != in_subtree(key.rsplit(".", 1)[0], frozen_paths), key


def test_backbone_and_patterns():
    model, _ = TIMM_MODELS["vit"]()
    freeze_layers(model, "backbone")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]

    model, _ = TIMM_MODELS["vit"]()
    freezer = freeze_layers(model, ["patch_embed", "blocks\\.[0-2]", "cls_token"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "cls_token" in frozen and "patch_embed.proj.weight" in frozen and "blocks.2.mlp.fc2.bias" in frozen
    assert not any(n.startswith(("blocks.3", "pos_embed", "head")) for n in frozen)
    freezer.restore()
    assert all(p.requires_grad for p in model.parameters())


def test_train_bn_keeps_batchnorm_trainable():
    model, inputs = TIMM_MODELS["resnet"]()
    freeze_layers(model, freeze=3, train_bn=True)
    block = model.layer1[0]
    assert block.bn1.weight.requires_grad and not block.conv1.weight.requires_grad
    before = model.layer1[0].bn1.running_mean.clone()
    model.train()(inputs["x"])
    assert not torch.equal(before, model.layer1[0].bn1.running_mean)


def test_restore_releases_batchnorm_statistics():
    model, inputs = TIMM_MODELS["resnet"]()
    freezer = freeze_layers(model, freeze=2)
    freezer.restore()
    before = model.bn1.running_mean.clone()
    model.train()(inputs["x"])
    assert not torch.equal(before, model.bn1.running_mean)
    assert all(p.requires_grad for p in model.parameters())


def test_unfreezing_gives_back_only_what_was_trainable():
    model, _ = HF_MODELS["bert"]()
    inject_lora(model, rank=2)  # base weights frozen, LoRA factors + classifier trainable
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    freezer = LayerFreezer(model)
    freezer.freeze(range(len(freezer.layers) - 1))
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.classifier.parameters()}
    released = freezer.unfreeze([1])
    assert released and all(id(p) in trainable for p in released)
    assert {id(p) for p in released} == {id(p) for p in model.bert.encoder.layer[0].parameters() if id(p) in trainable}
    freezer.restore()
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable


def test_bad_input():
    model, _ = TIMM_MODELS["resnet"]()
    with pytest.raises(ValueError, match=r"`freeze`=6 but ResNet has 6 layers .*describe_layers"):
        freeze_layers(model, freeze=6)
    with pytest.raises(ValueError, match=r"`freeze`=99 but ResNet has 6 layers"):
        freeze_layers(model, freeze=99)
    with pytest.raises(ValueError, match=r"`freeze` must be an int >= 1, got -1"):
        freeze_layers(model, freeze=-1)
    with pytest.raises(ValueError, match=r"`freeze` entry 'layer9' matched no module.*0: conv1, bn1"):
        freeze_layers(model, freeze=["layer9"])
    with pytest.raises(TypeError, match=r"`freeze` must be None, a string or a list"):
        freeze_layers(model, freeze=2.5)
    assert all(p.requires_grad for p in model.parameters())  # failed calls leave the model alone
    gpt2, _ = HF_MODELS["gpt2"]()
    with pytest.raises(ValueError, match=r"'backbone' needs a task head .*GPT2LMHeadModel"):
        freeze_layers(gpt2, "backbone")
    inject_lora(model, rank=2, train_head=False)
    with pytest.raises(ValueError, match="would leave nothing of ResNet to train"):
        freeze_layers(model, freeze=5)  # LoRA froze the head, the freezing everything else


def test_optimizer_groups_by_identity_and_schedulers():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    for p in [*a.parameters(), *b.parameters()]:
        nn.init.zeros_(p)  # equal values, different parameters
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    assert remove_parameters(opt, list(b.parameters())) == 2
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in a.parameters()]
    opt.step()
    scheduler.step()  # lr 0.5
    group = add_param_group(opt, list(b.parameters()), lr_scale=0.1, name="b", schedulers=[scheduler])
    assert group["lr"] == pytest.approx(0.05) and group["initial_lr"] == pytest.approx(0.1)
    assert add_param_group(opt, list(b.parameters()), schedulers=[scheduler]) is None  # already there
    opt.step()
    scheduler.step()  # the new group follows the schedule
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.25, 0.025])
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    c = nn.Linear(2, 2)
    add_param_group(opt, list(c.parameters()), schedulers=[plateau])
    assert len(plateau.min_lrs) == 3
    plateau.step(1.0)
    plateau.step(2.0)  # no IndexError on the new group


def test_layer_freezer_on_generic_model_with_batchnorm():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    freezer = LayerFreezer(model)
    freezer.freeze([0, 1])
    model.train()(torch.randn(8, 4))
    bn = model[1]
    assert isinstance(bn, _BatchNorm) and torch.equal(bn.running_mean, torch.zeros(4))
    freezer.unfreeze([1])
    model.train()(torch.randn(8, 4))
    assert not torch.equal(bn.running_mean, torch.zeros(4))
