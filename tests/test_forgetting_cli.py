"""The forgetting-control callbacks from YAML, pickled, and with their state round-tripped.

``examples/configs/digits_forgetting_control.yaml`` parses (jsonargparse reads every typed ``__init__``) and runs
in-process: replay, EWC, the finish and the monitor together, LoRA merged at the end. Their bad arguments are fuzzed
with every other export in ``test_fuzz_arguments.py``.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_callbacks.callbacks.finish import ForgettingAwareFinish
from peft_callbacks.callbacks.forgetting import ForgettingMonitor
from peft_callbacks.callbacks.mitigation import DistillationCallback, ReplayCallback
from peft_callbacks.callbacks.regularization import EWCCallback, L2SPCallback
from peft_callbacks.cli import PEFTCLI, main
from peft_callbacks.demo import DigitsDataModule, ImageClassifier

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "digits_forgetting_control.yaml")
QUICK = ["--trainer.limit_train_batches=2", "--trainer.max_epochs=1", "--trainer.limit_val_batches=2"]
QUICK += ["--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size=16"]
QUICK += ["--trainer.enable_model_summary=false"]
CALLBACKS = [ReplayCallback, DistillationCallback, L2SPCallback, EWCCallback, ForgettingAwareFinish]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> str:
    """A folder holding ``runs/digits_base/final_model.safetensors``: a 0-4 digit classifier trained a few steps."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("project")
    module = ImageClassifier("test_convnext", num_classes=5, lr=1e-2)
    data = DigitsDataModule(classes=[0, 1, 2, 3, 4], batch_size=32)
    data.setup()
    optimizer = module.configure_optimizers()
    for _, (x, y) in zip(range(4), data.train_dataloader()):
        torch.nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    path = root / "runs" / "digits_base" / "final_model.safetensors"
    path.parent.mkdir(parents=True)
    save_file(module.state_dict(), str(path))
    return str(root)


def test_yaml_parses_into_the_callbacks(project, monkeypatch):
    monkeypatch.chdir(project)
    cli = PEFTCLI(args=["--config", CONFIG, "--trainer.logger=false"], run=False)
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    for name in ("LoRACallback", "ReplayCallback", "EWCCallback", "ForgettingAwareFinish", "ForgettingMonitor"):
        assert name in kinds
    replay = next(c for c in cli.trainer.callbacks if isinstance(c, ReplayCallback))
    finish = next(c for c in cli.trainer.callbacks if isinstance(c, ForgettingAwareFinish))
    assert replay.dataloader == "base_train_dataloader" and replay.fraction == 0.4
    assert finish.grid == [0.0, 0.25, 0.5, 0.75, 1.0] and finish.max_forgetting == 0.1


def test_yaml_runs_and_the_finish_leaves_a_merged_scaled_model(project, monkeypatch):
    monkeypatch.chdir(project)
    cli = main(["fit", f"--config={CONFIG}", *QUICK])
    callbacks = {type(c).__name__: c for c in cli.trainer.callbacks}
    finish, monitor = callbacks["ForgettingAwareFinish"], callbacks["ForgettingMonitor"]
    assert finish.scale in finish.grid and finish.chosen["forgetting"] <= 0.1
    assert callbacks["ReplayCallback"].drawn > 0 and callbacks["EWCCallback"].fisher
    assert monitor.latest["forgetting"] is not None
    final = load_file(os.path.join("runs", "digits_forgetting_control", "final_model.safetensors"))
    assert not any("lora_" in key for key in final)  # LoRA merged after the finish scaled it
    assert set(final) == set(ImageClassifier("test_convnext", num_classes=5).state_dict())
    for callback in cli.trainer.callbacks:
        pickle.loads(pickle.dumps(callback))


def test_every_callback_pickles_and_round_trips_its_state():
    loader = [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))]
    for callback in (
        ReplayCallback(loader),
        DistillationCallback(),
        L2SPCallback(),
        EWCCallback(loader),
        ForgettingAwareFinish(loader),
        ForgettingMonitor({"a": loader, "b": loader}),
    ):
        restored = pickle.loads(pickle.dumps(callback))
        restored.load_state_dict(callback.state_dict())
        assert type(restored) is type(callback)
