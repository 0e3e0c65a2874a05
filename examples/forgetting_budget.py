"""Fine-tune under a forgetting budget: ``ForgettingBudget`` holds base-task forgetting under 0.10, no weight to tune.

    python examples/forgetting_budget.py            # a few epochs on CPU
    python examples/forgetting_budget.py --quick    # a few steps

A timm classifier trained on digits 0-4 is fully fine-tuned on digits 5-9 with a new head. Unconstrained, it forgets
most of digits 0-4; with the budget, base-task images replayed at a share that a controller sets from the forgetting
it reads keep the base-task accuracy drop under ``max_forgetting`` (without ``replay=``, the budget sets the
strength of a normalised L2-SP penalty instead). The budget reads forgetting on the base task's *validation* split,
replays its *training* split, and ``ForgettingMonitor`` reports on the held-out *test* split, which the budget never
saw.
"""

from __future__ import annotations

import argparse
import copy

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from peft_callbacks import ForgettingBudget, ForgettingMonitor
from peft_callbacks.demo import DigitsDataModule, ImageClassifier


def main(argv: list[str] | None = None) -> tuple[ForgettingBudget, ForgettingMonitor]:
    parser = argparse.ArgumentParser(description="Fine-tune under a forgetting budget.")
    parser.add_argument("--quick", action="store_true", help="a few steps")
    parser.add_argument("--max-forgetting", type=float, default=0.10)
    parser.add_argument("--out", default="outputs/forgetting_budget")
    args = parser.parse_args(argv)
    limits = dict(max_epochs=1, limit_train_batches=4, limit_val_batches=1) if args.quick else dict(max_epochs=3)
    pl.seed_everything(0)

    model = ImageClassifier("test_resnet", num_classes=5, lr=2e-3)  # the old task, digits 0-4
    pl.Trainer(logger=False, enable_checkpointing=False, **limits).fit(model, DigitsDataModule(classes=[0, 1, 2, 3, 4]))

    original_head = copy.deepcopy(model.model.get_classifier())
    model.model.reset_classifier(5)  # the new task, digits 5-9, with a new head
    splits = dict(val_fraction=0.125, test_fraction=0.125)  # validation: what the budget reads; test: what we report
    new_task = DigitsDataModule(classes=[5, 6, 7, 8, 9], base_classes=[0, 1, 2, 3, 4], **splits)

    budget = ForgettingBudget(
        "base_val_dataloader",  # methods of the DataModule, resolved at fit start
        max_forgetting=args.max_forgetting,
        base_head=original_head,
        replay="base_train_dataloader",
        every_n_steps=2 if args.quick else 10,
    )
    monitor = ForgettingMonitor("base_dataloader", base_head=original_head, val_metric="val/acc", plot=False)
    trainer = pl.Trainer(callbacks=[budget, monitor], logger=CSVLogger(args.out), enable_checkpointing=False, **limits)
    trainer.fit(model, new_task)

    print(f"held-out base accuracy: {monitor.baseline:.3f} before, {monitor.latest['value']:.3f} after")
    restored = "" if budget.restored_step is None else f"; restored to step {budget.restored_step}"
    share = f"replay share at the end {budget.replay_share:.2f}"
    print(f"forgetting {monitor.latest['forgetting']:+.3f} (budget {args.max_forgetting}); {share}{restored}")
    return budget, monitor


if __name__ == "__main__":
    main()
