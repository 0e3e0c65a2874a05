"""Tiny timm and transformers models built from configs (no download), with example inputs.

Shared by every test module: ``TIMM_MODELS`` / ``HF_MODELS`` map a family name to a builder returning
``(model, inputs)`` where ``inputs`` is a dict of keyword arguments (``{"x": tensor}`` for timm models).
Call :func:`run` to get the main output tensor of a model on its inputs.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn as nn
import transformers as hf
from timm.models.mlp_mixer import MlpMixer

VOCAB = 99


def _img(size: int = 32, batch: int = 2) -> dict:
    return {"x": torch.randn(batch, 3, size, size)}


def _timm(name, size: int = 32, **kwargs):
    def build(num_classes: int = 3):
        torch.manual_seed(0)
        if callable(name):  # a timm model class, for sizes no registered name offers
            model = name(num_classes=num_classes, **kwargs)
        else:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        return model, _img(size)

    return build


TIMM_MODELS = {
    "vit": _timm("test_vit", size=160),
    "deit": _timm("deit_tiny_patch16_224", size=32, img_size=32, depth=2, embed_dim=32, num_heads=2),
    "swin": _timm(
        "swin_tiny_patch4_window7_224",
        size=32,
        img_size=32,
        window_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
    ),
    "convnext": _timm("test_convnext", size=32),
    "resnet": _timm("test_resnet", size=32),
    "efficientnet": _timm("test_efficientnet", size=32),
    "mobilenetv3": _timm("mobilenetv3_small_050", size=32),
    "regnet": _timm("regnetx_002", size=32, depth=6, w0=8, wa=8.0, wm=1.5, group_size=4),  # 18k parameters
    "mixer": _timm(MlpMixer, size=32, img_size=32, patch_size=8, num_blocks=2, embed_dim=32),
    "levit": _timm(  # 118k parameters (levit_128s: 7M)
        "levit_128s", size=64, img_size=64, embed_dim=(32, 48, 64), depth=(1, 1, 1), num_heads=(2, 2, 2), key_dim=8
    ),
    "byobnet": _timm("test_byobnet", size=32),
    "efficientnet_gn": _timm("test_efficientnet_gn", size=32),
    "convnext_ln": _timm("test_convnext2", size=32),
}


def _text(batch: int = 2, seq: int = 7, pad_last: bool = True) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        mask[-1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


_SMALL = dict(vocab_size=VOCAB)
_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **_SMALL)
_DECODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=37,
    **_SMALL,
)


def _hf(model_cls, config, inputs=_text):
    def build(num_labels: int = 3):
        torch.manual_seed(0)
        cfg = config()
        if "Classification" in model_cls.__name__:
            cfg.num_labels = num_labels
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = 0
        model = model_cls(cfg).eval()
        return model, inputs()

    return build


def _seq2seq_inputs() -> dict:
    out = _text()
    out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5))
    return out


def _eos_inputs() -> dict:
    out = _text()
    out["input_ids"][:, -3] = 2  # BART classifies from the <eos> token (id 2), which every row must hold once
    return out


def _pixel_inputs() -> dict:
    return {"pixel_values": torch.randn(2, 3, 32, 32)}


HF_MODELS = {
    "bert": _hf(hf.BertForSequenceClassification, lambda: hf.BertConfig(**_ENCODER)),
    "distilbert": _hf(
        hf.DistilBertForSequenceClassification,
        lambda: hf.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, **_SMALL),
    ),
    "roberta": _hf(hf.RobertaForSequenceClassification, lambda: hf.RobertaConfig(**_ENCODER)),
    "albert": _hf(hf.AlbertForSequenceClassification, lambda: hf.AlbertConfig(embedding_size=16, **_ENCODER)),
    "electra": _hf(hf.ElectraForSequenceClassification, lambda: hf.ElectraConfig(embedding_size=16, **_ENCODER)),
    "gpt2": _hf(
        hf.GPT2LMHeadModel,
        lambda: hf.GPT2Config(n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1, **_SMALL),
    ),
    "gpt2_cls": _hf(
        hf.GPT2ForSequenceClassification,
        lambda: hf.GPT2Config(n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1, **_SMALL),
    ),
    "llama": _hf(hf.LlamaForCausalLM, lambda: hf.LlamaConfig(**_DECODER)),
    "qwen2": _hf(hf.Qwen2ForSequenceClassification, lambda: hf.Qwen2Config(**_DECODER)),
    "mistral": _hf(hf.MistralForCausalLM, lambda: hf.MistralConfig(**_DECODER)),
    "qwen3moe": _hf(  # mixture of experts: fused 3-D expert weights (LoRA's target_parameters), a router
        hf.Qwen3MoeForCausalLM,
        lambda: hf.Qwen3MoeConfig(
            moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8, **_DECODER
        ),
    ),
    "t5": _hf(
        hf.T5ForConditionalGeneration,
        lambda: hf.T5Config(d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2, **_SMALL),
        _seq2seq_inputs,
    ),
    "bart": _hf(
        hf.BartForSequenceClassification,
        lambda: hf.BartConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            **_SMALL,
        ),
        _eos_inputs,
    ),
    "vit_hf": _hf(
        hf.ViTForImageClassification,
        lambda: hf.ViTConfig(image_size=32, patch_size=8, **{k: v for k, v in _ENCODER.items() if k != "vocab_size"}),
        _pixel_inputs,
    ),
}


class InplaceOutputs(nn.Module):
    """A model of our own (plain ``nn.Module``) that changes the outputs of its Linear and Conv layers in place, as
    real models do: transformers longformer (``query /= sqrt(d)``), roc_bert (``+=``), timm naflexvit (``x.add_``)
    and swinv2 (``nn.ReLU(inplace=True)`` right after a Linear). Any adapter whose output autograd cannot change in
    place (a view made inside a custom autograd Function) fails its training step here.

    ``x (B, 3, 8, 8) -> conv, ReLU(inplace) -> 64 tokens (B, 64, 8) -> query /= √d, key += tokens, attention
    -> fc, ReLU(inplace) -> proj, .add_(residual) -> mean over tokens -> head (B, num_classes)``; ``head`` is the
    last layer registered and the one that makes the output.
    """

    def __init__(self, num_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.conv_act = nn.ReLU(inplace=True)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.fc = nn.Linear(width, 2 * width)
        self.fc_act = nn.ReLU(inplace=True)
        self.proj = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_act(self.conv(x))  # ReLU(inplace=True) on a conv output
        tokens = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        query = self.query(tokens)
        query /= math.sqrt(query.shape[-1])  # longformer
        key = self.key(tokens)
        key += tokens  # roc_bert
        mixed = (query @ key.transpose(1, 2)).softmax(-1) @ tokens  # (B, HW, C)
        out = self.proj(self.fc_act(self.fc(mixed)))  # swinv2's ReLU(inplace=True) after a Linear
        out.add_(mixed)  # naflexvit
        return self.head(out.mean(1))


def _own(model_cls, size: int = 8):
    def build(num_classes: int = 3):
        torch.manual_seed(0)
        return model_cls(num_classes=num_classes), _img(size)

    return build


OWN_MODELS = {"inplace": _own(InplaceOutputs)}


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The main output tensor (logits) of ``model`` on ``inputs``."""
    if "x" in inputs:
        return model(inputs["x"])
    return model(**inputs).logits


MODELS = {
    **{f"timm-{k}": v for k, v in TIMM_MODELS.items()},
    **{f"hf-{k}": v for k, v in HF_MODELS.items()},
    **{f"own-{k}": v for k, v in OWN_MODELS.items()},
}
