"""A ``SlimCheckpoint`` written under one strategy resumes under another, and the resumed steps equal the
uninterrupted run's: FSDP2×2 → DDP×2, FSDP2×2 → one process, DDP×2 → FSDP2×2 (two CPU processes, gloo), for LoRA on
a float32 Llama and on the same Llama loaded 4-bit (QLoRA under FSDP2), and FSDP2×2 → FSDP2×4 (four processes) for
LoRA. The scenarios are in :mod:`reshard_jobs`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reshard_jobs import BASES
from safetensors.torch import load_file

LEGS = {"fsdp2_to_ddp": 2, "ddp_to_fsdp2": 2, "fsdp2_to_single": 1, "fsdp2_to_fsdp2": 4}  # leg: resumed on N


def figures(runs: Path, name: str, devices: int) -> dict:
    return json.loads((runs / name / f"devices{devices}" / "figures.json").read_text())


CASES = [(base, leg) for base in BASES for leg in LEGS if leg != "fsdp2_to_fsdp2" or base == "llama"]


@pytest.mark.parametrize(("base", "leg"), CASES)
def test_slim_checkpoint_resumes_under_another_strategy_as_if_uninterrupted(four_process_runs, base, leg):
    runs = four_process_runs  # the two-process runs too
    reference = figures(runs, f"{base}_uninterrupted", 1)
    resumed = figures(runs, f"{base}_{leg}", LEGS[leg])
    assert resumed["global_step"] == 4 and len(resumed["losses"]) == 2
    # steps 3 and 4: the weights after step 2 and the optimizer's momentum came back, whatever the layout
    assert resumed["losses"] == pytest.approx(reference["losses"][2:], abs=1e-5 * max(reference["losses"]))
    runs_of = ((f"{base}_uninterrupted", 1), (f"{base}_{leg}", LEGS[leg]))
    adapters = [load_file(str(runs / n / f"devices{d}" / "adapter" / "adapter_model.safetensors")) for n, d in runs_of]
    # the merged model (a 4-bit base merged into float32), gathered and written by rank 0
    merged = [load_file(str(runs / n / f"devices{d}" / "merged" / "model.safetensors")) for n, d in runs_of]
    for one, other in (adapters, merged):
        assert sorted(other) == sorted(one)
        for key, value in one.items():
            torch.testing.assert_close(other[key], value, atol=1e-5 * float(value.abs().max()), rtol=0, msg=key)
