"""LoHa, LoKr and OFT beyond PEFT parity: their own argument errors, layers PEFT does not cover, OFT's rotation, and
merging several adapters stacked on one layer (input-changing ones included) in the order the forward pass applies
them."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from peft_callbacks.engine import AdaptedLayer, adapt_layer, inject, merge
from peft_callbacks.io import import_peft
from peft_callbacks.methods.ia3 import IA3, IA3Config
from peft_callbacks.methods.loha import LoHaConfig
from peft_callbacks.methods.lokr import LoKrConfig
from peft_callbacks.methods.lora import LoRAConfig
from peft_callbacks.methods.oft import OFTConfig

CONFIGS = {
    "loha": LoHaConfig(rank=2),
    "loha-effective": LoHaConfig(rank=2, use_effective_conv2d=True),
    "lokr": LoKrConfig(rank=2),
    "lokr-effective": LoKrConfig(rank=1, use_effective_conv2d=True, decompose_both=True),
    "oft": OFTConfig(oft_block_size=4),
    "oft-share-exact": OFTConfig(rank=2, oft_block_size=0, block_share=True, use_cayley_neumann=False),
}


def _moved(layer: AdaptedLayer, seed: int = 0) -> AdaptedLayer:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    return layer


LAYERS = {
    "linear": (lambda: nn.Linear(8, 6), (3, 8)),
    "hf-conv1d": (lambda: Conv1D(6, 8), (3, 8)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 7)),
    "conv2d-1x1-strided": (lambda: nn.Conv2d(4, 6, 1, stride=2, padding=1), (2, 4, 6, 6)),
    "conv2d-circular": (lambda: nn.Conv2d(4, 6, (3, 2), padding=1, padding_mode="circular"), (2, 4, 6, 6)),
    "conv2d-dilated": (lambda: nn.Conv2d(4, 6, 3, dilation=2, stride=2), (2, 4, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1), (1, 2, 4, 4, 4)),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", LAYERS)
def test_every_layer_starts_as_the_base_merges_and_unmerges(config, kind):
    """Layers PEFT does not cover (Conv3d, Conv1D, padding modes, dilation, odd kernels) keep the contract too."""
    build, shape = LAYERS[kind]
    torch.manual_seed(0)
    base, x = build(), torch.randn(shape)
    original = base.weight.detach().clone()
    expected = base(x)
    layer = adapt_layer(base, CONFIGS[config])
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    adapted = _moved(layer)(x)
    assert not torch.allclose(adapted, expected, atol=1e-4)
    layer.merge()
    torch.testing.assert_close(base(x), adapted, rtol=0, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-5)


STACKS = {
    "lora+ia3_ff": (LoRAConfig(rank=2), "ia3_ff"),
    "ia3_ff+lora": ("ia3_ff", LoRAConfig(rank=2)),
    "lora+oft": (LoRAConfig(rank=2), OFTConfig(oft_block_size=4)),
    "oft+ia3_ff": (OFTConfig(oft_block_size=4), "ia3_ff"),
    "oft+oft": (OFTConfig(oft_block_size=4), OFTConfig(oft_block_size=2)),
    "loha+oft+lokr": (LoHaConfig(rank=2), OFTConfig(oft_block_size=4), LoKrConfig(rank=2)),
}


@pytest.mark.parametrize("stack", STACKS)
def test_stacked_adapters_merge_in_the_order_the_forward_applies_them(stack):
    """The base layer sees ``T₂(T₁(x))``, so merging folds T₂ before T₁ and both before additive updates."""
    torch.manual_seed(0)
    base, x = nn.Linear(8, 6), torch.randn(3, 8)
    original = base.weight.detach().clone()
    layer = AdaptedLayer(base)
    for index, config in enumerate(STACKS[stack]):
        if config == "ia3_ff":
            adapter = IA3(base, IA3Config(), feedforward=True)
        else:
            adapter = type(adapt_layer(nn.Linear(8, 6), config).adapters["default"])(base, config)
        layer.add_adapter(f"a{index}", adapter)
    adapted = _moved(layer)(x)
    layer.merge()
    torch.testing.assert_close(base(x), adapted, rtol=0, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-5)


def test_oft_rotating_a_conv_weight_refuses_to_share_its_layer():
    """``W₀Rᵀ`` is added as ``W₀Rᵀ − W₀``: beside another update that would not be the composition a merge folds."""
    base = nn.Conv2d(4, 6, 3)
    layer = adapt_layer(base, OFTConfig(oft_block_size=4))
    layer.add_adapter(
        "lora", type(adapt_layer(nn.Conv2d(4, 6, 3), LoRAConfig(rank=2)).adapters["default"])(base, LoRAConfig(rank=2))
    )
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(
        ValueError, match=r"OFT on a convolution with a 3×3 kernel rotates the layer's weight.*\['lora'\]"
    ):
        layer(x)
    with pytest.raises(ValueError, match="activate one at a time"):
        layer.merge()
    layer.set_active(["default"])
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)


def test_oft_rotation_is_orthogonal_and_its_options_act():
    base = nn.Linear(12, 5)
    exact = _moved(adapt_layer(base, OFTConfig(oft_block_size=4, use_cayley_neumann=False))).adapters["default"]
    blocks = exact.rotation()
    assert blocks.shape == (3, 4, 4)
    torch.testing.assert_close(blocks @ blocks.transpose(1, 2), torch.eye(4).expand(3, 4, 4), rtol=0, atol=1e-6)

    shared = _moved(adapt_layer(base, OFTConfig(oft_block_size=4, block_share=True))).adapters["default"]
    assert shared.oft_R.shape == (1, 6) and torch.equal(shared.rotation()[0], shared.rotation()[2])

    coft = _moved(adapt_layer(base, OFTConfig(oft_block_size=4, coft=True, eps=0.01))).adapters["default"]
    coft.rotation()  # projects oft_R in place, as PEFT does at every forward
    skew_norm = coft.oft_R.norm(dim=1) * 2**0.5  # ‖Q‖_F of a skew matrix = √2 ‖upper triangle‖
    assert bool((skew_norm <= 0.01 / 3**0.5 + 1e-6).all())

    dropped = _moved(adapt_layer(nn.Linear(16, 4), OFTConfig(oft_block_size=2, module_dropout=0.5)))
    adapter = dropped.adapters["default"]
    identity = torch.eye(2)
    kept = adapter.rotation(dropout=True)
    assert sum(torch.equal(b, identity) for b in kept) == 4  # int(0.5 · 8) blocks replaced by the identity
    assert not any(torch.equal(b, identity) for b in adapter.rotation())  # merging never drops


def test_rank_dropout_of_every_row_drops_the_update_instead_of_dividing_by_zero():
    torch.manual_seed(0)
    base = nn.Linear(4, 1)  # one output row: p = 0.9 drops it on most steps
    layer = _moved(adapt_layer(base, LoHaConfig(rank=2, rank_dropout=0.9))).train()
    x = torch.randn(3, 4)
    outputs = [layer(x) for _ in range(20)]
    assert all(torch.isfinite(o).all() for o in outputs)
    assert any(torch.equal(o, base(x)) for o in outputs) and not all(torch.equal(o, base(x)) for o in outputs)


def test_oft_moves_a_block_size_that_does_not_divide_and_says_so(caplog):
    net = nn.Sequential(nn.Linear(37, 48), nn.Linear(48, 64), nn.Linear(64, 2))
    with caplog.at_level(logging.WARNING, logger="peft_callbacks.methods.oft"):
        inject(net, OFTConfig(oft_block_size=32))
    sizes = [(net[i].adapters["default"].r, net[i].adapters["default"].oft_block_size) for i in (0, 1)]
    assert sizes == [(1, 37), (2, 24)]  # 37 is prime: one block of 37; 48 = 2 · 24 (24 is nearer 32 than 16)
    assert "oft_block_size=32 does not divide the rotated width of 2 layer(s)" in caplog.text


def test_bf16_layers_keep_their_dtype_and_merge_in_float32():
    for config in (LoHaConfig(rank=2), LoKrConfig(rank=2), OFTConfig(oft_block_size=4)):
        base = nn.Linear(8, 8).to(torch.bfloat16)
        layer = _moved(adapt_layer(base, config))
        assert all(p.dtype == torch.bfloat16 for p in layer.adapters.parameters())
        x = torch.randn(2, 8, dtype=torch.bfloat16)
        adapted = layer(x)
        assert adapted.dtype == torch.bfloat16
        merge(nn.Sequential(layer))
        torch.testing.assert_close(base(x).float(), adapted.float(), rtol=0, atol=0.1)


BAD = [
    (LoHaConfig, dict(rank=0), ValueError, r"`rank` must be an int >= 1, got 0"),
    (LoHaConfig, dict(alpha=-1), ValueError, r"`alpha` must be in \(0\.0, inf\], got -1\.0"),
    (LoHaConfig, dict(rank_dropout=1), ValueError, r"`rank_dropout` must be in \[0\.0, 1\.0\), got 1\.0"),
    (LoHaConfig, dict(module_dropout=-0.1), ValueError, r"`module_dropout` must be in \[0\.0, 1\.0\), got -0\.1"),
    (LoHaConfig, dict(use_effective_conv2d="yes"), TypeError, r"`use_effective_conv2d` must be True or False"),
    (LoKrConfig, dict(decompose_factor=-2), ValueError, r"`decompose_factor` must be -1 .* or an int >= 1, got -2"),
    (LoKrConfig, dict(decompose_factor=2.0), TypeError, r"`decompose_factor` must be an int, got float 2\.0"),
    (LoKrConfig, dict(decompose_both=1), TypeError, r"`decompose_both` must be True or False, got int 1"),
    (LoKrConfig, dict(rank_dropout_scale=None), TypeError, r"`rank_dropout_scale` must be True or False"),
    (OFTConfig, dict(rank=4), ValueError, r"Give `rank` or `oft_block_size`, not both .*rank=4, oft_block_size=32"),
    (OFTConfig, dict(oft_block_size=0), ValueError, r"Give `rank` or `oft_block_size`.*rank=0, oft_block_size=0"),
    (OFTConfig, dict(oft_block_size=-4), ValueError, r"`oft_block_size` must be an int >= 0, got -4"),
    (OFTConfig, dict(eps=0), ValueError, r"`eps` must be in \(0\.0, inf\], got 0\.0"),
    (OFTConfig, dict(num_cayley_neumann_terms=1), ValueError, r"`num_cayley_neumann_terms` must be an int >= 2"),
    (OFTConfig, dict(coft="no"), TypeError, r"`coft` must be True or False"),
    (OFTConfig, dict(module_dropout=1.0), ValueError, r"`module_dropout` must be in \[0\.0, 1\.0\), got 1\.0"),
]


@pytest.mark.parametrize("config_class, kwargs, error, match", BAD, ids=[f"{c.__name__}-{k}" for c, k, *_ in BAD])
def test_bad_arguments_name_the_argument_the_value_and_what_is_allowed(config_class, kwargs, error, match):
    with pytest.raises(error, match=match):
        config_class(**kwargs)


PEFT_FILES = {  # LoHa and LoKr: every option PEFT has is imported (rank_pattern: tests/test_peft_patterns.py)
    "OFT": {"r": 0, "oft_block_size": 2, "bias": "all"},
}


@pytest.mark.parametrize("peft_type", PEFT_FILES)
def test_peft_options_we_do_not_support_are_refused_by_name(tmp_path, peft_type):
    from safetensors.torch import save_file

    save_file({"base_model.model.0.x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, **PEFT_FILES[peft_type]}))
    option = sorted(set(PEFT_FILES[peft_type]) - {"r", "alpha", "oft_block_size"})[0]
    with pytest.raises(ValueError, match=f"options that peft_callbacks does not support: .*{option}"):
        import_peft(nn.Sequential(nn.Linear(4, 4)), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", "r": 8}))
    with pytest.raises(ValueError, match=r"saved by PEFT < 0\.14"):
        import_peft(nn.Sequential(nn.Linear(4, 4)), tmp_path)
