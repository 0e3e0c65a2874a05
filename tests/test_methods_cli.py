"""LightningCLI YAML: the typed callbacks of VeRA and AdaLoRA, and LoRACallback's new fields, are read and checked from
YAML as any other callback (jsonargparse validates the types before anything runs)."""

from __future__ import annotations

import json
import os

import pytest

from peft_callbacks import AdaLoRACallback, IA3Config, LoRACallback, PEFTCallback, VeRACallback
from peft_callbacks.cli import PEFTCLI, main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs", "digits_base.yaml"
)
CALLBACKS = [
    {"class_path": "peft_callbacks.VeRACallback", "init_args": {"rank": 64, "projection_prng_key": 7}},
    {
        "class_path": "peft_callbacks.AdaLoRACallback",
        "init_args": {"init_r": 6, "target_r": 2, "tinit": 1, "deltaT": 2},
    },
    {
        "class_path": "peft_callbacks.LoRACallback",
        "init_args": {"init": "gaussian", "target_parameters": ["experts.gate_up_proj"], "adapter_name": "moe"},
    },
]


def _cli(callbacks) -> PEFTCLI:
    args = ["--config", CONFIG, "--trainer.logger=false", f"--trainer.callbacks={json.dumps(callbacks)}"]
    return PEFTCLI(args=args, run=False)


def test_the_new_callbacks_and_fields_come_from_yaml():
    vera, adalora, lora = _cli(CALLBACKS).trainer.callbacks[:3]
    assert isinstance(vera, VeRACallback) and (vera.config.rank, vera.config.projection_prng_key) == (64, 7)
    assert isinstance(adalora, AdaLoRACallback) and (adalora.config.init_r, adalora.config.deltaT) == (6, 2)
    assert isinstance(lora, LoRACallback) and lora.config.init == "gaussian"
    assert lora.config.target_parameters == ["experts.gate_up_proj"]


def test_yaml_values_are_checked_with_the_argument_named(capsys):
    with pytest.raises(ValueError, match=r"`target_r` must be <= `init_r`"):
        _cli([{"class_path": "peft_callbacks.AdaLoRACallback", "init_args": {"init_r": 2, "target_r": 4}}])
    pissa_on_experts = {"init": "pissa", "target_parameters": ["experts.gate_up_proj"]}
    with pytest.raises(ValueError, match=r"`init`='pissa' cannot be used with `target_parameters`"):
        _cli([{"class_path": "peft_callbacks.LoRACallback", "init_args": pissa_on_experts}])
    bad = [{"class_path": "peft_callbacks.VeRACallback", "init_args": {"rank": "many"}}]
    with pytest.raises(SystemExit):
        main(["fit", "--config", CONFIG, f"--trainer.callbacks={json.dumps(bad)}", "--help"])
    assert "rank" in capsys.readouterr().err


def test_any_method_config_comes_from_yaml_through_peftcallback():
    """``PEFTCallback(config={class_path: peft_callbacks.IA3Config, ...})``, as docs/callbacks/peft.md shows it."""
    config = {"class_path": "peft_callbacks.IA3Config", "init_args": {"target_modules": ["fc1"], "train_bn": True}}
    (callback,) = _cli(
        [{"class_path": "peft_callbacks.PEFTCallback", "init_args": {"config": config}}]
    ).trainer.callbacks[:1]
    assert isinstance(callback, PEFTCallback) and isinstance(callback.config, IA3Config)
    assert callback.config.target_modules == ["fc1"] and callback.config.train_bn is True


@pytest.mark.parametrize(
    "class_path, typo, meant",
    [
        ("VeRACallback", "rnak", "rank"),
        ("AdaLoRACallback", "target_rr", "target_r"),
        ("LoRACallback", "alpah", "alpha"),
    ],
)
def test_an_unknown_key_ends_the_error_with_the_closest_name(class_path, typo, meant, capsys):
    bad = [{"class_path": f"peft_callbacks.{class_path}", "init_args": {typo: 4}}]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", CONFIG, f"--trainer.callbacks={json.dumps(bad)}"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: Option '{typo}' is not accepted by peft_callbacks.{class_path}; did you mean '{meant}'?"
