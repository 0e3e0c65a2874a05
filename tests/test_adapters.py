"""Bottleneck adapters: identity at injection, closed-form counts, gradients, learning, errors, files, callback."""

from __future__ import annotations

import copy
import pickle

import lightning as L
import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import HF_MODELS, TIMM_MODELS, run

from peft_callbacks.callbacks.method_callbacks import AdapterCallback
from peft_callbacks.core.heads import find_head
from peft_callbacks.core.params import count_parameters
from peft_callbacks.core.recipe import surgery_records
from peft_callbacks.engine import replay as replay_surgery
from peft_callbacks.methods.bottleneck import (
    BottleneckAdapter,
    adapter_layers,
    find_insertion_points,
    inject_adapters,
    is_norm_layer,
    remove_adapters,
)

TIMM = ["vit", "deit", "swin", "levit", "eva", "beit"]
EXTRA = {  # ViT-family blocks the zoo does not hold
    "eva": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2), 28),
    "beit": ("beit_base_patch16_224", dict(img_size=32, depth=2, embed_dim=32, num_heads=2), 32),
}
HF = [
    "bert",
    "distilbert",
    "roberta",
    "electra",
    "gpt2",
    "gpt2_cls",
    "llama",
    "qwen2",
    "mistral",
    "t5",
    "bart",
    "vit_hf",
]
BLOCKS = {"vit": 6, "deit": 2, "swin": 2, "levit": 3, "t5": 4, "bart": 4}  # transformer blocks per model


def build(name: str):
    if name in EXTRA:
        arch, kwargs, size = EXTRA[name]
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False, num_classes=3, **kwargs)
        return model.eval(), {"x": torch.randn(2, 3, size, size)}
    model, inputs = (TIMM_MODELS if name in TIMM_MODELS else HF_MODELS)[name]()
    return model.eval(), inputs  # eval: Swin's drop-path would make two calls differ


def head_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for path in find_head(model).head for p in model.get_submodule(path).parameters()]


def adapter_count(adapter: BottleneckAdapter) -> int:
    d, m = adapter.dim, adapter.bottleneck
    return 2 * d * m + d + m


@pytest.mark.parametrize("name", TIMM + HF)
def test_identity_count_and_gradients(name):
    model, inputs = build(name)
    reference = run(model, inputs)
    inject_adapters(model, bottleneck=3)
    adapters = adapter_layers(model)
    assert len(adapters) == 2 * BLOCKS.get(name, 2)
    torch.testing.assert_close(run(model, inputs), reference, rtol=0, atol=1e-5)

    expected = sum(adapter_count(a) for a in adapters.values()) + sum(p.numel() for p in head_params(model))
    assert count_parameters(model).trainable == expected
    run(model, inputs).float().pow(2).mean().backward()
    intended = {id(p) for a in adapters.values() for p in a.parameters()} | {id(p) for p in head_params(model)}
    got = {id(p) for p in model.parameters() if p.grad is not None}
    assert got == intended
    ups = [a.up.weight for a in adapters.values()]
    assert all(w.grad.abs().sum() > 0 for w in ups)  # the zero-initialised up-projection learns first


@pytest.mark.parametrize("name", ["deit", "gpt2", "bert"])
def test_pfeiffer_is_after_the_mlp_only(name):
    model, _ = build(name)
    houlsby = find_insertion_points(model, "houlsby")
    pfeiffer = find_insertion_points(model, "pfeiffer")
    assert pfeiffer == houlsby[1::2] and len(houlsby) == 2 * len(pfeiffer)
    inject_adapters(model, 4, placement="pfeiffer")
    assert [p.rpartition(".adapter")[0] for p in adapter_layers(model)] == pfeiffer


def test_hf_attention_tuples_and_post_layernorm_placement():
    model, inputs = build("llama")
    inject_adapters(model, 4)
    attn = model.model.layers[0].self_attn
    nn.init.normal_(attn.adapter.up.weight)
    seen = {}
    attn.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    run(model, inputs)
    assert isinstance(seen["out"], tuple) and seen["out"][0].shape[-1] == 32  # hidden states adapted, rest kept
    bert, _ = build("bert")
    assert find_insertion_points(bert)[:2] == [
        "bert.encoder.layer.0.attention.output.dense",  # before the residual sum and LayerNorm (Houlsby Fig. 2)
        "bert.encoder.layer.0.output.dense",
    ]


@pytest.mark.parametrize("name", ["vit", "deit", "swin", "bert", "gpt2_cls", "qwen2", "bart"])
def test_adapters_learn(name):
    model, inputs = build(name)
    inject_adapters(model, bottleneck=8)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    target = torch.tensor([0, 2])
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(run(model, inputs), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_train_norms_and_frozen_head():
    model, inputs = build("deit")
    inject_adapters(model, 4, train_norms=True, train_head=False)
    norms = [m for m in model.modules() if is_norm_layer(m)]
    assert norms and all(p.requires_grad for m in norms for p in m.parameters())
    assert not any(p.requires_grad for p in head_params(model))
    llama, _ = build("llama")
    inject_adapters(llama, 4, train_norms=True)
    rms = [m for m in llama.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(rms) == 5 and all(m.weight.requires_grad for m in rms)


def test_named_modules_for_other_models():
    mixer, inputs = build("mixer")
    with pytest.raises(
        ValueError, match="Found no transformer block in MlpMixer.*Supported blocks: timm ViT.*modules="
    ):
        inject_adapters(mixer, 4)
    reference = run(mixer, inputs)
    inject_adapters(mixer, 4, modules=r"blocks\.\d+\.mlp_channels")
    assert list(adapter_layers(mixer)) == ["blocks.0.mlp_channels.adapter", "blocks.1.mlp_channels.adapter"]
    torch.testing.assert_close(run(mixer, inputs), reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="`modules` entry 'mlp_chanels' matched no module in MlpMixer"):
        inject_adapters(build("mixer")[0], 4, modules=["mlp_chanels"])
    with pytest.raises(ValueError, match="holds no Linear layer"):
        inject_adapters(build("mixer")[0], 4, modules=["blocks.0.norm1"])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(bottleneck=0), ValueError, "`bottleneck` must be an int >= 1, got 0"),
        (dict(bottleneck=-4), ValueError, "`bottleneck` must be an int >= 1, got -4"),
        (dict(bottleneck=2.5), TypeError, "`bottleneck` must be an int, got float"),
        (dict(placement="after"), ValueError, "`placement` must be one of 'houlsby', 'pfeiffer'; got 'after'"),
        (dict(activation="swish"), ValueError, "`activation` must be one of 'gelu', 'relu', 'silu', 'tanh'"),
        (dict(train_norms="yes"), TypeError, "`train_norms` must be True or False"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        inject_adapters(build("deit")[0], **kwargs)
    with pytest.raises(error, match=match):
        AdapterCallback(**kwargs)


def test_adapters_follow_lora():
    from peft_callbacks.methods.lora import inject_lora, lora_layers

    model, inputs = build("bert")
    reference = run(model, inputs)
    inject_lora(model, rank=2)
    inject_adapters(model, 4)
    assert len(adapter_layers(model)) == 4 and not any(".adapter" in p for p in lora_layers(model))
    torch.testing.assert_close(run(model, inputs), reference, rtol=0, atol=1e-6)
    assert [r["method"] for r in surgery_records(model)] == ["lora", "adapters"]


def test_unsupported_model_and_double_injection():
    with pytest.raises(ValueError, match="Found no transformer block in ResNet"):
        inject_adapters(build("resnet")[0])
    model, _ = build("deit")
    inject_adapters(model, 4)
    with pytest.raises(ValueError, match="already has 4 bottleneck adapter"):
        inject_adapters(model, 4)


def test_remove_copy_pickle_and_replay():
    model, inputs = build("gpt2")
    base_keys = set(model.state_dict())
    reference = run(model, inputs)
    inject_adapters(model, 4)
    assert base_keys < set(model.state_dict())  # base keys unchanged, adapter keys added
    torch.manual_seed(3)
    for adapter in adapter_layers(model).values():
        nn.init.normal_(adapter.up.weight, std=0.5)
    adapted = run(model, inputs)
    assert not torch.allclose(adapted, reference)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(run(clone, inputs), adapted)

    fresh, _ = build("gpt2")
    replay_surgery(fresh, surgery_records(model))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(run(fresh, inputs), adapted)

    remove_adapters(model)
    assert set(model.state_dict()) == base_keys and not surgery_records(model)
    torch.testing.assert_close(run(model, inputs), reference, rtol=0, atol=0)


class _Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = build("deit")[0].train()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_callback_fit_then_test_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
    module = _Classifier()
    frozen = {name: p.detach().clone() for name, p in module.named_parameters() if "head" not in name}
    callback = AdapterCallback(bottleneck=4, placement="houlsby")
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[callback],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    for name, p in module.named_parameters():  # base weights untouched, adapters moved
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert any(a.up.weight.abs().sum() > 0 for a in adapter_layers(module).values())
    assert callback.parameter_count.trainable == 4 * (2 * 32 * 4 + 32 + 4) + 32 * 3 + 3

    trained = trainer.test(module, data, verbose=False)[0]["test_loss"]
    fresh_callback = pickle.loads(pickle.dumps(AdapterCallback(bottleneck=4)))
    tester = L.Trainer(callbacks=[fresh_callback], default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    ckpt = trainer.checkpoint_callback.best_model_path
    restored = tester.test(_Classifier(), data, ckpt_path=ckpt, verbose=False)[0]["test_loss"]
    assert restored == pytest.approx(trained, rel=1e-5)


def test_callback_from_yaml_and_state():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(AdapterCallback, "adapters")
    config = parser.parse_string("adapters:\n  bottleneck: 16\n  placement: pfeiffer\n  modules: [mlp]\n")
    callback = parser.instantiate(config).adapters
    assert (callback.bottleneck, callback.placement, callback.modules) == (16, "pfeiffer", ["mlp"])
    assert callback.state_dict()["config"]["placement"] == "pfeiffer"
