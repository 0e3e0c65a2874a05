"""Add ``ForgettingMonitor`` to an existing project: no LoRA, no other callback, one line in ``Trainer(...)``.

    python examples/add_forgetting_monitor.py            # a few epochs on CPU
    python examples/add_forgetting_monitor.py --quick    # two steps

The "existing project" below is ordinary Lightning code: a timm classifier that was trained on digits 0-4 and is now
fully fine-tuned on digits 5-9 with a new head. The only additions are the monitor and the two things it needs: a
held-out loader of the old task and the old head (here the module itself, taken before it was replaced; from YAML a
file path). It logs ``forgetting/*`` metrics every epoch, prints a summary table at the end and writes
``forgetting.png`` (base-task accuracy and new-task validation accuracy per epoch) to the logger's directory.
"""

from __future__ import annotations

import argparse
import copy

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from peft_callbacks import ForgettingMonitor
from peft_callbacks.demo import DigitsDataModule


class DigitClassifier(pl.LightningModule):  # the project's own module, unchanged
    def __init__(self, num_classes: int, lr: float = 2e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> ForgettingMonitor:
    parser = argparse.ArgumentParser(description="ForgettingMonitor in a project that uses no other callback.")
    parser.add_argument("--quick", action="store_true", help="two steps per stage")
    parser.add_argument("--out", default="outputs/add_forgetting_monitor")
    args = parser.parse_args(argv)
    limits = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1) if args.quick else dict(max_epochs=3)
    pl.seed_everything(0)

    # what the project already had: a model trained on the old task (digits 0-4)...
    model = DigitClassifier(num_classes=5)
    pl.Trainer(logger=False, enable_checkpointing=False, **limits).fit(model, DigitsDataModule(classes=[0, 1, 2, 3, 4]))

    # ...now fine-tuned on a new task (digits 5-9) with a new head, as the project always did
    original_head = copy.deepcopy(model.net.get_classifier())
    model.net.reset_classifier(5)
    new_task = DigitsDataModule(classes=[5, 6, 7, 8, 9], base_classes=[0, 1, 2, 3, 4])

    # the addition: score digits 0-4 through the current backbone and the original head, every epoch
    monitor = ForgettingMonitor(dataloader=new_task.base_dataloader(), base_head=original_head, val_metric="val_acc")
    trainer = pl.Trainer(callbacks=[monitor], logger=CSVLogger(args.out), enable_checkpointing=False, **limits)
    trainer.fit(model, new_task)

    print(f"base-task accuracy: {monitor.baseline:.3f} before, {monitor.latest['value']:.3f} after")
    print(f"forgetting: {monitor.latest['forgetting']:+.3f}; plot: {monitor.plot_path}; logs: {trainer.log_dir}")
    return monitor


if __name__ == "__main__":
    main()
