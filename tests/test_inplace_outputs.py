"""Models that change an adapted layer's output in place train, with the gradients of the plain path.

Real models do this after a Linear: transformers longformer (``query /= sqrt(d)``), roc_bert (``embedding += …``),
gemma4's audio conformer (``+= residual``), timm naflexvit (``x.add_(pos_embed)``) and swinv2
(``nn.ReLU(inplace=True)`` in its position-bias MLP). LoRA's fused autograd node must return a tensor autograd lets
them change (not a view made inside the node), with gradients equal to the plain path's (the fused node switched
off, as the ``plain`` variant of ``benchmarks/train_step.py`` does). The zoo's ``own-inplace`` model runs the same
pattern for every registered method in ``tests/test_contract.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import transformers as hf
from zoo import OWN_MODELS, VOCAB, _hf, _timm

import peft_callbacks.methods.lora.layers as lora_layers_module
from peft_callbacks import inject_lora
from peft_callbacks.methods.lora.fused import lora_linear
from peft_callbacks.methods.lora.method import lora_adapters

# -- the fused node alone ---------------------------------------------------------------------------------------


def _tensors(transposed: bool, bias: bool, separate: bool, x_shape: tuple[int, ...]) -> dict:
    """Float64 inputs of the fused node; ``x_lora`` (the input after LoRA's dropout) when ``separate``."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    n_in, n_out, r = x_shape[-1], 4, 2
    return {
        "x": rand(*x_shape),
        "weight": rand(n_in, n_out) if transposed else rand(n_out, n_in),
        "bias": rand(n_out) if bias else None,
        "lora_a": rand(r, n_in),
        "lora_b": rand(n_out, r),
        "x_lora": rand(*x_shape) if separate else None,
    }


def _changed_in_place(x, weight, bias, lora_a, lora_b, x_lora, transposed):
    """The fused node's output, then what longformer (``/=``), roc_bert (``+=``) and swinv2 (an in-place
    activation) do to it."""
    y = lora_linear(x, weight, bias, lora_a, lora_b, 0.5, transposed, x_lora)
    y /= 3.0
    y += 1.0
    return y.tanh_()


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("separate", [False, True], ids=["no-dropout", "dropout"])
def test_fused_output_changed_in_place_passes_gradcheck(shape, transposed, bias, separate):
    t = _tensors(transposed, bias, separate, shape)
    out = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.5, transposed, t["x_lora"])
    assert not out._is_view()
    w = t["weight"].T if transposed else t["weight"]
    lora_in = t["x"] if t["x_lora"] is None else t["x_lora"]
    expected = t["x"] @ w.T + (0 if t["bias"] is None else t["bias"]) + 0.5 * (lora_in @ t["lora_a"].T) @ t["lora_b"].T
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())

    names = [name for name, value in t.items() if value is not None]  # gradcheck takes the tensors only

    def changed(*values):
        given = dict(zip(names, values))
        return _changed_in_place(**{name: given.get(name) for name in t}, transposed=transposed)

    assert torch.autograd.gradcheck(changed, tuple(t[name] for name in names))


# -- adapted layers inside models -------------------------------------------------------------------------------


def _count_fused_calls(monkeypatch) -> list[int]:
    calls = [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return lora_linear(*args, **kwargs)

    monkeypatch.setattr(lora_layers_module, "lora_linear", counting)
    return calls


def _gradients(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    """One training step's gradients of every trainable tensor."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks on both paths
    out = model(**inputs)
    out = out if torch.is_tensor(out) else out[0]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _check_fused_equals_plain(model: nn.Module, inputs: dict, monkeypatch, dropout: float = 0.0) -> None:
    inject_lora(model, rank=4, alpha=8, dropout=dropout)
    adapters = list(lora_adapters(model).values())
    with torch.no_grad():  # B ≠ 0, so every factor gets a gradient that depends on the other
        for lora in adapters:
            lora.lora_B.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    calls = _count_fused_calls(monkeypatch)
    fused = _gradients(model, inputs)
    assert calls[0] > 0, "the fused node never ran"
    ran = calls[0]
    for lora in adapters:
        lora._fusable = False  # the plain path (benchmarks/common.py's `plain` variant)
    plain = _gradients(model, inputs)
    assert calls[0] == ran, "the plain path ran the fused node"
    assert fused.keys() == plain.keys() and len(fused) > 0
    for name, expected in plain.items():
        atol = 1e-5 * max(expected.abs().max().item(), 1e-6)
        torch.testing.assert_close(fused[name], expected, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


_TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)


def _gemma4_audio_inputs() -> dict:
    return {"input_features": torch.randn(2, 32, 8), "attention_mask": torch.ones(2, 32, dtype=torch.bool)}


MODELS = {  # where each one changes the output of an adapted Linear in place
    # cpb_mlp = Sequential(Linear(2, 512), ReLU(inplace=True), Linear): the continuous position bias
    "timm-swinv2": _timm(
        "swinv2_tiny_window8_256", img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)
    ),
    # patch embedding: x = self.proj(x) (a Linear), then x.add_(pos_embed)
    "timm-naflexvit": _timm("naflexvit_base_patch16_gap", img_size=32, embed_dim=32, depth=1, num_heads=2),
    # self-attention: query_vectors = self.query(h), then query_vectors /= sqrt(head_dim)
    "hf-longformer": _hf(
        hf.LongformerModel, lambda: hf.LongformerConfig(attention_window=4, max_position_embeddings=32, **_TEXT)
    ),
    # embeddings with concat_input: e = self.map_inputs_layer(…) (a Linear), then e += token type and position
    "hf-roc_bert": _hf(
        hf.RoCBertModel,
        lambda: hf.RoCBertConfig(
            pronunciation_vocab_size=20,
            shape_vocab_size=20,
            pronunciation_embed_dim=8,
            shape_embed_dim=8,
            concat_input=True,
            **_TEXT,
        ),
    ),
    # audio conformer: h = self.linear_end(h) (the nn.Linear of Gemma4ClippableLinear, unclipped), then h += residual;
    # the mel bins equal the first subsampling channel count
    "hf-gemma4_audio": _hf(
        hf.Gemma4AudioModel,
        lambda: hf.Gemma4AudioConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            subsampling_conv_channels=[8, 4],
            output_proj_dims=16,
            use_clipped_linears=False,
            attention_chunk_size=4,
            attention_context_left=5,
        ),
        _gemma4_audio_inputs,
    ),
}


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_that_change_linear_outputs_in_place_train_as_on_the_plain_path(name, dropout, monkeypatch):
    model, inputs = MODELS[name]()
    _check_fused_equals_plain(model, inputs, monkeypatch, dropout)


@pytest.mark.parametrize(
    "options",
    [{}, {"dropout": 0.1}, {"use_dora": True}, {"use_rslora": True, "target_modules": "all-linear"}],
    ids=["lora", "dropout", "dora", "rslora-all-linear"],
)
def test_lora_options_train_on_the_zoo_model_that_changes_outputs_in_place(options):
    model, inputs = OWN_MODELS["inplace"]()
    inject_lora(model, rank=2, alpha=4, **options)
    model.train()
    model(inputs["x"]).pow(2).mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.isfinite().all() for p in trainable)
