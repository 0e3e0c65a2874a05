"""LoRA on the token embedding, and trainable tokens, ours vs HF peft: training step time and memory, side by side.

Model: a Llama built from a config (random weights, nothing downloaded): vocabulary 32,000, hidden 256, 2 layers,
intermediate 688, untied embeddings; batch 8 × 128 tokens, causal-LM loss, AdamW. Two set-ups, each in both libraries:

* ``embedding``: LoRA r=8 on ``embed_tokens`` plus ``q_proj``/``v_proj``;
* ``tokens``: LoRA r=8 on ``q_proj``/``v_proj`` and 16 trainable token rows (``trainable_token_indices``).

Speed: one process holds all four models and alternates single training steps between them (the order rotates every
round), so machine load hits all alike; the figure is the median step time, and the ratio ours / peft. Memory: one
fresh process per (set-up, library) builds the model, adapts it and trains ``--steps`` steps; it reports its peak
resident memory (``ru_maxrss``) and the peak minus the peak before adapting (what adapting and training added).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/lora_embeddings.py --rounds 10 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SETUPS = ["embedding", "tokens"]
LIBRARIES = ["peft", "ours"]
TOKENS = list(range(31984, 32000))


def _model():
    import torch
    import transformers as hf

    torch.manual_seed(0)
    config = hf.LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    return hf.LlamaForCausalLM(config).train()


def _adapt(model, setup: str, library: str):
    targets = ["embed_tokens", "q_proj", "v_proj"] if setup == "embedding" else ["q_proj", "v_proj"]
    tokens = TOKENS if setup == "tokens" else None
    if library == "peft":
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, trainable_token_indices=tokens)
        return peft.get_peft_model(model, config)
    from peft_callbacks.methods.lora import inject_lora

    return inject_lora(model, rank=8, alpha=16, target_modules=targets, trainable_token_indices=tokens)


def _batch():
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (8, 128), generator=g)
    ids[:, ::8] = torch.tensor(TOKENS[:1])  # the new tokens occur in the batch
    return ids


def _stepper(model):
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = _batch()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def _speed(rounds: int) -> dict:
    pairs = [(s, lib) for s in SETUPS for lib in LIBRARIES]
    steppers = {pair: _stepper(_adapt(_model(), *pair)) for pair in pairs}
    for step in steppers.values():  # warm-up
        step()
    times: dict = {pair: [] for pair in pairs}
    for r in range(rounds):
        for pair in pairs[r % len(pairs) :] + pairs[: r % len(pairs)]:
            start = time.perf_counter()
            steppers[pair]()
            times[pair].append(time.perf_counter() - start)
    return {f"{s}/{lib}": statistics.median(times[(s, lib)]) * 1e3 for s, lib in pairs}


def _memory_child(setup: str, library: str, steps: int) -> None:
    model = _model()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = _adapt(model, setup, library)
    step = _stepper(model)
    for _ in range(steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"peak_mb": peak / 1024, "added_mb": (peak - before) / 1024, "trainable": trainable}))


def _memory(steps: int) -> dict:
    out = {}
    for setup in SETUPS:
        for library in LIBRARIES:
            args = [sys.executable, __file__, "--child", setup, library, "--steps", str(steps)]
            result = subprocess.run(args, capture_output=True, text=True, check=True, env={**os.environ})
            out[f"{setup}/{library}"] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("SETUP", "LIBRARY"))
    args = parser.parse_args()
    if args.child:
        _memory_child(*args.child, args.steps)
        return
    import transformers as hf

    hf.logging.set_verbosity_error()
    speed, memory = _speed(args.rounds), _memory(args.steps)
    print("| set-up | library | step (ms) | ours / peft | trainable | peak RSS (MB) | added (MB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for setup in SETUPS:
        ratio = speed[f"{setup}/ours"] / speed[f"{setup}/peft"]
        for library in LIBRARIES:
            key = f"{setup}/{library}"
            mem = memory[key]
            shown = f"{ratio:.3f}" if library == "ours" else ""
            print(
                f"| {setup} | {library} | {speed[key]:.1f} | {shown} | {mem['trainable']:,} | {mem['peak_mb']:.0f} | "
                f"{mem['added_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
