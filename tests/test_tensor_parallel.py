"""The PEFT callbacks under tensor parallelism (2 CPU processes) and TP × FSDP2 (4 processes) give what one process
gives: the same losses, an adapter file that loads into a plain model with the same outputs, the same merged weights.

The scenarios live in :mod:`tp_jobs`: Lightning's tensor-parallel example module (its plan applied in
``configure_model``, sequence parallelism included) with ``LoRACallback``, DoRA or IA3 on top. One fixture runs
every reference in this process and each mesh in one spawn, so the process start-up is paid once per mesh.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tp_jobs import METHODS, SCENARIOS
from tp_model import SEQ, VOCAB, tiny_transformer

from peft_callbacks import load_adapter
from peft_callbacks.io.checkpoint import strip_loader_key
from peft_callbacks.io.slim_reshard import read_distributed_checkpoint

MESHES = {"tp2": (2, 1), "tp2_dp2": (4, 2)}  # name: (processes, data-parallel size)


@pytest.fixture(scope="module")
def runs(four_process_runs) -> Path:
    """The meshes' runs (``spawned_runs.py``) and, beside them, the one-process references."""
    for name in METHODS:
        SCENARIOS[name](str(four_process_runs), 1)
    return four_process_runs


def folders(runs: Path, method: str, mesh: str) -> tuple[Path, Path]:
    devices, data_parallel = MESHES[mesh]
    return runs / method / "devices1", runs / f"{method}_dp{data_parallel}" / f"devices{devices}"


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=0, msg=what)


def adapter_outputs(folder: Path) -> torch.Tensor:
    model = load_adapter(tiny_transformer(), folder).eval()
    with torch.no_grad():
        return model(torch.arange(2 * SEQ).reshape(2, SEQ) % VOCAB)


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("method", list(METHODS))
def test_tensor_parallel_fit_equals_one_process(runs, method, mesh):
    one, many = folders(runs, method, mesh)
    a, b = (json.loads((f / "figures.json").read_text()) for f in (one, many))
    assert len(b["losses"]) == len(a["losses"]) == 3
    assert b["losses"] == pytest.approx(a["losses"], abs=1e-5 * max(a["losses"]))
    assert b["trainable"] == a["trainable"] and b["frozen_identical"]
    # the adapter file: gathered from every rank's slices, the same keys and values, and the same recipe
    saved = [load_file(str(f / "adapter" / "adapter_model.safetensors")) for f in (one, many)]
    assert sorted(saved[1]) == sorted(saved[0])
    for key, value in saved[0].items():
        assert saved[1][key].shape == value.shape
        close(saved[1][key], value, key)
    recipes = [json.loads((f / "adapter" / "adapter_recipe.json").read_text())["models"] for f in (one, many)]
    assert recipes[1] == recipes[0]  # the same surgery, and the same fingerprint of the base (gathered)
    close(adapter_outputs(many / "adapter"), adapter_outputs(one / "adapter"), "outputs")
    # merged at the end of fit: the full weights equal one process's merge
    merged = [torch.load(f / "merged.pt") for f in (one, many)]
    assert sorted(merged[1]) == sorted(merged[0]) and not any("adapters" in k for k in merged[1])
    for key, value in merged[0].items():
        close(merged[1][key], value, key)
    # and it runs as the user's plan split it: each base layer has its parallel style's hooks back
    close(torch.tensor(b["merged_outputs"]), torch.tensor(a["merged_outputs"]), "merged outputs")


@pytest.mark.parametrize("mesh", list(MESHES))
def test_a_slim_checkpoint_under_tensor_parallelism_holds_the_trained_tensors_whole(runs, mesh):
    """Written as a distributed folder (the adapters' slices, their optimizer state in their layout: a partial-sum
    momentum would not save), it reads back whole as the adapter file's values."""
    one, many = folders(runs, "lora", mesh)
    for folder in (one, many):
        (path,) = (folder / "checkpoints").iterdir()
        adapter = load_file(str(folder / "adapter" / "adapter_model.safetensors"))  # the adapters and the head
        if folder is one:
            state = torch.load(path, weights_only=True)["state_dict"]
        else:
            saved = read_distributed_checkpoint(path)
            state = saved["state_dict"]
            assert len(saved["optimizer_0"]["state"]) == len(adapter)  # a momentum buffer per trained tensor
        strip_loader_key(state)  # (the key that names the loader in a plain load's error)
        assert sorted(state) == sorted(adapter)  # only the trained tensors: the base stays out
        for key, value in adapter.items():
            close(state[key], value, key)


def test_merged_weights_written_under_tensor_parallelism_equal_one_process(runs):
    for mesh in MESHES:
        one, many = folders(runs, "lora", mesh)
        saved = [load_file(str(f / "merged" / "model.safetensors")) for f in (one, many)]
        assert sorted(saved[1]) == sorted(saved[0])
        for key, value in saved[0].items():
            close(saved[1][key], value, key)


def test_a_method_that_cannot_follow_the_split_is_refused_naming_the_layer(runs):
    message = (runs / "loha_refused" / "devices2" / "error.txt").read_text()
    assert message.startswith(
        "LoHa cannot follow the tensor-parallel split of 'layers.0.attention.wq' (column-parallel"
    )
    assert "Methods that can: LoRA, DoRA and IA3" in message


def test_modules_that_would_train_on_slices_of_activations_are_refused(runs):
    message = (runs / "bottleneck_refused" / "devices2" / "error.txt").read_text()
    assert message.startswith("Bottleneck adapters cannot go into Transformer, which is split by tensor parallelism")
    assert "Methods that follow a tensor-parallel split: LoRA, DoRA and IA3" in message
