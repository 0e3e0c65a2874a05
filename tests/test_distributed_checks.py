"""The run-time check of a distributed run catches faults built on purpose (two CPU processes under FSDP2, the
scenarios in :mod:`check_jobs`): every rank stops with the same error, which names the tensors (their layers) and
the ranks. Every other multi-process test of the suite runs with the check on, and passes it.
"""

from __future__ import annotations

import re

import pytest
import torch
from check_jobs import FAULTS, ZEROED

from peft_callbacks.core.distributed_checks import DistributedCheckError, gradient_problems, saved_tensor_problems


def errors(runs, fault: str) -> list[str]:
    folder = runs / f"fault_{fault}" / "devices2"
    return [(folder / f"error_rank{rank}.txt").read_text() for rank in (0, 1)]


@pytest.mark.parametrize("fault", FAULTS)
def test_every_rank_stops_with_the_same_error(two_process_runs, fault):
    rank0, rank1 = errors(two_process_runs, fault)
    assert rank0 and rank0 == rank1


def test_an_adapter_in_a_frozen_unit_is_named_after_the_first_step(two_process_runs):
    message, _ = errors(two_process_runs, "frozen_unit")
    assert message.startswith("LoRACallback: after the first optimizer step, 14 trainable tensor(s) lack a finite")
    # the 14 LoRA factors of the first layer (7 projections), none of the second
    assert "'model.model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight': no gradient on rank(s) [0, 1]" in (
        message
    )
    assert "layers.1." not in message


def test_a_gather_only_rank_0_joined_is_refused_before_anything_is_written(two_process_runs):
    message, _ = errors(two_process_runs, "rank0_gather")
    assert message.startswith("LoRACallback: refusing to save, 56 problem(s)")  # 28 tensors, two findings each
    assert "lora_A.weight': the share of rank(s) [1] (dim 0) is all zeros" in message
    assert not (two_process_runs / "fault_rank0_gather" / "devices2" / "adapter").exists()


def test_a_zeroed_shard_is_named_with_its_rank(two_process_runs):
    message, _ = errors(two_process_runs, "zero_shard")
    assert re.search(r"refusing to save, 1 problem\(s\)", message)
    assert f"{ZEROED!r}: the share of rank(s) [1] (dim 0) is all zeros" in message


def test_one_process_has_nothing_to_compare():
    param = torch.nn.Parameter(torch.ones(2))  # no gradient at all: one process leaves that to its own warning
    assert gradient_problems([("w", param)]) == []
    assert saved_tensor_problems({"w": (torch.zeros(0), param)}) == []
    assert issubclass(DistributedCheckError, RuntimeError)
