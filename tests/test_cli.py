"""LightningCLI: the YAML files in examples/configs build and run every callback, from a real subprocess too."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_callbacks import (
    ForgettingMonitor,
    FreezeBackbone,
    LoRACallback,
    count_parameters,
    freeze_layers,
    inject_lora,
)
from peft_callbacks.cli import PEFTCLI, PROG, command_line, main
from peft_callbacks.demo import DigitsDataModule, ImageClassifier
from peft_callbacks.demo.probes import EmbeddingDrift

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

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
    """A 0-4 digit classifier where ``digits_base.yaml`` writes it (a few steps trained: the baseline is real)."""
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
    return str(path)


def project_dir(base_weights: str) -> str:
    """The folder the YAML's relative ``runs/...`` paths are resolved from."""
    return os.path.dirname(os.path.dirname(os.path.dirname(base_weights)))


def read_metrics(log_dir: str) -> dict[str, list[float]]:
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in rows[0]}


@torch.no_grad()
def base_accuracy_by_hand(base_weights: str) -> float:
    """Accuracy of the untouched base model on the held-out digits 0-4 that the monitor scores."""
    module = ImageClassifier("test_convnext", num_classes=5, init_from=base_weights).eval()
    loader = DigitsDataModule(classes=[5, 6, 7, 8, 9], base_classes=[0, 1, 2, 3, 4]).base_dataloader()
    correct = sum(int((module(x).argmax(-1) == y).sum()) for x, y in loader)
    return correct / len(loader.dataset)


def test_lora_and_monitor_yaml_fit_in_subprocess(base_weights):
    """``python -m peft_callbacks.cli fit --config digits_lora.yaml``, as written: LoRA trains, counts and forgetting
    are logged, the adapter file is written, and the final weights are a plain merged model."""
    root = project_dir(base_weights)
    command = [sys.executable, "-m", "peft_callbacks.cli", "fit", f"--config={CONFIGS}/digits_lora.yaml", *QUICK]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log_dir = os.path.join(root, "runs", "digits_lora")

    # the trainable count logged by the callback equals LoRA r=4 + the new head on the same model, by hand
    expected = ImageClassifier("test_convnext", num_classes=5)
    inject_lora(expected.model, rank=4, alpha=8)
    metrics = read_metrics(log_dir)
    assert metrics["peft/trainable_params"] == [count_parameters(expected).trainable]
    assert metrics["peft/total_params"] == [count_parameters(expected).total]
    assert metrics["val/acc"], "validation ran and was logged"

    # the monitor scored digits 0-4 through the original head: its baseline is the base model's accuracy
    assert metrics["forgetting/baseline"][0] == pytest.approx(base_accuracy_by_hand(base_weights), abs=1e-6)
    assert len(metrics["forgetting/forgetting"]) >= 2  # the baseline row and at least one evaluation after it
    assert os.listdir(os.path.join(log_dir, "adapter")), "LoRACallback(save_adapter_to=...) wrote the adapter file"

    # the final weights are a plain, merged model: the original keys; adapted layers changed, frozen ones did not
    final = load_file(os.path.join(log_dir, "final_model.safetensors"))
    base = load_file(base_weights)  # saved like the CLI saves: LightningModule keys ("model.…")
    assert set(final) == set(ImageClassifier("test_convnext", num_classes=5).state_dict())
    assert not any("lora_" in key for key in final)
    stem = "model.stem.0.weight"  # a conv LoRA adapted: merged update is non-zero
    assert not torch.equal(final[stem], base[stem])
    norm = "model.stem.1.weight"  # a LayerNorm: frozen by LoRA, so unchanged
    assert torch.equal(final[norm], base[norm])


def test_freeze_and_monitor_yaml_fit(base_weights, monkeypatch):
    """``digits_freeze.yaml`` in-process: exactly the first 8 layers are frozen, forgetting is measured."""
    monkeypatch.chdir(project_dir(base_weights))
    cli = main(["fit", f"--config={CONFIGS}/digits_freeze.yaml", *QUICK])
    freeze, monitor = cli.trainer.callbacks[0], cli.trainer.callbacks[1]
    assert isinstance(freeze, FreezeBackbone) and isinstance(monitor, ForgettingMonitor)

    expected = ImageClassifier("test_convnext", num_classes=5)
    freeze_layers(expected.model, 8)
    assert freeze.parameter_count.trainable == count_parameters(expected).trainable
    final = load_file(os.path.join("runs", "digits_freeze", "final_model.safetensors"))
    base = load_file(base_weights)
    assert torch.equal(final["model.stages.2.blocks.3.mlp.fc1.weight"], base["model.stages.2.blocks.3.mlp.fc1.weight"])
    assert not torch.equal(
        final["model.stages.3.blocks.1.mlp.fc1.weight"], base["model.stages.3.blocks.1.mlp.fc1.weight"]
    )
    assert monitor.baseline == pytest.approx(base_accuracy_by_hand(base_weights), abs=1e-6)
    assert monitor.latest["forgetting"] == pytest.approx(monitor.baseline - monitor.latest["value"])


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
        main(["fit", f"--config={CONFIGS}/digits_lora.yaml", f"--trainer.callbacks={lora_only('four')}", "--help"])
    assert exit_.value.code != 0
    assert "rank" in capsys.readouterr().err


def test_yaml_value_errors_name_the_argument(tmp_path, base_weights):
    args = ["fit", f"--config={CONFIGS}/digits_lora.yaml", f"--model.init_args.init_from={base_weights}"]
    with pytest.raises(ValueError, match=r"`rank` must be an int >= 1, got 0"):
        main([*args, f"--trainer.callbacks={lora_only(0)}", f"--trainer.default_root_dir={tmp_path}"])


def lora_only(rank) -> str:
    return json.dumps([{"class_path": "peft_callbacks.LoRACallback", "init_args": {"rank": rank}}])


def test_every_config_parses(base_weights, monkeypatch):
    monkeypatch.chdir(project_dir(base_weights))
    for name in sorted(os.listdir(CONFIGS)):
        cli = PEFTCLI(args=["--config", os.path.join(CONFIGS, name), "--trainer.logger=false"], run=False)
        assert cli.model is not None and cli.datamodule is not None, name
        kinds = {type(c) for c in cli.trainer.callbacks}
        if "lora" in name:
            assert LoRACallback in kinds, name
        if "digits" in name and "base" not in name:
            assert ForgettingMonitor in kinds, name
        if "text" in name:
            assert EmbeddingDrift in kinds, name


# -- errors a new user meets: the line to read is the last one -----------------------------------------------------
def docs_console_examples() -> list[tuple[list[str], list[str]]]:
    """``(arguments, last lines printed)`` of every ``console`` block in docs/cli.md."""
    with open(os.path.join(ROOT, "docs", "cli.md")) as f:
        blocks = re.findall(r"```console\n(.*?)```", f.read(), re.S)
    examples = []
    for block in blocks:
        command, *printed = block.strip().splitlines()
        assert command.startswith(f"$ {PROG} "), command
        examples.append((shlex.split(command[2 + len(PROG) :]), printed))
    return examples


def run_command_line(args: list[str], monkeypatch, capsys) -> tuple[int | str, list[str]]:
    """``python -m peft_callbacks.cli ARGS`` in-process: the exit code and the non-empty lines of stderr."""
    monkeypatch.setattr(sys, "argv", [PROG, *args])
    with pytest.raises(SystemExit) as exit_:
        command_line()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    code = exit_.value.code
    if isinstance(code, str):  # sys.exit("error: ...") prints its message last
        lines.append(code)
    return code, lines


EXAMPLES = docs_console_examples()


@pytest.mark.parametrize("args, printed", EXAMPLES, ids=[" ".join(a[-1:]) for a, _ in EXAMPLES])
def test_the_docs_error_examples_end_as_the_docs_show(args, printed, monkeypatch, capsys, tmp_path):
    assert len(EXAMPLES) >= 3
    monkeypatch.chdir(tmp_path)
    args = [a.replace("examples/configs/", f"{CONFIGS}/") for a in args]
    code, lines = run_command_line(args, monkeypatch, capsys)
    assert code != 0
    assert lines[-len(printed) :] == printed, "\n".join(lines[-20:])
    assert not any(line.startswith("usage:") for line in lines)  # no 50-line usage block before it


def test_an_unknown_key_in_yaml_is_the_last_line_with_the_closest_name(monkeypatch, capsys, tmp_path):
    """``rnak: 4`` in a YAML file (tests/test_hardening_models.py runs the same entry point in a subprocess)."""
    monkeypatch.chdir(tmp_path)
    with open(os.path.join(CONFIGS, "digits_base.yaml")) as f:
        config = f.read()
    config += "  callbacks:\n    - class_path: peft_callbacks.LoRACallback\n      init_args: {rnak: 4, alpha: 8}\n"
    (tmp_path / "typo.yaml").write_text(config)
    code, lines = run_command_line(["fit", "--config=typo.yaml"], monkeypatch, capsys)
    assert code == 2
    assert lines[-1] == "error: Option 'rnak' is not accepted by peft_callbacks.LoRACallback; did you mean 'rank'?"
    assert lines[-2] == f"tip: For details of accepted options run: {PROG} fit --help"
    assert len(lines) < 25, lines  # jsonargparse's account of the types it tried, no usage block


def test_a_typo_in_a_trainer_option_names_the_closest_one(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_epoch: 1\n")
    base = f"--config={CONFIGS}/digits_base.yaml"
    _, lines = run_command_line(["fit", base, "--config=typo.yaml"], monkeypatch, capsys)
    assert lines[-1] == (
        "error: Subcommand 'fit' does not accept option 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"
    )
    _, lines = run_command_line(["fit", base, "--trainer.max_epochz=1"], monkeypatch, capsys)
    assert lines[-1] == "error: unrecognized arguments: --trainer.max_epochz=1; did you mean '--trainer.max_epochs'?"


def test_help_names_the_command_a_user_types(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {PROG} [options] fit ")
