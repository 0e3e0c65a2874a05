"""Checkpoints written during a PEFT fit load like the user's own (``MyModule.load_from_checkpoint``), resume exactly,
and test/validate/predict from them; the methods that cannot be folded load with ``load_checkpoint``."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint
from process_group import ReleaseProcessGroup
from user_modules import CausalLM, GLUETransformer, ImageClassifier, glue_batches, gpt2, image_batches, text_batches

from peft_callbacks import (
    AdaLoRACallback,
    AdapterCallback,
    LoRACallback,
    PEFTCallback,
    SlimCheckpoint,
    load_checkpoint,
)
from peft_callbacks.engine import AdaptedLayer, get_method, registered_methods
from peft_callbacks.io.checkpoint import CHECKPOINT_KEY, loader_key
from peft_callbacks.methods.lora import LoRAConfig, inject_lora, lora_layers
from peft_callbacks.plumbing import checkpoint_hooks as checkpoints

USER_FILE = Path(__file__).with_name("user_modules.py")
_g = torch.Generator().manual_seed(1)
INPUTS = {
    "glue": {"input_ids": torch.randint(3, 99, (2, 10), generator=_g), "attention_mask": torch.ones(2, 10).long()},
    "gpt2": {"input_ids": torch.randint(3, 99, (2, 12), generator=_g)},
    "timm": {"x": torch.randn(2, 3, 32, 32, generator=_g)},
}


def trainer(callbacks, folder=None, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=folder is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def outputs(module: nn.Module, name: str) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        out = module(**INPUTS[name])
    return out.logits if hasattr(out, "logits") else out


def saved_globals(obj) -> set[str]:
    """Modules of every global a pickle of ``obj`` refers to."""
    found = set()
    strings = []
    for op, arg, _ in pickletools.genops(pickle.dumps(obj)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(strings[-2])
        elif op.name == "GLOBAL":
            found.add(arg.split(" ")[0])
    return found


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    """The three user patterns fitted with LoRA and ModelCheckpoint: {name: (checkpoint path, reference outputs)}."""
    folder = tmp_path_factory.mktemp("patterns")
    runs = {
        "glue": (GLUETransformer(), glue_batches(), LoRACallback(rank=4, merge_on_train_end=False)),
        "gpt2": (CausalLM(gpt2()), text_batches(), LoRACallback(rank=4, alpha=32)),  # merged when fit ends
        "timm": (ImageClassifier(), image_batches(), LoRACallback(rank=4, merge_on_train_end=False)),
    }
    found = {}
    for name, (module, data, lora) in runs.items():
        checkpoint = ModelCheckpoint(dirpath=folder, filename=name, every_n_train_steps=2)
        trainer([lora, checkpoint], folder).fit(module, data)
        found[name] = (folder / f"{name}.ckpt", outputs(module, name), module)
    return found


def test_plain_load_from_checkpoint_in_a_process_without_peft_callbacks(patterns, tmp_path):
    shutil.copy(USER_FILE, tmp_path / "user_modules.py")
    refs = {name: reference for name, (_, reference, _) in patterns.items()}
    torch.save({"refs": refs, "inputs": INPUTS}, tmp_path / "refs.pt")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["peft_callbacks"] = None  # installed in this environment: make sure nothing imports it
        import json, torch
        import user_modules as um
        saved = torch.load(sys.argv[1], weights_only=True)
        classes = {"glue": um.GLUETransformer, "gpt2": um.CausalLM, "timm": um.ImageClassifier}
        report = {}
        for name, cls in classes.items():
            path = sys.argv[2] + "/" + name + ".ckpt"
            # the GPT-2 module pickles its model object into the hyper-parameters: not a weights-only file
            module = cls.load_from_checkpoint(path, weights_only=None if name != "gpt2" else False).eval()
            fresh = cls() if name != "gpt2" else cls(um.gpt2())
            with torch.no_grad():
                out = module(**saved["inputs"][name])
            out = out.logits if hasattr(out, "logits") else out
            report[name] = {
                "diff": float((out - saved["refs"][name]).abs().max()),
                "keys": list(module.state_dict()) == list(fresh.state_dict()),
                "types": [type(m) for m in module.modules()] == [type(m) for m in fresh.modules()],
            }
        report["imported"] = sorted(m for m, v in sys.modules.items() if m.startswith("peft_callbacks") and v)
        print(json.dumps(report))
        """
    )
    (tmp_path / "load.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    folder = str(patterns["glue"][0].parent)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), str(tmp_path / "refs.pt"), folder],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.pop("imported") == []
    for name, result in report.items():
        assert result["diff"] < 1e-5 and result["keys"] and result["types"], (name, result)


def test_checkpoint_layout_and_hyperparameters(patterns):
    path, _, module = patterns["gpt2"]
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["state_dict"]
    assert set(state) == set(CausalLM(gpt2()).state_dict())  # original keys, nothing else
    record = checkpoint[CHECKPOINT_KEY]
    assert record["layout"] == "merged" and any(".lora_A." in k for k in record["tensors"])
    assert not {m for m in saved_globals(checkpoint) if m.startswith("peft_callbacks")}
    plain_model = checkpoint["hyper_parameters"]["model"]
    assert not any(isinstance(m, AdaptedLayer) for m in plain_model.modules())
    assert not {m for m in saved_globals(module) if m.startswith("peft_callbacks")}  # merged when fit ended
    torch.load(patterns["glue"][0], weights_only=True)  # plain dicts and tensors only


class Crash(Exception):
    pass


class CrashAtEpoch(L.Callback):
    """Kills a fit when epoch ``epoch`` starts (after the previous epoch's checkpoint was written)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Crash


def without_dropout(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # a resumed run does not continue the random stream
    return module


def test_resume_is_exact_with_the_base_bit_identical_and_the_schedule_continued(tmp_path):
    def run(ckpt_path=None, crash=False):
        module = without_dropout(GLUETransformer())
        extra = [ModelCheckpoint(dirpath=tmp_path, filename="epoch0"), CrashAtEpoch(1)] if crash else []
        folder = tmp_path if crash else None
        fit = trainer([LoRACallback(rank=4, merge_on_train_end=False), *extra], folder, max_epochs=2, max_steps=-1)
        fit.fit(module, glue_batches(), ckpt_path=ckpt_path)
        return module, fit

    straight, straight_fit = run()
    with pytest.raises(Crash):
        run(crash=True)
    path = tmp_path / "epoch0.ckpt"
    assert "base_layer" not in "".join(torch.load(path, weights_only=True)["state_dict"])
    resumed, resumed_fit = run(ckpt_path=path)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    for path, layer in lora_layers(resumed).items():
        assert torch.equal(layer.base_layer.weight, GLUETransformer().get_submodule(path).weight), path
    assert resumed_fit.lr_scheduler_configs[0].scheduler.state_dict() == (
        straight_fit.lr_scheduler_configs[0].scheduler.state_dict()
    )


def test_checkpoints_of_the_previous_layout_still_resume(tmp_path, monkeypatch):
    def run(ckpt_path=None, crash=False):
        module = ImageClassifier()
        extra = [ModelCheckpoint(dirpath=tmp_path, filename="old"), CrashAtEpoch(1)] if crash else []
        folder = tmp_path if crash else None
        fit = trainer([LoRACallback(rank=2, merge_on_train_end=False), *extra], folder, max_epochs=2, max_steps=-1)
        fit.fit(module, image_batches(), ckpt_path=ckpt_path)
        return module

    with monkeypatch.context() as patch, pytest.raises(Crash):  # the previous version wrote the adapted layout
        patch.setattr(checkpoints, "write_checkpoint_layout", lambda module, checkpoint: None)
        run(crash=True)
    old = torch.load(tmp_path / "old.ckpt", weights_only=True)
    assert CHECKPOINT_KEY not in old and any(".base_layer." in k for k in old["state_dict"])
    resumed, straight = run(ckpt_path=tmp_path / "old.ckpt"), run()
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    fresh = ImageClassifier()  # the recipe in the callback's state re-creates LoRA so that the old layout loads
    assert trainer([LoRACallback(rank=2)]).test(fresh, image_batches(), ckpt_path=tmp_path / "old.ckpt")[0]["test_loss"]
    loaded = load_checkpoint(ImageClassifier, tmp_path / "old.ckpt")
    assert not lora_layers(loaded) and not lora_layers(fresh)  # merged again
    torch.testing.assert_close(outputs(loaded, "timm"), outputs(fresh, "timm"), rtol=0, atol=1e-5)


def test_test_validate_predict_from_checkpoints(patterns):
    path, reference, _ = patterns["glue"]
    data = glue_batches()
    adapted = GLUETransformer()  # still carrying LoRA (fit with merge_on_train_end=False): the layout is converted
    inject_lora(adapted.model, rank=4)
    tested = trainer([LoRACallback(rank=4, merge_on_train_end=False)]).test(adapted, data, ckpt_path=path)
    assert tested[0]["test_loss"] > 0 and lora_layers(adapted)
    torch.testing.assert_close(outputs(adapted, "glue"), reference, rtol=0, atol=1e-5)
    plain = GLUETransformer()  # without it: a plain module, the checkpoint loads as it is
    assert trainer([]).validate(plain, data, ckpt_path=path)[0]["val_loss"] > 0
    predicted = trainer([LoRACallback(rank=4)]).predict(GLUETransformer(), data, ckpt_path=path)
    assert predicted[0].shape == (4, 2)
    torch.testing.assert_close(outputs(plain, "glue"), reference, rtol=0, atol=1e-5)


def test_another_base_on_resume_is_unmerged_with_a_warning(patterns, caplog):
    from peft_callbacks.io.checkpoint import restore_adapted_layout

    path, reference, _ = patterns["timm"]
    checkpoint = torch.load(path, weights_only=True)
    module = ImageClassifier()
    with torch.no_grad():
        module.model.conv1[0].weight.add_(0.1)  # not the base the checkpoint was trained on
    inject_lora(module.model, rank=4)
    module.load_state_dict(restore_adapted_layout(module, checkpoint))
    assert "recovered by unmerging" in caplog.text
    torch.testing.assert_close(outputs(module, "timm"), reference, rtol=0, atol=1e-4)


def test_non_mergeable_methods_load_with_load_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = CausalLM(gpt2())
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="adapters", every_n_train_steps=2)
    trainer([AdapterCallback(bottleneck=4), checkpoint], tmp_path).fit(module, text_batches())
    reference = outputs(module, "gpt2")
    path = tmp_path / "adapters.ckpt"
    with pytest.raises(RuntimeError, match=r"peft_callbacks\.load_checkpoint\(CausalLM, path\)"):
        CausalLM.load_from_checkpoint(path, weights_only=False)
    loaded = load_checkpoint(CausalLM, path, weights_only=False)
    torch.testing.assert_close(outputs(loaded, "gpt2"), reference, rtol=0, atol=1e-6)
    instance = load_checkpoint(CausalLM(gpt2()), path, weights_only=False)
    torch.testing.assert_close(outputs(instance, "gpt2"), reference, rtol=0, atol=1e-6)
    assert not {m for m in saved_globals(torch.load(path, weights_only=False)) if m.startswith("peft_callbacks")}
    fresh = CausalLM(gpt2())
    trainer([AdapterCallback(bottleneck=4)]).predict(fresh, text_batches(), ckpt_path=path, weights_only=False)
    torch.testing.assert_close(outputs(fresh, "gpt2"), reference, rtol=0, atol=1e-6)


def test_load_checkpoint_keeps_adapters_or_folds_them(patterns):
    path, reference, _ = patterns["glue"]
    adapted = load_checkpoint(GLUETransformer, path, merged=False)
    assert lora_layers(adapted)
    torch.testing.assert_close(outputs(adapted, "glue"), reference, rtol=0, atol=1e-5)
    plain = load_checkpoint(GLUETransformer, path)
    assert not lora_layers(plain)
    torch.testing.assert_close(outputs(plain, "glue"), reference, rtol=0, atol=1e-5)


def test_slim_checkpoints_load_with_load_checkpoint_and_name_it_otherwise(tmp_path):
    module = ImageClassifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="slim", every_n_train_steps=2)
    trainer([LoRACallback(rank=2, merge_on_train_end=False), SlimCheckpoint(), checkpoint], tmp_path).fit(
        module, image_batches()
    )
    reference = outputs(module, "timm")
    state = torch.load(tmp_path / "slim.ckpt", weights_only=True)["state_dict"]
    assert loader_key(module) in state and len(state) < len(ImageClassifier().state_dict()) / 2
    with pytest.raises(RuntimeError, match=r"load_checkpoint\(ImageClassifier, path\)"):
        ImageClassifier.load_from_checkpoint(tmp_path / "slim.ckpt")
    loaded = load_checkpoint(ImageClassifier, tmp_path / "slim.ckpt")
    assert not lora_layers(loaded)
    torch.testing.assert_close(outputs(loaded, "timm"), reference, rtol=0, atol=1e-5)


def test_weights_only_checkpoints_hold_the_plain_model_too(tmp_path):
    module = ImageClassifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="w", every_n_train_steps=2, save_weights_only=True)
    trainer([PEFTCallback(LoRAConfig(rank=2), merge_on_train_end=False), checkpoint], tmp_path).fit(
        module, image_batches()
    )
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "w.ckpt")
    torch.testing.assert_close(outputs(loaded, "timm"), outputs(module, "timm"), rtol=0, atol=1e-5)


class OutputsAfterRestore(L.Callback):
    """On every rank, once the checkpoint is restored: how far the model's outputs are from ``reference``."""

    def __init__(self, reference: torch.Tensor, folder: Path) -> None:
        self.reference, self.folder = reference, folder

    def on_fit_start(self, trainer, pl_module) -> None:
        diff = float((outputs(pl_module, "timm") - self.reference).abs().max())
        pl_module.train()
        (self.folder / f"rank{trainer.global_rank}.txt").write_text(str(diff))


def test_ddp_ranks_each_load_the_checkpoint(patterns, tmp_path):
    path, reference, _ = patterns["timm"]  # written by one process; under DDP rank zero writes the same
    callbacks = [LoRACallback(rank=4, merge_on_train_end=False), OutputsAfterRestore(reference, tmp_path)]
    fit = trainer([*callbacks, ReleaseProcessGroup()], strategy="ddp_spawn", devices=2, max_steps=2)
    fit.fit(ImageClassifier(), image_batches(), ckpt_path=path)
    diffs = [float((tmp_path / f"rank{rank}.txt").read_text()) for rank in range(2)]
    assert max(diffs) < 1e-5, diffs


def _first_example(method: str):
    """The method's plain form: the first of the example configs it declares (:attr:`Method.examples`)."""
    return next(iter(get_method(method).example_configs().values()))


MERGEABLE = [  # every registered mergeable method through PEFTCallback, and the methods with a callback of their own
    *[
        pytest.param(lambda m=m: PEFTCallback(_first_example(m), merge_on_train_end=False), id=m)
        for m in registered_methods()
        if get_method(m).mergeable
    ],
    pytest.param(
        lambda: AdaLoRACallback(init_r=4, target_r=2, total_step=4, merge_on_train_end=False), id="AdaLoRACallback"
    ),
]


class WithoutDropout(L.Callback):
    """No dropout once the surgery has run (the adapters' own too): a resumed run does not continue the random
    stream."""

    def on_fit_start(self, trainer, pl_module) -> None:
        without_dropout(pl_module)


@pytest.mark.parametrize("make_callback", MERGEABLE)
def test_every_mergeable_method_writes_checkpoints_that_load_plainly_and_resume(make_callback, tmp_path):
    """The plain layout is the engine's: each mergeable method's checkpoint loads with ``load_from_checkpoint`` alone
    and gives the adapted model's outputs at that checkpoint (AdamW steps at lr 1e-2 moved every adapter); a fit
    resumed from the checkpoint of step 2 ends where the straight 4-step fit ends."""

    def fit(ckpt_path=None) -> CausalLM:
        module = CausalLM(gpt2())
        checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
        callbacks = [make_callback(), WithoutDropout(), *([] if ckpt_path else [checkpoint])]
        fit = trainer(callbacks, tmp_path, max_steps=4)
        fit.fit(module, text_batches(), ckpt_path=ckpt_path, weights_only=False)  # CausalLM pickles its model
        return module

    before = outputs(CausalLM(gpt2()), "gpt2")
    straight = fit()
    adapted = outputs(straight, "gpt2")
    assert not torch.allclose(adapted, before, atol=1e-4)  # the adapters changed the model
    plain = CausalLM.load_from_checkpoint(tmp_path / "step=4.ckpt", weights_only=False)  # a model in its hparams
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    torch.testing.assert_close(outputs(plain, "gpt2"), adapted, atol=1e-5, rtol=0)

    resumed = fit(ckpt_path=tmp_path / "step=2.ckpt")
    assert list(resumed.state_dict()) == list(straight.state_dict())
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
