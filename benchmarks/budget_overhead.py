"""Step time with ``ForgettingBudget`` against without, side by side in one process.

Each round fits the same model four times, alternating: full fine-tuning and LoRA (``LoRACallback``), each without
and with the budget (defaults: a reading at every step over the first 50 steps, then every 10 steps, on 2 base
batches; a full score on ``--base-batches`` batches every 5 readings, and at each of the first 5 readings until one
has seen forgetting; the trained tensors copied at each full score that meets the target, for the end-of-fit
restore). The time per step is the wall time from the start of the first timed step to the end of the last, over
the steps: it includes the budget's readings, full scores, copies and its penalty. The budget's penalty is forced on
from the first step (``λ = 10³``), the worst case: while forgetting is under the budget ``λ = 0`` and the term is
skipped. The figure is the median over rounds; the ratio is with/without. Two windows are timed: all steps, and
the steady state from ``--steady-from`` on, after the readings at every step.

Usage::

    python benchmarks/budget_overhead.py --model vit_tiny_patch16_224 --size 32 --steps 200 --rounds 2 --threads 1
    python benchmarks/budget_overhead.py --model vit_s16 --steps 40 --rounds 2     # a model of benchmarks/common.py
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _timm_bench(name: str, size: int):
    """A timm model (random init) on random ``size``-pixel images, batch 16, 10 classes, LoRA on every Linear."""
    import timm
    import torch

    from benchmarks.common import Bench, _image_loss

    def build():
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, img_size=size, num_classes=10).train()

    def batch():
        g = torch.Generator().manual_seed(0)
        return torch.randn(16, 3, size, size, generator=g), torch.randint(0, 10, (16,), generator=g)

    targets = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
    return Bench(build, batch, _image_loss, targets, ["head"], f"timm {name}, {size} px, batch 16, 10 classes")


def _module(bench, lr: float):
    import lightning as L
    import torch

    class Task(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = bench.build()

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            return bench.loss(self.model, batch[0], batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=lr)

    return Task()


def _loader(bench, batches: int):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    inputs, target = bench.batch()
    x = torch.cat([inputs] * batches)
    y = torch.cat([target] * batches)
    return DataLoader(TensorDataset(x, y), batch_size=len(target))


def _base_loader(bench, module, batches: int):
    """``batches`` base batches (other seeds than the training batch) labelled by the model itself: accuracy 1 at the
    start, so forgetting is real and the proxy gets calibrated as in use."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    inputs, target = bench.batch()
    g = torch.Generator().manual_seed(1)
    x = torch.randn((batches * len(target), *inputs.shape[1:]), generator=g)
    with torch.no_grad():
        y = module.model.eval()(x).argmax(-1)
    module.model.train()
    return DataLoader(TensorDataset(x, y), batch_size=len(target))


def _fit(bench, lora: bool, budget: bool, steps: int, base_batches: int, steady_from: int) -> tuple[float, float]:
    """Seconds per step over all timed steps, and over the steps from ``steady_from`` on (after the readings at
    every step of the budget's start)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from peft_callbacks import ForgettingBudget, LoRACallback

    class Forced(Callback):
        def __init__(self, target) -> None:
            self.target = target

        def on_train_start(self, trainer, pl_module) -> None:
            controller = self.target.budget.controller
            controller.integral, controller.multiplier = math.log(1e3), 1e3

    class Clock(Callback):  # last in the list: its batch end comes after the budget's reading
        def __init__(self) -> None:
            self.start = self.steady = self.end = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 1:  # the first step warms up
                self.start = time.perf_counter()
            if trainer.global_step == steady_from:
                self.steady = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.end = time.perf_counter()

    callbacks = [LoRACallback(rank=8, alpha=16, target_modules=bench.targets)] if lora else []
    module = _module(bench, lr=1e-4)
    if budget:
        watcher = ForgettingBudget(_base_loader(bench, module, base_batches), max_forgetting=0.05)
        callbacks += [watcher, Forced(watcher)]
    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps + 1,
        callbacks=[*callbacks, clock],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, _loader(bench, steps + 1))
    steady = (clock.end - clock.steady) / (steps + 1 - steady_from) if steady_from <= steps else math.nan
    return (clock.end - clock.start) / steps, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="a model of benchmarks/common.py or timm")
    parser.add_argument("--size", type=int, default=64, help="image size of a timm model")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--steady-from", type=int, default=60, help="step from which the steady state is timed (default: %(default)s)"
    )
    args = parser.parse_args()

    import torch

    from benchmarks.common import BENCHES

    torch.set_num_threads(args.threads)
    bench = BENCHES[args.model] if args.model in BENCHES else _timm_bench(args.model, args.size)
    runs = [(lora, budget) for lora in (False, True) for budget in (False, True)]
    times: dict[tuple[bool, bool], list[tuple[float, float]]] = {run: [] for run in runs}
    for index in range(args.rounds):
        order = runs if index % 2 == 0 else runs[::-1]
        for lora, budget in order:
            times[(lora, budget)].append(_fit(bench, lora, budget, args.steps, args.base_batches, args.steady_from))
    print(f"{bench.describe}; {args.steps} timed steps, {args.rounds} round(s), {args.threads} thread(s)")
    print("| training | window | without budget (s/step) | with budget (s/step) | ratio |")
    print("|---|---|---|---|---|")
    for lora in (False, True):
        name = "LoRA r=8" if lora else "full fine-tuning"
        for index, window in enumerate(("all steps", f"from step {args.steady_from}")):
            without = statistics.median(t[index] for t in times[(lora, False)])
            with_budget = statistics.median(t[index] for t in times[(lora, True)])
            print(f"| {name} | {window} | {without:.4f} | {with_budget:.4f} | {with_budget / without:.3f} |")


if __name__ == "__main__":
    main()
