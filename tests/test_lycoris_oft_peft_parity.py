"""LoHa, LoKr and OFT equal HF PEFT's (the reference implementation) on the same tensors, fp32, atol 1e-5.

For each method on a timm ViT, a timm ResNet, BERT, GPT-2 and Llama: the adapter tensors are moved away from their
initial values and copied into PEFT's model (with PEFT's own loader), then outputs, merged weights and trainable
counts are compared, and adapter directories move both ways (PEFT's ``save_pretrained`` -> ``import_peft``, our
``export_peft`` -> ``PeftModel.from_pretrained``).

Two reference points are not PEFT's model as it stands, and say why:

* PEFT's LoHa, LoKr and OFT do not adapt transformers ``Conv1D``: GPT-2 is compared with a twin whose ``Conv1D``
  layers are ``nn.Linear`` layers holding the transposed weights (our ``Conv1D`` adapters hold the tensors of such a
  Linear), and exporting GPT-2 is refused with a message instead of writing a directory PEFT cannot load.
* PEFT's OFT on a convolution with a kernel larger than 1 rotates overlapping input patches and folds them back,
  which neither starts at the base model nor equals its own merged layer; ours equals the merged layer, so on models
  with such convolutions (ViT's patch embedding, the ResNet) our outputs are compared with PEFT's merged model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from zoo import HF_MODELS, TIMM_MODELS, run

from peft_callbacks.core.kinds import is_hf_conv1d
from peft_callbacks.core.params import freeze_batchnorm_stats
from peft_callbacks.engine import get_method, inject, merge, peft_layers, replace_module
from peft_callbacks.io import export_peft, import_peft
from peft_callbacks.methods.loha import LoHaConfig
from peft_callbacks.methods.lokr import LoKrConfig
from peft_callbacks.methods.oft import OFTConfig

peft = pytest.importorskip("peft")

MODELS = {
    "timm-vit": TIMM_MODELS["vit"],
    "timm-resnet": TIMM_MODELS["resnet"],
    "hf-bert": HF_MODELS["bert"],
    "hf-gpt2": HF_MODELS["gpt2"],
    "hf-llama": HF_MODELS["llama"],
}
VIT_LINEAR = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc\d)"
# (our config, PEFT's config class and fields); PEFT's fields get the exact target paths we chose
METHODS = {
    "loha": (LoHaConfig(rank=4, alpha=6, train_head=False), peft.LoHaConfig, dict(r=4, alpha=6)),
    "lokr": (LoKrConfig(rank=4, alpha=6, train_head=False), peft.LoKrConfig, dict(r=4, alpha=6)),
    "oft": (OFTConfig(oft_block_size=8, train_head=False), peft.OFTConfig, dict(r=0, oft_block_size=8)),
}
VARIANTS = {  # options that change the tensors or the maths, each on a model where they act
    "loha-effective-conv": ("loha", "timm-resnet", dict(use_effective_conv2d=True), {}),
    "lokr-effective-conv": ("lokr", "timm-resnet", dict(use_effective_conv2d=True, rank=2), dict(r=2)),
    "lokr-full-w2": ("lokr", "hf-llama", dict(rank=16), dict(r=16)),
    "lokr-decompose-both": ("lokr", "hf-bert", dict(decompose_both=True, decompose_factor=4, rank=1), dict(r=1)),
    "oft-rank": ("oft", "hf-llama", dict(rank=4, oft_block_size=0), dict(r=4, oft_block_size=0)),
    "oft-block-share": ("oft", "hf-bert", dict(block_share=True), {}),
    "oft-coft": ("oft", "hf-gpt2", dict(coft=True, eps=1.0), {}),
    "oft-exact-cayley": ("oft", "hf-llama", dict(use_cayley_neumann=False), {}),
    "oft-neumann-3": ("oft", "timm-vit", dict(num_cayley_neumann_terms=3, target_modules=VIT_LINEAR), {}),
}
PEFT_FIELDS = {"use_effective_conv2d", "decompose_both", "decompose_factor", "block_share", "coft", "eps"}
PEFT_FIELDS |= {"rank_dropout", "module_dropout"}
PEFT_FIELDS |= {"use_cayley_neumann", "num_cayley_neumann_terms"}


def linearised(model: nn.Module) -> nn.Module:
    """``model`` with every transformers ``Conv1D`` replaced by the ``nn.Linear`` it stands for (weight transposed)."""
    for path, module in list(model.named_modules()):
        if is_hf_conv1d(module):
            linear = nn.Linear(*module.weight.shape)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            replace_module(model, path, linear)
    return model


def build(model_name: str) -> tuple[nn.Module, nn.Module, dict]:
    """``(model, PEFT's base for it, inputs)``: the same network twice (GPT-2's twin has Linear layers)."""
    model, inputs = MODELS[model_name]()
    return model.eval(), linearised(copy.deepcopy(model)).eval(), inputs


def peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our adapter tensors under the keys of PEFT's ``adapter_model.safetensors``."""
    layers = peft_layers(model)
    keys = get_method(next(iter(next(iter(layers.values())).adapters.values())).method).peft.keys
    return {
        f"base_model.model.{path}.{keys.get(key, key)}": tensor
        for path, layer in layers.items()
        for key, tensor in layer.adapters["default"].state_dict().items()
    }


def make_pair(method: str, model_name: str, ours: dict | None = None, theirs: dict | None = None):
    """Our adapted model and PEFT's, holding the same adapter tensors (moved away from their initial values)."""
    config, peft_class, fields = METHODS[method]
    model, twin, inputs = build(model_name)
    inject(model, config.replace(**(ours or {})))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    options = {k: v for k, v in (ours or {}).items() if k in PEFT_FIELDS}
    peft_config = peft_class(target_modules=list(peft_layers(model)), **{**fields, **options, **(theirs or {})})
    reference = peft.get_peft_model(twin, peft_config).eval()
    tensors = peft_tensors(model)
    peft.set_peft_model_state_dict(reference, tensors)
    loaded = peft.get_peft_model_state_dict(reference)
    assert loaded.keys() == {k.removeprefix("base_model.model.") for k in tensors} or loaded.keys() == tensors.keys()
    return model, reference, inputs


def rotates_weights(model: nn.Module) -> bool:
    """Does OFT rotate a convolution's weight here (kernel > 1), where PEFT's unmerged forward is not a reference?"""
    adapters = [a for layer in peft_layers(model).values() for a in layer.adapters.values()]
    return any(not getattr(a, "rotates_input", True) for a in adapters)


def reference_outputs(reference: nn.Module, inputs: dict, merged: bool) -> torch.Tensor:
    with torch.no_grad():
        return run(copy.deepcopy(reference).merge_and_unload() if merged else reference, inputs)


def outputs(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return run(model, inputs)


CASES = [pytest.param(m, n, id=f"{m}-{n}") for m in METHODS for n in MODELS]
ALL_CASES = [
    *[pytest.param(m, n, {}, {}, id=f"{m}-{n}") for m in METHODS for n in MODELS],
    *[pytest.param(*v, id=k) for k, v in VARIANTS.items()],
]


@pytest.mark.parametrize("method, model_name, ours, theirs", ALL_CASES)
def test_same_tensors_same_outputs_as_peft(method, model_name, ours, theirs):
    model, reference, inputs = make_pair(method, model_name, ours, theirs)
    expected = reference_outputs(reference, inputs, merged=rotates_weights(model))
    got = outputs(model, inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with torch.no_grad(), reference.disable_adapter():
        assert not torch.allclose(got, run(reference, inputs), atol=1e-4)  # the adapters really act


@pytest.mark.parametrize("method, model_name, ours, theirs", ALL_CASES)
def test_merged_weights_equal_peft_merge_and_unload(method, model_name, ours, theirs):
    model, reference, inputs = make_pair(method, model_name, ours, theirs)
    conv1d = {f"{path}.weight" for path, layer in peft_layers(model).items() if is_hf_conv1d(layer.base_layer)}
    ours_merged = merge(model).state_dict()
    theirs_merged = reference.merge_and_unload().state_dict()
    assert ours_merged.keys() == theirs_merged.keys()
    for key, tensor in ours_merged.items():
        expected = theirs_merged[key].T if key in conv1d else theirs_merged[key]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("method, model_name, ours, theirs", ALL_CASES)
def test_trainable_parameter_counts_equal_peft(method, model_name, ours, theirs):
    model, reference, _ = make_pair(method, model_name, ours, theirs)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == reference.get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize("method, model_name", CASES)
def test_a_directory_peft_saves_imports_with_the_same_outputs(tmp_path, method, model_name):
    model, reference, inputs = make_pair(method, model_name)
    reference.save_pretrained(str(tmp_path))
    fresh, _, _ = build(model_name)
    imported = import_peft(fresh, tmp_path)
    expected = reference_outputs(reference, inputs, merged=rotates_weights(imported))
    torch.testing.assert_close(outputs(imported, inputs), expected, rtol=0, atol=1e-5)
    assert type(next(iter(peft_layers(imported).values())).adapters["default"]) is type(
        next(iter(peft_layers(model).values())).adapters["default"]
    )


@pytest.mark.parametrize("method, model_name", [c for c in CASES if "gpt2" not in c.id])
def test_our_export_loads_in_peft_with_the_same_outputs(tmp_path, method, model_name):
    model, _, inputs = make_pair(method, model_name)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == get_method(method).peft.peft_type
    theirs = peft.PeftModel.from_pretrained(build(model_name)[1], str(tmp_path)).eval()
    expected = reference_outputs(theirs, inputs, merged=rotates_weights(model))
    torch.testing.assert_close(outputs(model, inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_export_refuses_layers_peft_cannot_adapt(tmp_path, method):
    """PEFT's LoHa/LoKr/OFT refuse transformers ``Conv1D``: the export says so instead of writing a dead directory."""
    model, _, _ = make_pair(method, "hf-gpt2")
    with pytest.raises(ValueError, match=r"adapts nn\.Linear and .*transformer\.h\.0\.attn\.c_attn \(Conv1D\)"):
        export_peft(model, tmp_path / "gpt2")
    assert not (tmp_path / "gpt2").exists()
    conv3d = inject(nn.Sequential(nn.Conv3d(2, 4, 3), nn.Flatten()), METHODS[method][0].replace(target_modules=["0"]))
    with pytest.raises(ValueError, match=r"0 \(Conv3d\)"):
        export_peft(conv3d, tmp_path / "conv3d")


@pytest.mark.parametrize("method", ["loha", "lokr"])
@pytest.mark.parametrize("model_name", ["hf-bert", "timm-resnet"])
def test_dropouts_drop_what_peft_drops_in_training(method, model_name):
    """Same seed, same random draws: rank and module dropout act as PEFT's, in training mode only."""
    model, reference, inputs = make_pair(method, model_name, dict(rank_dropout=0.5, module_dropout=0.3))
    model.train(), reference.train()
    freeze_batchnorm_stats(reference)  # as ours: a frozen BatchNorm normalises with its running statistics
    results = []
    for seed in range(4):
        torch.manual_seed(seed)
        ours = outputs(model, inputs)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours, outputs(reference, inputs), rtol=0, atol=1e-5)
        results.append(ours)
    assert not torch.allclose(results[0], results[1], atol=1e-4)  # the draws matter
    model.eval(), reference.eval()
    torch.testing.assert_close(outputs(model, inputs), outputs(reference, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["loha", "lokr"])
@pytest.mark.parametrize("effective", [False, True])
def test_conv1d_layers_equal_peft(method, effective):
    """PEFT's LyCORIS methods keep a Conv1d kernel as ``(k, 1)``; the same tensors give the same outputs here."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv1d(6, 8, 1), nn.Flatten(), nn.Linear(40, 2))
    config, peft_class, fields = METHODS[method]
    reference = copy.deepcopy(net)
    inject(net, config.replace(use_effective_conv2d=effective, target_modules=["0", "2"], rank=2))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    fields = {**fields, "r": 2}
    reference = peft.get_peft_model(
        reference, peft_class(target_modules=["0", "2"], use_effective_conv2d=effective, **fields)
    )
    peft.set_peft_model_state_dict(reference, peft_tensors(net))
    x = torch.randn(3, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(merge(net)(x), reference.merge_and_unload()(x), rtol=0, atol=1e-5)
