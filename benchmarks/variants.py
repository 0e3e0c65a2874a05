"""Full fine-tuning vs LoRA, rsLoRA, DoRA, LoRA+ and LoRA-Pro on one small CPU task, at equal steps and seeds.

Task: an MLP (64 → 128 → 128 → 128 → 10) is pre-trained on scikit-learn's 8×8 digits, then fine-tuned on the same
digits rotated by 90° (a shift that every hidden layer has to follow). The fine-tuning is done by ``LoRACallback``
on an unchanged LightningModule (full fine-tuning: no callback); every method sees the same batches, steps, AdamW
learning rate and seeds, and keeps the head fully trainable. Reported: final training loss on the whole fine-tuning
training set and test accuracy, mean ± std over seeds, plus how much of the LoRA → full fine-tuning gap in training
loss each variant closes.

Run (a few minutes on 2 CPU cores)::

    OMP_NUM_THREADS=1 python -m benchmarks.variants --seeds 0 1 2 --steps 300 --lr 3e-3
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
import warnings

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks import LoRACallback
from peft_callbacks.methods.lora.pro import LoRAProAdamW

METHODS = {
    "full fine-tuning": None,
    "LoRA": {},
    "rsLoRA": {"use_rslora": True},
    "DoRA": {"use_dora": True},
    "LoRA+ (λ=16)": {"loraplus_lr_ratio": 16.0},
    "LoRA-Pro (gradients only)": {"lora_pro": True},
    "LoRA-Pro (full Adam)": {},  # LoRAProAdamW instead of the configured optimizer
}
FULL_ADAM = "LoRA-Pro (full Adam)"


def load_task(seed: int = 0):
    """Digits split 60/40; the fine-tuning task is the same digits rotated by 90 degrees."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8)
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    rotate = lambda t: torch.rot90(t, 1, dims=(1, 2)).flatten(1)  # noqa: E731
    pretrain = (x_train.flatten(1), y_train)
    finetune = (rotate(x_train), y_train), (rotate(x_test), y_test)
    return pretrain, finetune


def make_mlp() -> nn.Sequential:
    layers, width = [], 64
    for _ in range(3):
        layers += [nn.Linear(width, 128), nn.GELU()]
        width = 128
    return nn.Sequential(*layers, nn.Linear(width, 10))


def pretrain(data, steps: int = 1500) -> nn.Sequential:
    torch.manual_seed(0)
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = data
    for step in range(steps):
        index = torch.randint(0, len(x), (128,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float, optimizer: str = "adamw"):
        super().__init__()
        self.model = model
        self.lr = lr
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        if self.optimizer == "lorapro":
            return LoRAProAdamW(self.model, lr=self.lr)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)


def finetune(base, train, test, name: str, seed: int, args: argparse.Namespace):
    steps, rank, options = args.steps, args.rank, METHODS[name]
    L.seed_everything(seed, verbose=False)
    model = Classifier(_copy(base), args.lr, "lorapro" if name == FULL_ADAM else args.optimizer)
    lora = LoRACallback(rank=rank, alpha=2.0 * rank, merge_on_train_end=False, **(options or {}))
    callbacks = [] if options is None else [lora]
    shuffle = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(*train), batch_size=64, shuffle=True, generator=shuffle)
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():  # evaluated unmerged, so that a diverged run is reported instead of refused by the merge
        train_loss = F.cross_entropy(model.model(train[0]), train[1]).item()
        accuracy = (model.model(test[0]).argmax(1) == test[1]).float().mean().item()
    trainable = lora.parameter_count.trainable if callbacks else sum(p.numel() for p in base.parameters())
    if not math.isfinite(train_loss):
        return math.nan, math.nan, trainable
    return train_loss, accuracy, trainable


def _copy(model: nn.Module) -> nn.Module:
    clone = make_mlp()
    clone.load_state_dict(model.state_dict())
    return clone


def _fmt(values: list[float], digits: int = 3) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "diverged"
    mean = statistics.fmean(finite)
    std = statistics.pstdev(finite) if len(finite) > 1 else 0.0
    diverged = f" ({len(values) - len(finite)}/{len(values)} diverged)" if len(finite) < len(values) else ""
    return f"{mean:.{digits}f} ± {std:.{digits}f}{diverged}"


def _mean_loss(runs) -> float:
    finite = [r[0] for r in runs if math.isfinite(r[0])]
    return statistics.fmean(finite) if finite else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("peft_callbacks").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    pre, (train, test) = load_task()
    base = pretrain(pre)
    with torch.no_grad():
        zero_shot = (base(test[0]).argmax(1) == test[1]).float().mean().item()
        upright = (base(pre[0]).argmax(1) == pre[1]).float().mean().item()
    print(f"pre-trained MLP: accuracy {upright:.3f} on upright training digits, {zero_shot:.3f} on rotated test digits")

    results = {}
    for name in METHODS:
        if name == FULL_ADAM and args.optimizer != "adamw":
            continue
        start = time.perf_counter()
        runs = [finetune(base, train, test, name, s, args) for s in args.seeds]
        results[name] = runs
        print(f"{name}: {time.perf_counter() - start:.1f}s", flush=True)

    full, lora = _mean_loss(results["full fine-tuning"]), _mean_loss(results["LoRA"])
    setting = f"{args.optimizer} lr={args.lr:g} steps={args.steps} rank={args.rank} alpha={2 * args.rank}"
    print(f"\n{setting} seeds={args.seeds}\n")
    print("| method | trainable params | final train loss | test accuracy | LoRA→full gap closed |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        loss = _mean_loss(runs)
        closed = (
            "—" if name in ("full fine-tuning", "LoRA") or math.isnan(loss) else f"{(lora - loss) / (lora - full):+.0%}"
        )
        losses, accuracies = _fmt([r[0] for r in runs]), _fmt([r[1] for r in runs])
        print(f"| {name} | {max(r[2] for r in runs):,} | {losses} | {accuracies} | {closed} |")


if __name__ == "__main__":
    main()
