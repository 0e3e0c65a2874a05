"""Inference after merging: the merged model is the original architecture, so it must run exactly as fast.

For each model, six variants are timed side by side in one process (forward under ``torch.inference_mode``, the
order rotating every round, median over rounds): the original model, a second copy of it (the noise band of the
measurement), ``peft_callbacks`` LoRA unmerged and merged
(``merge_lora``), HF ``peft`` LoRA unmerged and merged (``merge_and_unload``). LoRA ``B`` factors are set non-zero
first so the merge really changes the weights. The script also checks that the merged model has exactly the
original's module types and state-dict keys.

Usage::

    python benchmarks/inference.py --models vit_s16 minilm gpt2 --rounds 20 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from benchmarks.common import BENCHES, prepare  # noqa: E402
from peft_callbacks import lora_layers, merge_lora  # noqa: E402


def _nonzero_b(model: nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(1)
    factors = [layer.lora_B.weight for layer in lora_layers(model).values()]
    factors += [b.weight for m in model.modules() if isinstance(m, LoraLayer) for b in m.lora_B.values()]
    with torch.no_grad():
        for weight in factors:
            weight.normal_(std=0.01)


def variants(name: str) -> dict[str, nn.Module]:
    bench = BENCHES[name]
    out = {"original": bench.build().eval(), "original (2nd copy)": bench.build().eval()}  # the noise band
    ours = prepare(bench, "ours")
    _nonzero_b(ours)
    out["ours (unmerged)"] = ours.eval()
    merged = prepare(bench, "ours")
    _nonzero_b(merged)
    out["ours (merged)"] = merge_lora(merged).eval()
    theirs = prepare(bench, "peft")
    _nonzero_b(theirs)
    out["peft (unmerged)"] = theirs.eval()
    theirs_merged = prepare(bench, "peft")
    _nonzero_b(theirs_merged)
    out["peft (merged)"] = theirs_merged.merge_and_unload().eval()
    return out


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    types_a = [(n, type(m)) for n, m in a.named_modules()]
    types_b = [(n, type(m)) for n, m in b.named_modules()]
    return types_a == types_b and list(a.state_dict()) == list(b.state_dict())


def measure(name: str, rounds: int, warmup: int) -> dict[str, float]:
    bench = BENCHES[name]
    models = variants(name)
    assert not lora_layers(models["ours (merged)"])
    print(
        f"{name}: merged has the original's module types and keys: "
        f"{same_architecture(models['original'], models['ours (merged)'])}",
        file=sys.stderr,
    )
    inputs, _ = bench.batch()

    def forward(model: nn.Module) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)
        return time.perf_counter() - start

    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t = forward(models[n])
            if r >= warmup:
                times[n].append(t)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_s16", "minilm", "gpt2"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["| model | variant | forward (ms, median) | / original |", "|---|---|---:|---:|"]
    for name in args.models:
        med = measure(name, args.rounds, args.warmup)
        for n, t in med.items():
            lines.append(f"| {name} | {n} | {t * 1000:.1f} | {t / med['original']:.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
