"""LoRA on a timm model inside a plain LightningModule: train, then check the merged result.

    python examples/vision_lora.py            # a few epochs on scikit-learn's digits, CPU, offline
    python examples/vision_lora.py --quick    # two steps

The LightningModule (``peft_callbacks.demo.ImageClassifier``) is ordinary Lightning code that knows nothing about
LoRA. ``LoRACallback`` injects LoRA after ``configure_model``, trains only the LoRA factors and the head, and merges
them at the end, so the module is a plain timm model again.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from peft_callbacks import LoRACallback, count_parameters, lora_layers
from peft_callbacks.demo import DigitsDataModule, ImageClassifier


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="LoRA on a timm model, merged at the end.")
    parser.add_argument("--quick", action="store_true", help="two training steps")
    parser.add_argument("--out", default="outputs/vision_lora")
    parser.add_argument("--model", default="test_convnext", help="any timm model name")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    model = ImageClassifier(args.model, num_classes=10, lr=3e-3)
    lora = LoRACallback(rank=4, alpha=8)
    limits = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1) if args.quick else dict(max_epochs=3)
    trainer = pl.Trainer(callbacks=[lora], logger=CSVLogger(args.out), enable_checkpointing=False, **limits)
    trainer.fit(model, datamodule=DigitsDataModule(classes=list(range(10))))

    summary = {
        "trained": str(lora.parameter_count),  # counted at fit start, before the merge
        "after merge": str(count_parameters(model)),
        "LoRA layers left": len(lora_layers(model)),
        "val/acc": float(trainer.callback_metrics["val/acc"]),
        "logs": trainer.log_dir,
    }
    for key, value in summary.items():
        print(f"{key:>16}: {value}")
    return summary


if __name__ == "__main__":
    main()
