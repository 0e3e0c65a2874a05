"""LoRA on all-MiniLM-L6-v2 (real weights, shipped offline) for topic classification of dialogue lines.

    python examples/text_lora.py            # two epochs on CPU
    python examples/text_lora.py --quick    # two steps

Data: English lines of the ``chatterbot-corpus`` package, each labelled with the topic file it comes from (ai,
coding, emotion, tech_support, trivia). LoRA goes on the attention ``query``/``value`` projections of the encoder
only (``module="encoder"``); the LightningModule's own linear head trains fully. ``EmbeddingDrift`` reports how far
the sentence embeddings of *other* topics moved: a label-free forgetting signal.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from peft_callbacks import LoRACallback
from peft_callbacks.demo import ChatTopicsDataModule, TextClassifier
from peft_callbacks.demo.data import OTHER_TOPICS
from peft_callbacks.demo.probes import EmbeddingDrift


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="LoRA on all-MiniLM-L6-v2, chatterbot-corpus topics.")
    parser.add_argument("--quick", action="store_true", help="two training steps on a small sample")
    parser.add_argument("--out", default="outputs/text_lora")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    size = dict(max_per_topic=8) if args.quick else {}
    task = ChatTopicsDataModule(general_topics=OTHER_TOPICS, **size)
    lora = LoRACallback(rank=8, alpha=16, target_modules=["query", "value"], module="encoder")
    drift = EmbeddingDrift("base_dataloader")
    limits = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1) if args.quick else dict(max_epochs=2)
    trainer = pl.Trainer(callbacks=[lora, drift], logger=CSVLogger(args.out), enable_checkpointing=False, **limits)
    trainer.fit(TextClassifier(num_classes=task.num_classes, lr=1e-3), datamodule=task)

    summary = {
        "trained": str(lora.parameter_count),
        "trainable %": lora.parameter_count.percent,
        "val/acc": float(trainer.callback_metrics["val/acc"]),
        "embedding drift": drift.drift,
        "logs": trainer.log_dir,
    }
    for key, value in summary.items():
        print(f"{key:>16}: {value}")
    return summary


if __name__ == "__main__":
    main()
