"""The one seam to Lightning (``peft_callbacks/plumbing/seam.py``): after ``fit``, ``validate``, ``test`` and
``predict`` — finished, failed in a step or a callback hook, or interrupted — the LightningModule, the strategy, the
precision plugin and the trainer carry nothing of the library, for every public callback and a combination of several.

What stays in the user's *network* (adapters and prompts after fit, LoRA when not merged) is surgery, not a patch:
only the Lightning objects themselves are inspected, never their ``_modules``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import pickle
import signal

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, TensorDataset
from zoo import HF_MODELS, TIMM_MODELS, run

from peft_callbacks import (
    DistillationCallback,
    EWCCallback,
    ForgettingAwareFinish,
    ForgettingMonitor,
    FreezeBackbone,
    HeadOnly,
    HeadThenFull,
    L2SPCallback,
    LayerwiseUnfreezing,
    LoRACallback,
    PEFTCallback,
    ReplayCallback,
    SlimCheckpoint,
)
from peft_callbacks.core.recipe import _ATTR as SURGERY_RECORD
from peft_callbacks.engine import get_method, registered_methods
from peft_callbacks.methods.adalora import AdaLoRAConfig
from peft_callbacks.methods.prompts import PromptTuningConfig, VisualPromptConfig
from peft_callbacks.plumbing import seam

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers", "ignore:.*started training after fit start", "ignore:.*got no gradient"
)


# -- a module and data that every callback accepts -------------------------------------------------------------------
class Net(L.LightningModule):
    """A three-layer MLP (``self.net``), or a zoo model (``self.model``) for the prompt methods; ``fail`` makes a step
    raise (``"step"``) or interrupt (``"interrupt"``, as Ctrl+C does)."""

    def __init__(self, zoo: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        if zoo is None:
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        else:
            self.model, self.example = {**TIMM_MODELS, **HF_MODELS}[zoo]()
        self.fail: str | None = None

    def forward(self, x):
        if hasattr(self, "net"):
            return self.net(x)
        return run(self.model, {"x": x} if "x" in self.example else {"input_ids": x})

    def _step(self, batch):
        if self.fail == "step":
            raise RuntimeError("a step failed")
        if self.fail == "interrupt":
            raise KeyboardInterrupt
        return F.cross_entropy(self(batch[0]), batch[1])

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._step(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._step(batch))

    def predict_step(self, batch, batch_idx):
        self._step(batch)
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def data(zoo: str | None = None, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    if zoo is None:
        x = torch.randn(4, 4, generator=g)
    elif zoo in TIMM_MODELS:
        x = torch.randn(4, 3, 32, 32, generator=g)
    else:
        x = torch.randint(3, 99, (4, 7), generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (4,), generator=g)), batch_size=4)


class Failing(Callback):
    """Raises in the first hook of the stage that runs (``on_fit_start``, ``on_validation_start``, …)."""

    def __init__(self, armed: bool) -> None:
        self.armed = armed

    def _maybe_fail(self, *args):
        if self.armed:
            raise RuntimeError("a callback hook failed")

    on_fit_start = on_validation_start = on_test_start = on_predict_start = _maybe_fail


# -- every public callback, each registered method, a combination ------------------------------------------------------
SMALL = {"adalora": AdaLoRAConfig(init_r=2, target_r=1, total_step=4, tinit=1, tfinal=1)}
ZOO_FOR = {"prompt_tuning": "bert", "visual_prompts": "deit", "adapters": "deit"}  # they need transformer blocks
PROMPTS = {
    "prompt_tuning": PromptTuningConfig(num_virtual_tokens=2),
    "visual_prompts": VisualPromptConfig(num_virtual_tokens=2),
}


def _method_case(name: str):
    config = PROMPTS.get(name) or SMALL.get(name) or get_method(name).config_class()
    return ZOO_FOR.get(name), lambda loader: [PEFTCallback(config)]


CASES = {f"PEFTCallback[{name}]": _method_case(name) for name in registered_methods()}
CASES.update(
    {
        "LoRACallback": (None, lambda loader: [LoRACallback(rank=2)]),
        "LoRACallback-unmerged": (None, lambda loader: [LoRACallback(rank=2, merge_on_train_end=False)]),
        "FreezeBackbone": (None, lambda loader: [FreezeBackbone(freeze=1)]),
        "HeadOnly": (None, lambda loader: [HeadOnly()]),
        "LayerwiseUnfreezing": (None, lambda loader: [LayerwiseUnfreezing()]),
        "HeadThenFull": (None, lambda loader: [HeadThenFull()]),
        "ForgettingMonitor": (None, lambda loader: [ForgettingMonitor(loader, plot=False)]),
        "ReplayCallback": (None, lambda loader: [ReplayCallback(loader)]),
        "DistillationCallback": (None, lambda loader: [DistillationCallback()]),
        "EWCCallback": (None, lambda loader: [EWCCallback(loader)]),
        "L2SPCallback": (None, lambda loader: [L2SPCallback()]),
        "ForgettingAwareFinish": (
            None,
            lambda loader: [ForgettingAwareFinish(loader, val_dataloader=loader, grid=[0.0, 1.0], plot=False)],
        ),
        "SlimCheckpoint": (None, lambda loader: [SlimCheckpoint()]),
        "combination": (
            None,
            lambda loader: [
                LoRACallback(rank=2, merge_on_train_end=False),
                LayerwiseUnfreezing(),
                SlimCheckpoint(),
                ReplayCallback(loader),
                DistillationCallback(),
                ForgettingMonitor(loader, plot=False),
            ],
        ),
    }
)
STAGES = {"fit": "fit", "validate": "validate", "test": "test", "predict": "predict"}
OUTCOMES = (None, "step", "hook", "interrupt")
HOOK_NAMES = (
    "configure_model",
    "on_load_checkpoint",
    "on_save_checkpoint",
    "training_step",
    "load_checkpoint",
    "convert_module",
)


def _ours(value) -> bool:
    """Does ``value`` come from peft_callbacks (an object of one of its classes, or a function or method of it)?"""
    if isinstance(value, functools.partial):
        value = value.func
    if inspect.ismethod(value):
        return _ours(value.__self__) or _ours(value.__func__)
    module = value.__module__ if inspect.isfunction(value) or inspect.isclass(value) else type(value).__module__
    return str(module).startswith("peft_callbacks")


# the user's network, and the record of the surgery done to it (kept with the adapted model on purpose, see
# core/recipe.py; here the LightningModule is itself the adapted model): surgery may legitimately stay there
NETWORK = {"_modules", "_parameters", "_buffers", SURGERY_RECORD}


def leftovers(obj, before: dict) -> list[str]:
    """What of ours ``obj`` carries: new attributes named after us, values of ours (one level into containers),
    and hook attributes that differ from what was there before."""
    found = []
    for name, value in vars(obj).items():
        if name in NETWORK or (obj.__class__.__name__ == "Trainer" and name == "callbacks"):
            continue
        if "peft" in name.lower() and name not in before:
            found.append(f"new attribute {name}")
        inner = list(value.values()) if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
        if _ours(value) or any(_ours(v) for v in inner):
            found.append(f"{name} = {value!r}")
    for name in HOOK_NAMES:
        if vars(obj).get(name, "absent") is not before.get(name, "absent"):
            found.append(f"{name} changed: {before.get(name, 'absent')!r} -> {vars(obj).get(name, 'absent')!r}")
    return found


def methods(obj) -> dict:
    """``obj``'s hooks and steps as its users call them (bound methods compare equal when function and object match)."""
    names = (*HOOK_NAMES, "forward", "validation_step", "test_step", "predict_step", "save_checkpoint", "teardown")
    return {name: getattr(obj, name) for name in names if callable(getattr(type(obj), name, None))}


def lightning_objects(trainer: L.Trainer, module: L.LightningModule) -> dict:
    return {
        "LightningModule": module,
        "strategy": trainer.strategy,
        "precision plugin": trainer.precision_plugin,
        "trainer": trainer,
    }


def trainer_for(callbacks: list, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=1,
        limit_val_batches=1,
        limit_test_batches=1,
        limit_predict_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def run_stage(trainer: L.Trainer, module: L.LightningModule, stage: str, loader: DataLoader, **kwargs) -> None:
    if stage == "fit":
        trainer.fit(module, loader, **kwargs)
    else:
        getattr(trainer, stage)(module, loader, **kwargs)


def run_and_check(zoo, make_callbacks, stage: str, outcome: str | None) -> None:
    loader = data(zoo)
    module = Net(zoo)
    module.fail = outcome if outcome in ("step", "interrupt") else None
    trainer = trainer_for([*make_callbacks(data(zoo, seed=1)), Failing(outcome == "hook")])
    objects = lightning_objects(trainer, module)
    before = {label: dict(vars(obj)) for label, obj in objects.items()}
    bound = {label: methods(obj) for label, obj in objects.items()}
    handler = signal.getsignal(signal.SIGINT)
    try:
        if outcome is None:
            run_stage(trainer, module, stage, loader)
        else:  # Lightning turns an interrupt into SystemExit(1) after calling on_exception
            with pytest.raises(SystemExit if outcome == "interrupt" else RuntimeError):
                run_stage(trainer, module, stage, loader)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl+C once interrupted
    for label, obj in lightning_objects(trainer, module).items():
        found = leftovers(obj, before.get(label, {}))
        assert not found, f"after {stage} ({outcome or 'finished'}) the {label} still carries: {found}"
        assert not seam.patches(obj), f"the seam still lists patches on the {label}: {seam.patches(obj)}"
        changed = {name for name, method in methods(obj).items() if method != bound[label][name]}
        assert not changed, f"after {stage} ({outcome or 'finished'}) the {label}'s {sorted(changed)} changed"
    pickle.loads(pickle.dumps(module))


@pytest.mark.parametrize("case", list(CASES))
def test_nothing_of_ours_stays_on_lightning_objects(case):
    zoo, make_callbacks = CASES[case]
    for stage in STAGES:
        for outcome in OUTCOMES:
            run_and_check(zoo, make_callbacks, stage, outcome)


# -- resuming: the once-hooks that load run, and leave nothing either -------------------------------------------------
class LateRestore(SingleDeviceStrategy):
    """Restores the checkpoint after setup (as FSDP, DeepSpeed and FSDP2 do): ``strategy.load_checkpoint`` is where
    the freezing callbacks put back their param groups and SlimCheckpoint loads."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


@pytest.mark.parametrize("strategy", ["auto", "late"])
def test_a_resumed_fit_and_a_test_from_the_checkpoint_leave_nothing(tmp_path, strategy):
    def callbacks():
        return CASES["combination"][1](data(seed=1))

    first = trainer_for(callbacks(), max_steps=-1, max_epochs=1)
    first.fit(Net(), data())
    path = tmp_path / "epoch.ckpt"
    first.save_checkpoint(path)
    for stage in ("fit", "test"):
        module = Net()
        kwargs = {"strategy": LateRestore("cpu")} if strategy == "late" else {}
        trainer = trainer_for(callbacks(), max_steps=-1, max_epochs=2, **kwargs)
        before = {label: dict(vars(obj)) for label, obj in lightning_objects(trainer, module).items()}
        run_stage(trainer, module, stage, data(), ckpt_path=path)
        for label, obj in lightning_objects(trainer, module).items():
            assert not leftovers(obj, before[label]), (stage, label, leftovers(obj, before[label]))
            assert not seam.patches(obj)
        if stage == "fit":
            assert trainer.current_epoch == 2


# -- the seam itself ---------------------------------------------------------------------------------------------------
class Owner:
    """Stands for a callback."""


def test_another_partys_instance_override_runs_beneath_and_comes_back():
    module, first, second = Net(), Owner(), Owner()
    calls = []

    def theirs(batch, batch_idx):  # someone else's instance-level step, installed before ours
        calls.append(batch_idx)
        return torch.tensor(1.0)

    module.training_step = theirs
    seam.wrap_method(module, "training_step", owner=first, after=lambda loss, *args: loss + 1)
    seam.wrap_method(module, "training_step", owner=second, after=lambda loss, *args: loss * 10)
    assert float(module.training_step(None, 7)) == 20.0 and calls == [7]  # theirs, then the layers in order
    seam.undo(first)
    assert float(module.training_step(None, 8)) == 10.0
    seam.undo(second)
    assert vars(module)["training_step"] is theirs and seam.patches(module) == {}


def test_a_fit_calls_the_users_own_checkpoint_hook_and_leaves_it_in_place(tmp_path):
    module, seen = Net(), []
    module.on_save_checkpoint = lambda checkpoint: seen.append(sorted(checkpoint["state_dict"]))
    callbacks = [LoRACallback(rank=2, merge_on_train_end=False), ModelCheckpoint(dirpath=tmp_path, filename="fit")]
    trainer = trainer_for(callbacks, max_steps=-1, max_epochs=1, enable_checkpointing=True)
    trainer.fit(module, data())
    during = torch.load(tmp_path / "fit.ckpt", weights_only=True)
    assert any(".lora_" in k for k in seen[0])  # the user's hook ran, on the adapted state, before ours
    assert "peft_callbacks" in during and not any(".lora_" in k for k in during["state_dict"])  # LoRA folded in
    assert vars(module)["on_save_checkpoint"].__name__ == "<lambda>" and not seam.patches(module)
    trainer.save_checkpoint(tmp_path / "after.ckpt")  # after fit: rewritten by the callback, no hook on the module
    after = torch.load(tmp_path / "after.ckpt", weights_only=True)
    assert set(after["state_dict"]) == set(during["state_dict"]) and "peft_callbacks" in after


def test_patches_are_per_object_shared_once_and_copied_away():
    first, second = Net(), Net()
    owners = Owner(), Owner()
    for owner in owners:  # two callbacks asking for the same layer: installed once, kept until both undo
        seam.wrap_method(first, "on_save_checkpoint", owner=owner, key="layout", after=lambda result, ckpt: result)
    seam.run_after(first, "configure_model", lambda: None, owner=owners[0])
    assert seam.patches(first) == {
        "on_save_checkpoint": ["layout (Owner, Owner)"],
        "configure_model": ["layer (Owner)"],
    }
    assert seam.patches(second) == {} and "on_save_checkpoint" not in vars(second)
    for clone in (copy.deepcopy(first), pickle.loads(pickle.dumps(first))):  # a copy carries nothing of the seam
        assert not seam.patches(clone) and not any(_ours(v) for v in vars(clone).values())
        assert not is_overridden("configure_model", clone)  # as for the class: Net does not override it
    assert is_overridden("configure_model", first)  # a wrapped hook counts as overridden: Lightning calls it
    seam.undo(owners[0])
    assert list(seam.patches(first)) == ["on_save_checkpoint"]
    seam.undo(owners[1])
    assert seam.patches(first) == {} and not any(_ours(v) for v in vars(first).values())


def test_replace_puts_back_exactly_what_was_there():
    strategy, owner = SingleDeviceStrategy("cpu"), Owner()
    own = strategy.checkpoint_io
    seam.replace(strategy, "checkpoint_io", "atomic", owner=owner)
    seam.replace(strategy, "checkpoint_io", "atomic", owner=Owner())  # the same value again: shared, not stacked
    with pytest.raises(RuntimeError, match="replaced already"):
        seam.replace(strategy, "checkpoint_io", "other", owner=Owner())
    seam.undo_all(strategy)
    assert strategy.checkpoint_io is own and not seam.patches(strategy)
    with pytest.raises(TypeError, match="`owner` must be an object the seam can refer to weakly"):
        seam.run_after(strategy, "teardown", lambda: None, owner="callback")


def test_undo_all_clears_a_trainers_objects_whoever_patched_them():
    module, trainer = Net(), trainer_for([])
    trainer.strategy.connect(module)
    seam.run_after(module, "configure_model", lambda: None, owner=Owner())
    seam.wrap_method(trainer.strategy, "load_checkpoint", owner=Owner(), before=lambda path, **kwargs: None)
    seam.run_after(trainer.precision_plugin, "convert_module", lambda m: None, owner=Owner())
    seam.undo_all(trainer)
    assert all(not seam.patches(obj) for obj in lightning_objects(trainer, module).values())
    assert "load_checkpoint" not in vars(trainer.strategy) and "configure_model" not in vars(module)
