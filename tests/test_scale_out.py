"""The callbacks under FSDP2 (``ModelParallelStrategy``, two CPU processes, gloo) give what one process gives.

The scenarios live in :mod:`fsdp2_jobs`; the session's two processes run them (``spawned_runs.py``, one start-up for
the whole suite), a fixture here runs them in one process, and each test compares one scenario. The module is
written as Lightning's FSDP2 docs show and knows nothing about PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fsdp2_jobs import METHODS, SCENARIOS, SPAWNED, tiny_llama
from safetensors.torch import load_file

from peft_callbacks import load_adapter

ONE_PROCESS = SPAWNED[2][:-2]  # the two-process scenarios (spawned_runs.py) but the refusals only sharding raises


@pytest.fixture(scope="module")
def runs(two_process_runs) -> Path:
    for name in ONE_PROCESS:
        SCENARIOS[name](str(two_process_runs), 1)
    return two_process_runs


def figures(runs: Path, scenario: str) -> tuple[dict, dict]:
    return tuple(json.loads((runs / scenario / f"devices{n}" / "figures.json").read_text()) for n in (1, 2))


def assert_same_fit(runs: Path, scenario: str) -> tuple[dict, dict]:
    one, two = figures(runs, scenario)
    assert len(two["losses"]) == len(one["losses"]) > 0
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert two["trainable"] == one["trainable"]
    merged = [torch.load(runs / scenario / f"devices{n}" / "merged.pt") for n in (1, 2)]
    assert sorted(merged[1]) == sorted(merged[0])
    for key, value in merged[0].items():
        torch.testing.assert_close(merged[1][key], value, atol=1e-5, rtol=0, msg=key)
    return one, two


def outputs_with_adapter(folder: Path) -> torch.Tensor:
    model = load_adapter(tiny_llama(), folder).eval()
    ids = torch.arange(16).reshape(2, 8) % 64
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_under_fsdp2_equals_one_process(runs):
    one, two = assert_same_fit(runs, "lora")
    # only LoRA trains (the causal LM's output layer is no task head), and no frozen shard moved on any rank
    assert two["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in two["trainable"])
    assert one["frozen_identical"] and two["frozen_identical"]
    # the adapter file, gathered and written by rank 0, loads into a plain model and gives the 1-process outputs
    folder = runs / "lora"
    torch.testing.assert_close(
        outputs_with_adapter(folder / "devices2" / "adapter"), outputs_with_adapter(folder / "devices1" / "adapter")
    )
    # save_merged_to: the merged weights, with the original keys, as one process writes them
    saved = [load_file(str(folder / f"devices{n}" / "merged" / "model.safetensors")) for n in (1, 2)]
    assert sorted(saved[1]) == sorted(saved[0]) and not any("lora" in k or "base_layer" in k for k in saved[1])
    for key, value in saved[0].items():
        torch.testing.assert_close(saved[1][key], value, atol=1e-5, rtol=0, msg=key)


def test_forgetting_monitor_under_fsdp2_reports_the_one_process_figures(runs):
    # 5 base batches on 2 ranks: rank 1 runs one forward more (lockstep) whose output is left out
    one, two = figures(runs, "lora")
    assert [r["step"] for r in two["forgetting"]] == [r["step"] for r in one["forgetting"]] == [0, 2, 3]
    for a, b in zip(one["forgetting"], two["forgetting"]):
        for key in ("value", "kl_to_baseline", "feature_cosine"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_dora_on_a_model_built_in_configure_model_with_frozen_layers(runs):
    one, two = assert_same_fit(runs, "dora")
    assert two["frozen_identical"]
    assert not any(n.startswith("model.model.layers.0.") for n in two["trainable"])  # FreezeBackbone(freeze=2)
    folder = runs / "dora"
    torch.testing.assert_close(
        outputs_with_adapter(folder / "devices2" / "adapter"), outputs_with_adapter(folder / "devices1" / "adapter")
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_every_other_method_under_fsdp2_equals_one_process(runs, method):
    one, two = assert_same_fit(runs, method)
    assert two["frozen_identical"]
    folder = runs / method
    torch.testing.assert_close(
        outputs_with_adapter(folder / "devices2" / "adapter"), outputs_with_adapter(folder / "devices1" / "adapter")
    )


def test_layerwise_unfreezing_under_fsdp2_adds_param_groups_and_resumes(runs):
    one, two = assert_same_fit(runs, "unfreezing")
    assert two["groups"] == one["groups"] == [1, 1, 9]  # the head, then the final norm, then decoder layer 1
    # resumed after epoch 2 (two groups then): the groups and the optimizer state come back, the last epoch is the same
    assert two["resumed_groups"] == two["groups"]
    assert two["resumed_losses"] == pytest.approx(two["losses"][-2:], abs=1e-6)


def test_slim_checkpoint_under_fsdp2_holds_trained_shards_and_resumes(runs):
    import torch.distributed.checkpoint as dcp

    one, two = assert_same_fit(runs, "slim")
    assert two["global_step"] == 4 and two["resumed_weights"] and one["resumed_weights"]
    metadata = dcp.FileSystemReader(two["checkpoint"]).read_metadata()
    model_keys = [k for k in metadata.state_dict_metadata if k.startswith("state_dict.")]
    assert model_keys and all(".adapter." in k for k in model_keys)  # bottleneck adapters only, no base tensor


def test_adalora_under_fsdp2_is_refused_naming_what_works(runs):
    message = (runs / "adalora" / "devices2" / "error.txt").read_text()
    assert "AdaLoRACallback runs on one device or under DDP" in message and "strategy='ddp'" in message


def test_an_fsdp2_unit_training_two_dtypes_is_refused_before_fsdp_asserts(runs):
    message = (runs / "mixed_dtypes" / "devices2" / "error.txt").read_text()
    assert "FreezeBackbone: the FSDP2 unit 'model' trains tensors of several dtypes (bfloat16, float32)" in message
