"""Bad arguments to every public callable fail early and clearly.

Every callable exported in ``peft_callbacks.__all__`` is picked up automatically and must have a row in
:data:`CASES`: a builder of valid keyword arguments, plus the values of the bad-value pool that are in fact legitimate
for an argument. Each argument is then replaced, one at a time, by every value of :data:`BAD_VALUES`; the call must
raise ``ValueError``/``TypeError`` whose message names the argument, from inside ``peft_callbacks`` (never a deep
torch traceback). A seeded random pass mixes several bad arguments at once.

To register a new export, add a row to :data:`CASES`; the test that lists missing rows says which.
"""

from __future__ import annotations

import inspect
import math
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import peft_callbacks

PACKAGE_DIR = Path(peft_callbacks.__file__).resolve().parent


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque object>"


BAD_VALUES: list = [
    None,
    "bogus",
    "",
    -1,
    0,
    1.5,
    -0.5,
    float("nan"),
    float("inf"),
    True,
    [],
    ["bogus"],
    [1],
    {},
    _Opaque(),
    torch.zeros(2),
]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def _lora_net() -> nn.Module:
    return peft_callbacks.inject_lora(_net(), rank=2)


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))


@dataclass
class Case:
    """How to call one public callable.

    Attributes:
        valid: returns fresh valid keyword arguments (modules are rebuilt for every call).
        accepts: per argument, the values of :data:`BAD_VALUES` that are legitimate there (compared with ``==`` or,
            for NaN, by being NaN). Every other pool value must be refused.
        enter: the callable returns a context manager that checks its arguments on entering.
    """

    valid: Callable[[], dict]
    accepts: dict[str, list] = field(default_factory=dict)
    enter: bool = False


_NONE_OK = [None]
_BOOL_OK = [True]
_NUMBER_OK = [1.5]
_PATTERN_OK = [None, "bogus", ["bogus"]]  # a callback cannot know the model yet: patterns are checked at fit time
_LAYER_ARGS = {"r": [], "lora_alpha": _NUMBER_OK, "lora_dropout": [0], "use_rslora": _BOOL_OK}

CASES: dict[str, Case] = {
    "LoRACallback": Case(
        valid=lambda: {},
        accepts={
            "alpha": _NUMBER_OK,
            "dropout": [0],
            "target_modules": _PATTERN_OK,
            "exclude_modules": _PATTERN_OK,
            "train_head": _BOOL_OK,
            "train_bn": _BOOL_OK,
            "module": [None, "bogus"],
            "merge_on_train_end": _BOOL_OK,
            "use_rslora": _BOOL_OK,
        },
    ),
    "LoRALayer": Case(valid=lambda: {"base_layer": nn.Linear(4, 3), "r": 2, "lora_alpha": 4.0}, accepts=_LAYER_ARGS),
    "LoRALinear": Case(valid=lambda: {"base_layer": nn.Linear(4, 3), "r": 2, "lora_alpha": 4.0}, accepts=_LAYER_ARGS),
    "LoRAConv": Case(
        valid=lambda: {"base_layer": nn.Conv2d(3, 4, 3), "r": 2, "lora_alpha": 4.0},
        accepts=_LAYER_ARGS,
    ),
    "LoRAConv1D": Case(valid=lambda: {"base_layer": _hf_conv1d(), "r": 2, "lora_alpha": 4.0}, accepts=_LAYER_ARGS),
    "ParameterCount": Case(valid=lambda: {"trainable": 1, "total": 2}, accepts={"trainable": [0]}),
    "count_parameters": Case(valid=lambda: {"model": _net()}),
    "find_models": Case(valid=lambda: {"root": _net()}, accepts={"module": [None, ""]}),
    "freeze_batchnorm_stats": Case(valid=lambda: {"module": _bn_net()}),
    "inject_lora": Case(
        valid=lambda: {"model": _net(), "rank": 2},
        accepts={
            "alpha": _NUMBER_OK,
            "dropout": [0],
            "target_modules": [None],
            "exclude_modules": [None],
            "train_head": _BOOL_OK,
            "use_rslora": _BOOL_OK,
        },
    ),
    "lora_disabled": Case(valid=lambda: {"model": _lora_net()}, enter=True),
    "lora_layers": Case(valid=lambda: {"model": _lora_net()}),
    "merge_lora": Case(valid=lambda: {"model": _lora_net()}),
    "unload_lora": Case(valid=lambda: {"model": _lora_net()}),
}


def _hf_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(3, 4)


def exported_callables() -> list[str]:
    """Names in ``peft_callbacks.__all__`` that are functions or classes."""
    return [name for name in peft_callbacks.__all__ if callable(getattr(peft_callbacks, name))]


def _is_accepted(value, accepted: list) -> bool:
    for ok in accepted:
        if isinstance(ok, float) and math.isnan(ok):
            if isinstance(value, float) and math.isnan(value):
                return True
        elif type(ok) is type(value) and not isinstance(value, torch.Tensor) and ok == value:
            return True
    return False


def _call(name: str, kwargs: dict):
    target = getattr(peft_callbacks, name)
    result = target(**kwargs)
    if CASES[name].enter:
        with result:
            pass
    return result


def _innermost_file(excinfo: pytest.ExceptionInfo) -> Path:
    tb = excinfo.tb
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve()


def _check_refusal(name: str, arguments: list[str], kwargs: dict) -> None:
    shown = {k: v for k, v in kwargs.items() if k in arguments}
    with pytest.raises((ValueError, TypeError)) as excinfo:
        _call(name, kwargs)
    message = str(excinfo.value)
    named = [a for a in arguments if re.search(rf"\b{re.escape(a)}\b", message)]
    assert named, f"{name}({shown}) raised {excinfo.value!r}, which names none of {arguments}"
    where = _innermost_file(excinfo)
    assert PACKAGE_DIR in where.parents, f"{name}({shown}) failed deep inside {where}, not in peft_callbacks"


def _arguments(name: str) -> list[str]:
    signature = inspect.signature(getattr(peft_callbacks, name))
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.kind not in kinds]


def test_every_export_has_a_row():
    missing = [name for name in exported_callables() if name not in CASES]
    assert not missing, f"add a row to CASES in {Path(__file__).name} for the new export(s): {missing}"


def _single_cases() -> list:
    return [pytest.param(name, id=name) for name in exported_callables() if name in CASES]


@pytest.mark.parametrize("name", _single_cases())
def test_valid_arguments_work(name):
    _call(name, CASES[name].valid())


@pytest.mark.parametrize("name", _single_cases())
def test_each_bad_argument_is_refused_by_name(name):
    case = CASES[name]
    checked = 0
    for argument in _arguments(name):
        accepted = case.accepts.get(argument, [])
        for bad in BAD_VALUES:
            if _is_accepted(bad, accepted):
                continue
            kwargs = case.valid()
            kwargs[argument] = bad
            _check_refusal(name, [argument], kwargs)
            checked += 1
    assert checked >= len(BAD_VALUES) - 2


def test_random_mixtures_of_bad_arguments():
    seed = int(os.environ.get("PEFT_FUZZ_SEED", "1234"))
    rng = random.Random(seed)
    names = [name for name in exported_callables() if name in CASES]
    for _ in range(150):
        name = rng.choice(names)
        case = CASES[name]
        arguments = _arguments(name)
        kwargs = case.valid()
        bad_args = rng.sample(arguments, rng.randint(1, min(3, len(arguments))))
        for argument in bad_args:
            choices = [v for v in BAD_VALUES if not _is_accepted(v, case.accepts.get(argument, []))]
            kwargs[argument] = rng.choice(choices)
        _check_refusal(name, bad_args, kwargs)
