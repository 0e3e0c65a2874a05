"""The merge at the end of training is checked against the adapted model before it replaces the adapter (verify=)."""

from __future__ import annotations

import copy
import logging
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks import AdaptedLayer, AdapterCallback, LoRACallback, MergeCheck, check_artifact, load_adapter
from peft_callbacks.demo import MLPClassifier, quiet_trainer


def loader(seed: int, n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=16)


def trained(check: MergeCheck | None, tmp_path, **options) -> tuple[LoRACallback, MLPClassifier, pl.Trainer]:
    """A LoRA run long enough that the adapter holds a real update."""
    pl.seed_everything(0, verbose=False)
    module = MLPClassifier(lr=0.5)
    module.val_loader = lambda: loader(1)  # a method the check can name, as in YAML
    module.start = [copy.deepcopy(module.net)]  # the base before training, out of the module's own tree
    callback = LoRACallback(rank=4, alpha=8, target_modules=["net.0"], verify=check, **options)
    trainer = quiet_trainer(max_steps=30, callbacks=[callback], default_root_dir=str(tmp_path))
    trainer.fit(module, loader(0), val_dataloaders=loader(1))
    return callback, module, trainer


def adapted_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, AdaptedLayer)]


def test_a_float32_merge_is_accepted_merged_and_written(tmp_path):
    check = MergeCheck(
        new_task=loader(1), base_task=loader(2), tolerance=0.0
    )  # accuracy: not one prediction may change
    callback, module, trainer = trained(check, tmp_path, save_merged_to=str(tmp_path / "merged"))
    assert callback.verification.accepted and not callback.kept_adapter
    assert set(callback.verification.scores) == {"new_task", "base_task"}
    assert all(d == 0.0 for d in callback.verification.deltas.values())
    assert not adapted_layers(module)  # merged
    assert os.path.exists(tmp_path / "merged" / "model.safetensors")
    assert trainer.callback_metrics["verify/accepted"] == 1.0
    assert "verify/base_task/delta" in trainer.callback_metrics


def test_a_half_precision_merge_that_moves_the_loss_is_refused_and_the_adapter_kept(tmp_path, caplog):
    check = MergeCheck(new_task=loader(1), base_task=loader(2), metric="loss", tolerance=1e-5)
    with caplog.at_level(logging.INFO):
        callback, module, trainer = trained(
            check,
            tmp_path,
            merged_dtype="bfloat16",
            save_adapter_to=str(tmp_path / "adapter"),
            save_merged_to=str(tmp_path / "merged"),
        )
    result = callback.verification
    assert not result.accepted and callback.kept_adapter
    assert max(abs(d) for d in result.deltas.values()) > 1e-5
    assert len(adapted_layers(module)) == 1  # the adapter stays, unmerged, in float32
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert not os.path.exists(tmp_path / "merged")  # no merged model written
    assert trainer.callback_metrics["verify/accepted"] == 0.0
    text = caplog.text
    assert "merged model refused: new_task loss" in text and "tolerance 1e-05" in text
    assert f"The adapter is saved in {tmp_path / 'adapter'}" in text
    assert "no merged model is written" in text
    # the saved adapter is the trained one: loaded onto a fresh base it gives the kept model's outputs
    fresh = MLPClassifier()
    fresh.net = module.start[0]
    fresh = load_adapter(fresh, str(tmp_path / "adapter"))
    x = torch.randn(5, 4)
    torch.testing.assert_close(fresh.eval()(x), module.eval()(x))


def test_the_same_merge_passes_a_loose_tolerance(tmp_path):
    callback, module, _ = trained(
        MergeCheck(new_task="val_loader", metric="loss", tolerance=0.05), tmp_path, merged_dtype="bfloat16"
    )
    assert callback.verification.accepted and not adapted_layers(module)
    assert next(module.parameters()).dtype == torch.bfloat16


def test_without_verify_nothing_is_scored(tmp_path):
    callback, module, _ = trained(None, tmp_path)
    assert callback.verification is None and not adapted_layers(module)


def test_check_artifact_refuses_a_broken_copy_and_names_the_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[2].weight.zero_()
    result = check_artifact(model, broken, {"base_task": loader(3)}, metric="loss", tolerance=0.01, name="zeroed head")
    assert not result.accepted and abs(result.deltas["base_task"]) > 0.01
    assert result.message().startswith("zeroed head refused: base_task loss")
    half = copy.deepcopy(model).to(torch.float16)  # scored in float32: the rounding of its weights only
    assert check_artifact(model, half, {"t": loader(3)}, tolerance=0.0).accepted


def test_bad_input_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"`tolerance` must be in \[0, 1\].*got -0.1"):
        MergeCheck(tolerance=-0.1)
    with pytest.raises(TypeError, match=r"`tolerance` must be a number in \[0, 1\], got str"):
        MergeCheck(tolerance="0.1")
    with pytest.raises(ValueError, match=r"`metric` must be one of"):
        MergeCheck(metric="perplexity")
    with pytest.raises(TypeError, match=r"`base_task` must be a DataLoader"):
        MergeCheck(base_task=5)
    with pytest.raises(TypeError, match=r"`verify` must be None or a MergeCheck"):
        LoRACallback(verify={"tolerance": 0.1})
    with pytest.raises(ValueError, match=r"`verify` checks the merge.*not merged at the end.*merge_on_train_end"):
        LoRACallback(merge_on_train_end=False, verify=MergeCheck())
    with pytest.raises(ValueError, match=r"`verify` checks the merge.*stays in the model"):
        AdapterCallback(verify=MergeCheck())
    with pytest.raises(ValueError, match=r"`tasks` is empty"):
        check_artifact(nn.Linear(2, 2), nn.Linear(2, 2), {})
    pl.seed_everything(0, verbose=False)
    callback = LoRACallback(rank=2, verify=MergeCheck())
    trainer = quiet_trainer(max_steps=2, callbacks=[callback], default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"needs the new task's validation data.*MergeCheck\(new_task=\.\.\.\)"):
        trainer.fit(MLPClassifier(), loader(0))


class WithValidation(MLPClassifier):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))


def test_by_default_the_new_task_is_the_trainers_validation_data(tmp_path):
    pl.seed_everything(0, verbose=False)
    callback = LoRACallback(rank=4, target_modules=["net.0"], verify=MergeCheck(tolerance=0.0))
    trainer = quiet_trainer(max_steps=10, callbacks=[callback], default_root_dir=str(tmp_path))
    trainer.fit(WithValidation(lr=0.5), loader(0), val_dataloaders=loader(1))
    assert set(callback.verification.scores) == {"new_task"} and callback.verification.accepted


def test_a_yaml_file_sets_the_check(tmp_path):
    from peft_callbacks.cli import PEFTCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  logger: false\n  callbacks:\n    - class_path: peft_callbacks.LoRACallback\n      init_args:\n"
        "        verify: {new_task: val_dataloader, tolerance: 0.02, metric: loss}\n"
        "model: {class_path: peft_callbacks.demo.MLPClassifier}\n"
    )
    cli = PEFTCLI(args=[f"--config={config}"], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LoRACallback)]
    assert callback.verify == MergeCheck(new_task="val_dataloader", tolerance=0.02, metric="loss")
