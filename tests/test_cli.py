"""LightningCLI: the YAML files in examples/configs build and run every callback, from a real subprocess too."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_callbacks import LoRACallback, count_parameters, inject_lora
from peft_callbacks.cli import main
from peft_callbacks.demo import ImageClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "examples", "configs")
QUICK = [
    "--trainer.limit_train_batches=2",
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
]
QUICK += ["--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size=8", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory) -> str:
    """Weights of a 0-4 digit classifier, as ``digits_base.yaml`` would write them (untrained: only shapes matter)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("base") / "final_model.safetensors")
    save_file(ImageClassifier("test_convnext", num_classes=5).state_dict(), path)
    return path


def read_metrics(log_dir: str) -> dict[str, list[float]]:
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in rows[0]}


def test_lora_yaml_fit_in_subprocess(tmp_path, base_weights):
    """``python -m peft_callbacks.cli fit --config digits_lora.yaml``: LoRA trains, logs counts, ends merged."""
    log_dir = tmp_path / "lora"
    command = [sys.executable, "-m", "peft_callbacks.cli", "fit", f"--config={CONFIGS}/digits_lora.yaml", *QUICK]
    command += [f"--model.init_args.init_from={base_weights}", f"--trainer.logger.init_args.save_dir={log_dir}"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # the trainable count logged by the callback equals LoRA r=4 + the new head on the same model, by hand
    expected = ImageClassifier("test_convnext", num_classes=5)
    inject_lora(expected.model, rank=4, alpha=8)
    metrics = read_metrics(str(log_dir))
    assert metrics["peft/trainable_params"] == [count_parameters(expected).trainable]
    assert metrics["peft/total_params"] == [count_parameters(expected).total]
    assert metrics["val/acc"], "validation ran and was logged"

    # the final weights are a plain, merged model: the original keys; adapted layers changed, frozen ones did not
    final = load_file(str(log_dir / "final_model.safetensors"))
    base = load_file(base_weights)  # saved like the CLI saves: LightningModule keys ("model.…")
    assert set(final) == set(ImageClassifier("test_convnext", num_classes=5).state_dict())
    assert not any("lora_" in key for key in final)
    stem = "model.stem.0.weight"  # a conv LoRA adapted: merged update is non-zero
    assert not torch.equal(final[stem], base[stem])
    norm = "model.stem.1.weight"  # a LayerNorm: frozen by LoRA, so unchanged
    assert torch.equal(final[norm], base[norm])


def test_print_config_shows_callback_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--config={CONFIGS}/digits_lora.yaml", "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: peft_callbacks.LoRACallback" in printed
    for argument in ("rank: 4", "alpha: 8.0", "target_modules: null", "merge_on_train_end: true"):
        assert argument in printed


def test_yaml_type_errors_are_caught_before_running(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--config={CONFIGS}/digits_lora.yaml", "--trainer.callbacks.rank=four", "--print_config"])
    assert exit_.value.code != 0
    assert "rank" in capsys.readouterr().err


def test_yaml_value_errors_name_the_argument(tmp_path, base_weights):
    args = ["fit", f"--config={CONFIGS}/digits_lora.yaml", f"--model.init_args.init_from={base_weights}"]
    with pytest.raises(ValueError, match=r"`rank` must be an int >= 1, got 0"):
        main([*args, "--trainer.callbacks.rank=0", f"--trainer.default_root_dir={tmp_path}"])


def test_every_config_parses(base_weights):
    for name in sorted(os.listdir(CONFIGS)):
        cli_args = ["--config", os.path.join(CONFIGS, name), "--trainer.logger=false"]
        if "digits" in name and "base" not in name:
            cli_args.append(f"--model.init_args.init_from={base_weights}")
        if "text" in name:
            continue  # builds a 22M-parameter encoder; covered by the examples test
        cli = main_no_run(cli_args)
        assert cli.model is not None and cli.datamodule is not None, name
        assert isinstance(cli.trainer.callbacks, list)
        if "lora" in name:
            assert any(isinstance(c, LoRACallback) for c in cli.trainer.callbacks)


def main_no_run(args: list[str]):
    from peft_callbacks.cli import PEFTCLI

    return PEFTCLI(args=args, run=False)
