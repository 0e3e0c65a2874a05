"""LoHaCallback, LoKrCallback and OFTCallback from YAML: LightningCLI (jsonargparse) parses and checks each argument."""

from __future__ import annotations

import json

import pytest

from peft_callbacks import LoHaCallback, LoHaConfig, LoKrCallback, LoKrConfig, OFTCallback, OFTConfig
from peft_callbacks.cli import PEFTCLI

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

BASE = ["--model=peft_callbacks.demo.ImageClassifier", "--model.num_classes=5"]
BASE += ["--data=peft_callbacks.demo.DigitsDataModule", "--trainer.logger=false"]
CALLBACKS = {  # every method argument away from its default
    LoHaCallback: (
        LoHaConfig,
        dict(rank=4, alpha=2.0, rank_dropout=0.1, module_dropout=0.2, use_effective_conv2d=True),
    ),
    LoKrCallback: (
        LoKrConfig,
        dict(rank=2, alpha=4.0, decompose_both=True, decompose_factor=4, rank_dropout_scale=True, rank_dropout=0.1),
    ),
    OFTCallback: (
        OFTConfig,
        dict(oft_block_size=0, rank=4, coft=True, eps=1e-3, block_share=True, use_cayley_neumann=False),
    ),
}
COMMON = dict(target_modules=["stem.0"], train_head=False, merge_on_train_end=False, adapter_name="task")


def _parse(callbacks: list[dict]) -> PEFTCLI:
    return PEFTCLI(args=[*BASE, f"--trainer.callbacks={json.dumps(callbacks)}"], run=False)


def test_each_callback_parses_from_yaml_with_every_argument():
    given = [
        {"class_path": f"peft_callbacks.{cls.__name__}", "init_args": {**arguments, **COMMON}}
        for cls, (_, arguments) in CALLBACKS.items()
    ]
    cli = _parse(given)
    built = {type(c): c for c in cli.trainer.callbacks if type(c) in CALLBACKS}
    assert set(built) == set(CALLBACKS)
    for cls, (config_class, arguments) in CALLBACKS.items():
        callback = built[cls]
        assert callback.config == config_class(**arguments, target_modules=["stem.0"], train_head=False)
        assert (callback.adapter_name, callback.merge_on_train_end) == ("task", False)


@pytest.mark.parametrize(
    "cls, argument, value",
    [(LoHaCallback, "rank", "four"), (LoKrCallback, "decompose_both", "maybe"), (OFTCallback, "oft_block_size", 1.5)],
)
def test_yaml_type_errors_name_the_argument(capsys, cls, argument, value):
    with pytest.raises(SystemExit):
        _parse([{"class_path": f"peft_callbacks.{cls.__name__}", "init_args": {argument: value}}])
    assert argument in capsys.readouterr().err


@pytest.mark.parametrize(
    "cls, arguments, match",
    [
        (LoHaCallback, {"rank_dropout": 1.0}, r"`rank_dropout` must be in \[0\.0, 1\.0\)"),
        (LoKrCallback, {"decompose_factor": 0}, r"`decompose_factor` must be -1"),
        (OFTCallback, {"rank": 4}, r"Give `rank` or `oft_block_size`, not both"),
    ],
)
def test_yaml_value_errors_name_the_argument(cls, arguments, match):
    with pytest.raises(ValueError, match=match):
        _parse([{"class_path": f"peft_callbacks.{cls.__name__}", "init_args": arguments}])
