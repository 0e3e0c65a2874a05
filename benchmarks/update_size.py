"""What the monitor's update figures cost, per method, next to one evaluation batch of the same model.

``ForgettingMonitor`` logs ``update_norm`` / ``relative_update`` at every evaluation
(:func:`peft_callbacks.forgetting.updates.update_figures`): each adapted layer measures its own update. This script
times that call for each mergeable method on ViT-S/16 (the ``vit_s16`` bench: every attention and MLP Linear of the
blocks adapted), next to one no-grad forward pass of one batch of 16 images, and LoRA's norm from its ``r × r`` Gram
matrices next to forming ``ΔW = s·B·A`` and taking its norm. Medians of ``--rounds`` calls, in one process.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.update_size --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from benchmarks.common import BENCHES, RANK, timed  # noqa: E402
from peft_callbacks.engine import Adapter, inject  # noqa: E402
from peft_callbacks.forgetting.updates import mergeable_layers, update_figures  # noqa: E402
from peft_callbacks.methods.adalora import AdaLoRAConfig  # noqa: E402
from peft_callbacks.methods.ia3 import IA3Config  # noqa: E402
from peft_callbacks.methods.loha import LoHaConfig  # noqa: E402
from peft_callbacks.methods.lokr import LoKrConfig  # noqa: E402
from peft_callbacks.methods.lora import LoRAConfig  # noqa: E402
from peft_callbacks.methods.oft import OFTConfig  # noqa: E402
from peft_callbacks.methods.vera import VeRAConfig  # noqa: E402

TARGETS = BENCHES["vit_s16"].targets
CONFIGS = {
    "LoRA r=8": LoRAConfig(rank=RANK, target_modules=TARGETS),
    "DoRA r=8": LoRAConfig(rank=RANK, use_dora=True, target_modules=TARGETS),
    "IA3": IA3Config(target_modules=TARGETS),
    "LoHa r=8": LoHaConfig(rank=RANK, target_modules=TARGETS),
    "LoKr r=8": LoKrConfig(rank=RANK, target_modules=TARGETS),
    "OFT b=32": OFTConfig(target_modules=TARGETS),
    "VeRA r=256": VeRAConfig(target_modules=TARGETS),
    "AdaLoRA r=12": AdaLoRAConfig(target_modules=TARGETS),
}


def median_seconds(fn, rounds: int) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn) for _ in range(rounds))


def moved(model: torch.nn.Module) -> torch.nn.Module:
    """Every adapter tensor off its initial value, as after training."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Adapter):
                for p in module.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    bench = BENCHES["vit_s16"]
    images, _ = bench.batch()
    print(f"{bench.describe}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("| method | update_figures (ms) | one eval batch (ms) | ratio |")
    print("|---|---:|---:|---:|")
    lora = None
    for name, config in CONFIGS.items():
        model = moved(inject(bench.build().eval(), config))
        layers = mergeable_layers(model)
        with torch.no_grad():
            figures = median_seconds(lambda layers=layers: update_figures(layers), args.rounds)
            forward = median_seconds(lambda model=model: model(images), args.rounds)
        print(f"| {name} | {figures * 1e3:.1f} | {forward * 1e3:.1f} | {figures / forward:.3f} |")
        lora = lora or layers
    adapters = [(layer, layer.adapters["default"]) for layer in lora.values()]
    with torch.no_grad():
        gram = median_seconds(lambda: [a.update_norm(layer) for layer, a in adapters], args.rounds)
        formed = median_seconds(lambda: [a.low_rank_delta().norm() for layer, a in adapters], args.rounds)
    print(f"\nLoRA r=8, {len(adapters)} layers: ‖ΔW‖ from Gram matrices {gram * 1e3:.2f} ms, ", end="")
    print(f"ΔW formed {formed * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
