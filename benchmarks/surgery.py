"""Surgery cost: injecting LoRA into a 7B-parameter Llama built on the ``meta`` device, and into a real model.

* 7B (Llama-2-7B shapes, 32 layers, built under ``torch.device("meta")``): wall time of ``inject_lora`` on every
  linear layer (q/k/v/o/gate/up/down, 224 layers), median of ``--repeats`` fresh models, and the RSS change it
  causes (no base weight may be copied or materialised). HF ``peft.get_peft_model`` is timed on the same model for
  comparison.
* Real weights (all-MiniLM-L6-v2): RSS change of the injection versus the bytes of the LoRA factors, and a check
  that every base weight keeps its storage (``data_ptr``).

Usage::

    python benchmarks/surgery.py --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import transformers as hf  # noqa: E402

from benchmarks.common import minilm_dir, rss_bytes  # noqa: E402
from peft_callbacks import count_parameters, inject_lora, lora_layers  # noqa: E402

LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)


def meta_llama() -> torch.nn.Module:
    with torch.device("meta"):
        return hf.LlamaForCausalLM(hf.LlamaConfig(**LLAMA_7B))


def time_surgery(surgery, repeats: int) -> tuple[list[float], list[float], torch.nn.Module]:
    seconds, rss_change = [], []
    model = None
    for _ in range(repeats):
        model = meta_llama()
        gc.collect()
        before = rss_bytes()
        start = time.perf_counter()
        model = surgery(model)
        seconds.append(time.perf_counter() - start)
        rss_change.append((rss_bytes() - before) / 2**20)
    return seconds, rss_change, model


def ours(model):
    return inject_lora(model, rank=8, alpha=16, target_modules="all-linear")


def theirs(model):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def real_model_check() -> str:
    model = hf.BertModel.from_pretrained(minilm_dir())
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    gc.collect()
    before = rss_bytes()
    inject_lora(model, rank=8, target_modules="all-linear")
    change = (rss_bytes() - before) / 2**20
    after = {name.replace(".base_layer", ""): p.data_ptr() for name, p in model.named_parameters()}
    shared = all(after[name] == ptr for name, ptr in pointers.items())
    factors = (
        sum(layer.lora_A.weight.nbytes + layer.lora_B.weight.nbytes for layer in lora_layers(model).values()) / 2**20
    )
    base = sum(p.nbytes for p in model.parameters() if not p.requires_grad) / 2**20
    return (
        f"all-MiniLM-L6-v2 (real fp32 weights, {base:.1f} MB frozen): injection changed RSS by {change:+.1f} MB; "
        f"LoRA factors {factors:.2f} MB; every base weight keeps its storage: {shared}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args()
    hf.logging.set_verbosity_error()
    ours(meta_llama())  # first call pays one-off imports and lazy initialisation
    rows = []
    runs = [("peft_callbacks inject_lora", ours)] + ([] if args.skip_peft else [("peft get_peft_model", theirs)])
    for label, surgery in runs:
        seconds, rss, model = time_surgery(surgery, args.repeats)
        count = count_parameters(model)
        rows.append(
            f"| {label} | {statistics.median(seconds) * 1000:.0f} | {min(seconds) * 1000:.0f}–{max(seconds) * 1000:.0f}"
            f" | {statistics.median(rss):+.1f} | {count.total / 1e9:.2f} B | {count.trainable / 1e6:.1f} M |"
        )
    print("| surgery on meta Llama-7B (224 layers, r=8) | median ms | range ms | RSS change (MB) | params | LoRA |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print()
    print(real_model_check())


if __name__ == "__main__":
    main()
