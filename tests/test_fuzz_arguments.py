"""Bad arguments to every public callable fail early and clearly.

Every callable exported in ``peft_callbacks.__all__`` is picked up automatically and must have a row in
:data:`CASES`: a builder of valid keyword arguments, plus the values of the bad-value pool that are in fact legitimate
for an argument. Each argument is then replaced, one at a time, by every value of :data:`BAD_VALUES`; the call must
raise ``ValueError``/``TypeError`` whose message names the argument, from inside ``peft_callbacks`` (never a deep
torch traceback). A seeded random pass mixes several bad arguments at once.

To register a new export, add a row to :data:`CASES`; the test that lists missing rows says which. Arguments that
are known not to be checked yet are listed in the row's ``gaps`` (skipped, and re-tested so fixed ones get removed).
"""

from __future__ import annotations

import atexit
import inspect
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
from zoo import HF_MODELS, TIMM_MODELS

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


def _lora_config(rank: int):
    return peft_callbacks.LoRAConfig(rank=rank, alpha=rank)


def _sum_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).sum()


def _quantized_net() -> nn.Module:
    model = _net()
    peft_callbacks.loftq_quantize(model, _lora_config(2), adapter=False)
    return model


def _lora_net() -> nn.Module:
    return peft_callbacks.inject_lora(_net(), rank=2)


def _two_adapters() -> nn.Module:
    net = peft_callbacks.inject_lora(_net(), rank=2, adapter_name="a", train_head=False)
    return peft_callbacks.inject_lora(net, rank=2, adapter_name="b", train_head=False)


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()


def _checkpoint() -> str:
    """A checkpoint of :class:`_Module` (written once per session)."""
    path = Path(_TMP_ROOT) / "module.ckpt"
    if not path.exists():
        torch.save({"state_dict": _Module().state_dict(), "pytorch-lightning_version": L.__version__}, path)
    return str(path)


def _llama_shape():
    from peft_callbacks.core.memory import LLAMA_SHAPES

    return LLAMA_SHAPES["1B"]


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
        abstract: why the callable cannot be called directly (it is then only listed, not fuzzed).
        gaps: arguments known not to be checked yet, with what happens instead. They are skipped by the main test;
            :func:`test_known_gaps_are_still_open` fails once one is fixed, so the entry gets removed.
        also_raises: further exception types that are a right answer here (``FileNotFoundError`` for paths).
    """

    valid: Callable[[], dict]
    accepts: dict[str, list] = field(default_factory=dict)
    enter: bool = False
    abstract: str | None = None
    gaps: dict[str, str] = field(default_factory=dict)
    also_raises: tuple[type[BaseException], ...] = ()

    def accepted(self, argument: str) -> list:
        """The legitimate pool values for ``argument``: the row's own, else those every row shares."""
        return self.accepts.get(argument, SHARED_ACCEPTS.get(argument, []))


_NONE_OK = [None]
_BOOL_OK = [True]
_NUMBER_OK = [1.5]
_PATTERN_OK = [None, "bogus", ["bogus"]]  # a callback cannot know the model yet: patterns are checked at fit time
_MODULE_OK = [None, "bogus"]  # likewise the submodule path
_PATH_OK = [None, "bogus"]  # any path names a place to write; the fuzz never writes (bogus paths are not tried)
_DIRECTORY_OK = [None, "bogus", ""]  # "" is the working directory: never tried, the fuzz writes only to temp folders
_NAME_OK = ["bogus"]  # any non-empty name without dots names an adapter
# arguments every layer method's config (and a callback or function building one) shares, accepted in every row
SHARED_ACCEPTS = {
    "adapter_dtype": _NONE_OK,
    "train_bn": _BOOL_OK,
    "merged_dtype": _NONE_OK,
    "layers_to_transform": [None, 0, [1]],  # layer numbers: an int or a non-empty list of ints >= 0
    "layers_pattern": _NONE_OK,  # a name alone is refused: it needs `layers_to_transform`
    "rank_pattern": [None, {}],  # {} is "no pattern"; keys are checked against the model at fit time
    "alpha_pattern": [None, {}],
    "lora_bias": _BOOL_OK,
    "verify": _NONE_OK,
}
_LORA_CONFIG_ARGS = {
    "alpha": _NUMBER_OK,
    "dropout": [0],
    "target_modules": _PATTERN_OK,
    "exclude_modules": _PATTERN_OK,
    "train_head": _BOOL_OK,
    "train_bn": _BOOL_OK,
    "use_rslora": _BOOL_OK,
    "use_dora": _BOOL_OK,
    "target_parameters": _PATTERN_OK,
    "trainable_token_indices": [None, [1]],  # ids beyond the vocabulary are refused when the model is known
}
_LORA_CALLBACK_ARGS = {
    "alpha": _NUMBER_OK,
    "dropout": [0],
    "target_modules": _PATTERN_OK,
    "exclude_modules": _PATTERN_OK,
    "train_head": _BOOL_OK,
    "train_bn": _BOOL_OK,
    "module": _MODULE_OK,
    "merge_on_train_end": _BOOL_OK,
    "use_rslora": _BOOL_OK,
    "use_dora": _BOOL_OK,
    "merged_dtype": _NONE_OK,
    "target_parameters": _PATTERN_OK,
    "trainable_token_indices": [None, [1]],
    "loraplus_lr_ratio": [None, 1.5],
    "lora_pro": _BOOL_OK,
    "eva_batches": [1, 4],
    "eva_rho": [1, 1.5, 2.5],
    "eva_whiten": _BOOL_OK,
    "loftq_bits": [4, 8],
    "loftq_iter": [1, 3],
    "loftq_weights": _PATH_OK,  # read at setup, on a quantized base only
    "corda_batches": [1, 4],
    "lora_ga_batches": [1, 4],
    "lora_ga_stable_gamma": [1, 1.5, 16],
    "corda_dataloader": [None, [], ["bogus"], [1]],  # any iterable of batches: what they hold is read at fit time
    "save_adapter_to": _PATH_OK,
    "save_merged_to": _PATH_OK,
    "adapter_name": _NAME_OK,
}


_LAYER_CONFIG_ARGS = {
    "target_modules": _PATTERN_OK,
    "exclude_modules": _PATTERN_OK,
    "train_head": _BOOL_OK,
    "train_bn": _BOOL_OK,
}
_FEEDFORWARD_OK = [*_PATTERN_OK, []]  # []: no layer is feed-forward
_VERA_ARGS = {
    "projection_prng_key": [0],
    "save_projection": _BOOL_OK,
    "dropout": [0],
    "d_initial": _NUMBER_OK,
    **_LAYER_CONFIG_ARGS,
}
_ADALORA_ARGS = {
    "alpha": _NUMBER_OK,
    "dropout": [0],
    "tinit": [0],
    "tfinal": [0],
    "orth_reg_weight": [0, 1.5],
    "total_step": [None],
    **_LAYER_CONFIG_ARGS,
}
_OPTIONS = {  # CallbackOptions, which every PEFT callback takes
    "module": _MODULE_OK,
    "merge_on_train_end": _BOOL_OK,
    "save_adapter_to": _PATH_OK,
    "save_merged_to": _PATH_OK,
    "adapter_name": _NAME_OK,
}
_ONE_PER_MODEL = {**_OPTIONS, "adapter_name": []}  # prompts: one set per model, only the default name
_CALLBACK_ARGS = {**_LAYER_CONFIG_ARGS, **_OPTIONS}


def _adalora_net() -> nn.Module:
    config = peft_callbacks.AdaLoRAConfig(init_r=2, target_r=1, total_step=10, target_modules=["0"])
    return peft_callbacks.inject(_net(), config)


def _experts() -> nn.Module:
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.randn(3, 6, 4))
    return experts


_LYCORIS_ARGS = {"alpha": _NUMBER_OK, "rank_dropout": [0], "module_dropout": [0], "use_effective_conv2d": _BOOL_OK}
_LOKR_ARGS = {**_LYCORIS_ARGS, "decompose_both": _BOOL_OK, "decompose_factor": [-1], "rank_dropout_scale": _BOOL_OK}
_OFT_ARGS = {
    "rank": [0],  # the default: the block size gives the number of blocks
    "module_dropout": [0],
    "coft": _BOOL_OK,
    "eps": _NUMBER_OK,
    "block_share": _BOOL_OK,
    "use_cayley_neumann": _BOOL_OK,
}


def _method_adapter_cases(prefix: str, config: Callable[[], object]) -> dict[str, Case]:
    """Rows for a method's adapter classes: the abstract base and one concrete class per layer kind."""
    bases = {"Linear": lambda: nn.Linear(4, 3), "Conv": lambda: nn.Conv2d(3, 4, 3), "Conv1D": lambda: _hf_conv1d()}
    cases = {f"{prefix}Adapter": Case(valid=dict, abstract=f"needs a concrete subclass ({prefix}Linear, …)")}
    for kind, base in bases.items():
        cases[f"{prefix}{kind}"] = Case(valid=lambda base=base: {"base_layer": base(), "config": config()})
    return cases


def _vit() -> nn.Module:
    return TIMM_MODELS["deit"]()[0]


def _bert() -> nn.Module:
    return HF_MODELS["bert"]()[0]


def _loader():
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long)), batch_size=2)


_LOADERS = ["bogus", ["bogus"], [1]]  # a method name or an iterable of batches, both read at fit time
_BASE_TASK = {"base_head": [None], "forward_fn": [None], "module": _MODULE_OK, "prefix": [None, "bogus"]}

_TMP_ROOT = tempfile.mkdtemp(prefix="peft_fuzz_")
atexit.register(shutil.rmtree, _TMP_ROOT, True)


def _tmpdir() -> str:
    return tempfile.mkdtemp(dir=_TMP_ROOT)


def _saved(writer: str) -> str:
    directory = _tmpdir()
    getattr(peft_callbacks, writer)(_lora_net(), directory)
    return directory


def _adapter_case(base: Callable[[], nn.Module], **config) -> Case:
    return Case(valid=lambda: {"base_layer": base(), "config": peft_callbacks.LoRAConfig(rank=2, **config)})


def _model_case(build: Callable[[], nn.Module], **kwargs) -> Case:
    return Case(valid=lambda: {"model": build()}, **kwargs)


CASES: dict[str, Case] = {
    "LoRACallback": Case(valid=lambda: {}, accepts=_LORA_CALLBACK_ARGS),
    "LoRAAdapter": Case(valid=dict, abstract="needs a concrete subclass (LoRALinear, LoRAConv, LoRAConv1D)"),
    "LoRALinear": _adapter_case(lambda: nn.Linear(4, 3)),
    "LoRAConv": _adapter_case(lambda: nn.Conv2d(3, 4, 3)),
    "LoRAConv1D": _adapter_case(lambda: _hf_conv1d()),
    "DoRAAdapter": Case(valid=dict, abstract="needs a concrete subclass (DoRALinear, DoRAConv, DoRAConv1D)"),
    "DoRALinear": _adapter_case(lambda: nn.Linear(4, 3), use_dora=True),
    "DoRAConv": _adapter_case(lambda: nn.Conv2d(3, 4, 3), use_dora=True),
    "DoRAConv1D": _adapter_case(lambda: _hf_conv1d(), use_dora=True),
    "Adapter": Case(valid=dict, abstract="the base class of every method's adapters"),
    "IA3": Case(
        valid=lambda: {"base_layer": nn.Linear(4, 3), "config": peft_callbacks.IA3Config()},
        accepts={"feedforward": _BOOL_OK},
    ),
    "IA3Config": Case(valid=dict, accepts={"feedforward_modules": _FEEDFORWARD_OK, **_LAYER_CONFIG_ARGS}),
    "IA3Callback": Case(valid=dict, accepts={"feedforward_modules": _FEEDFORWARD_OK, **_CALLBACK_ARGS}),
    "VeRA": Case(
        valid=lambda: {
            "base_layer": nn.Linear(4, 3),
            "config": peft_callbacks.VeRAConfig(rank=4),
            "shared": _vera_projections(),
        }
    ),
    "VeRAConfig": Case(valid=dict, accepts=_VERA_ARGS),
    "VeRACallback": Case(valid=dict, accepts={**_VERA_ARGS, **_CALLBACK_ARGS}),
    "AdaLoRA": Case(
        valid=lambda: {"base_layer": nn.Linear(4, 3), "config": peft_callbacks.AdaLoRAConfig(init_r=2, target_r=1)}
    ),
    "AdaLoRAConfig": Case(valid=dict, accepts=_ADALORA_ARGS),
    "AdaLoRACallback": Case(valid=dict, accepts={**_ADALORA_ARGS, **_CALLBACK_ARGS}),
    "RankAllocator": Case(
        valid=lambda: {"model": _adalora_net(), "total_step": 10},
        accepts={"config": [None], "total_step": [None]},
    ),
    "ParameterLoRA": Case(
        valid=lambda: {
            "base_layer": _experts(),
            "config": peft_callbacks.LoRAConfig(rank=2),
            "parameter_names": ["gate_up_proj"],
        }
    ),
    "AdaptedLayer": Case(valid=lambda: {"base_layer": nn.Linear(4, 3)}),
    **_method_adapter_cases("LoHa", lambda: peft_callbacks.LoHaConfig(rank=2)),
    **_method_adapter_cases("LoKr", lambda: peft_callbacks.LoKrConfig(rank=2)),
    **_method_adapter_cases("OFT", lambda: peft_callbacks.OFTConfig(oft_block_size=2)),
    "LoHaConfig": Case(valid=dict, accepts={**_LYCORIS_ARGS, **_LAYER_CONFIG_ARGS}),
    "LoKrConfig": Case(valid=dict, accepts={**_LOKR_ARGS, **_LAYER_CONFIG_ARGS}),
    "OFTConfig": Case(valid=dict, accepts={**_OFT_ARGS, **_LAYER_CONFIG_ARGS}),
    "LoHaCallback": Case(valid=dict, accepts={**_LYCORIS_ARGS, **_CALLBACK_ARGS}),
    "LoKrCallback": Case(valid=dict, accepts={**_LOKR_ARGS, **_CALLBACK_ARGS}),
    "OFTCallback": Case(valid=dict, accepts={**_OFT_ARGS, **_CALLBACK_ARGS}),
    "MethodConfig": Case(valid=dict, accepts={"train_head": _BOOL_OK, "train_bn": _BOOL_OK}),
    "LoRAConfig": Case(valid=dict, accepts={"rank": [], **_LORA_CONFIG_ARGS}),
    "BottleneckConfig": Case(
        valid=dict,
        accepts={"modules": _PATTERN_OK, "train_head": _BOOL_OK, "train_bn": _BOOL_OK, "train_norms": _BOOL_OK},
    ),
    "PromptTuningConfig": Case(
        valid=dict,
        accepts={"init_token_ids": [None, [1]], "tokenizer": [None], "train_head": _BOOL_OK, "train_bn": _BOOL_OK},
    ),
    "VisualPromptConfig": Case(
        valid=dict, accepts={"deep": _BOOL_OK, "dropout": [0], "train_head": _BOOL_OK, "train_bn": _BOOL_OK}
    ),
    "PEFTCallback": Case(
        valid=lambda: {"config": peft_callbacks.LoRAConfig(rank=2)},
        accepts={
            "adapter_name": _NAME_OK,
            "module": _MODULE_OK,
            "merge_on_train_end": _BOOL_OK,
            "save_adapter_to": _PATH_OK,
            "save_merged_to": _PATH_OK,
            "merged_dtype": _NONE_OK,
        },
    ),
    "inject": Case(
        valid=lambda: {"model": _net(), "config": peft_callbacks.LoRAConfig(rank=2)},
        accepts={"adapter_name": _NAME_OK, "targets": [None]},
    ),
    "merge": _model_case(_lora_net, accepts={"method": [None], "dtype": _NONE_OK, "requantize": _BOOL_OK}),
    "requantization_error": _model_case(_lora_net, accepts={"method": [None]}),
    "prepare_quantized_base": _model_case(_net),
    "unload": _model_case(_lora_net, accepts={"method": [None], "adapter_name": [None, "bogus"]}),
    "disabled": _model_case(_lora_net, enter=True),
    "scaled": Case(  # any finite number scales the update: 0 is the base model, negative values reverse it
        valid=lambda: {"model": _lora_net(), "scale": 0.5}, enter=True, accepts={"scale": [-1, 0, 1.5, -0.5]}
    ),
    "registered_methods": Case(valid=dict),
    "ParameterCount": Case(valid=lambda: {"trainable": 1, "total": 2}, accepts={"trainable": [0]}),
    "count_parameters": _model_case(_net),
    "estimate_memory": Case(
        valid=lambda: {"shape": _llama_shape(), "strategy": "tp_fsdp2", "tensor_parallel": 2},
        accepts={"checkpointing": _BOOL_OK, "sequence_parallel": _BOOL_OK, "loss_parallel": _BOOL_OK},
    ),
    "memory_table": Case(valid=lambda: {"shapes": {"1B": _llama_shape()}}, accepts={"shapes": [None]}),
    "full_parameters": Case(valid=lambda: {"module": _lora_net()}, enter=True, accepts={"writeback": _BOOL_OK}),
    "gather_state_dict": _model_case(_net),
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
            "train_bn": _BOOL_OK,
            "use_rslora": _BOOL_OK,
            "use_dora": _BOOL_OK,
            "target_parameters": [None],
            "trainable_token_indices": [None],
            "adapter_name": _NAME_OK,
        },
    ),
    "EVAOptions": Case(valid=dict, accepts={"eva_batches": [1, 4], "eva_rho": [1, 1.5, 2.5], "eva_whiten": _BOOL_OK}),
    "CorDAOptions": Case(valid=dict, accepts={"corda_batches": [1, 4], "corda_dataloader": [None, [], ["bogus"], [1]]}),
    "LoRAGAOptions": Case(valid=dict, accepts={"lora_ga_batches": [1, 4], "lora_ga_stable_gamma": [1, 1.5, 16]}),
    "LoftQOptions": Case(valid=dict, accepts={"loftq_bits": [4, 8], "loftq_iter": [1, 3], "loftq_weights": _PATH_OK}),
    "eva_init": Case(
        valid=lambda: {"model": _net(), "dataloader": [torch.randn(8, 4)], "config": _lora_config(2)},
        accepts={"eva": [None], "adapter_name": _NAME_OK, "use_label_mask": _BOOL_OK, "label_mask_value": [-1, 0]},
    ),
    "corda_init": Case(
        valid=lambda: {"model": _net(), "dataloader": [torch.randn(8, 4)], "config": _lora_config(1)},
        accepts={"corda": [None], "adapter_name": _NAME_OK},
    ),
    "lora_ga_init": Case(
        valid=lambda: {
            "model": _net(),
            "train_step": _sum_loss,
            "config": _lora_config(1),
            "batches": [torch.randn(8, 4)],
        },
        accepts={"lora_ga": [None], "adapter_name": _NAME_OK, "module": [None], "batches": [None]},
        gaps={"batches": "each batch goes to the user's own train_step(model, batch); its error is the one raised"},
    ),
    "loftq_quantize": Case(
        valid=lambda: {"model": _net(), "config": _lora_config(2)},
        accepts={"loftq": [None], "adapter_name": _NAME_OK, "adapter": _BOOL_OK},
    ),
    "loftq_init": Case(
        valid=lambda: {"model": _quantized_net(), "original": _net().state_dict(), "config": _lora_config(2)},
        accepts={"config": [None], "adapter_name": _NAME_OK, "accept": [None]},  # config None: re-initialise
        also_raises=(FileNotFoundError,),
    ),
    "lora_disabled": _model_case(_lora_net, enter=True),
    "lora_layers": _model_case(_lora_net),
    "merge_lora": _model_case(_lora_net),
    "unload_lora": _model_case(_lora_net),
    "loraplus_param_groups": Case(
        valid=lambda: {"model": _lora_net(), "lr": 1e-3}, accepts={"lr": _NUMBER_OK, "ratio": _NUMBER_OK}
    ),
    "apply_lora_pro": _model_case(
        _lora_net,
        accepts={"params": [None], "rcond": _NUMBER_OK},
    ),
    "LoRAProAdamW": Case(
        valid=lambda: {"model": _lora_net()},
        accepts={"lr": _NUMBER_OK, "eps": _NUMBER_OK, "weight_decay": [0, 1.5], "rcond": _NUMBER_OK},
    ),
    "AdapterCallback": Case(
        valid=dict,
        accepts={"bottleneck": [], "modules": _PATTERN_OK, "train_head": _BOOL_OK, "train_norms": _BOOL_OK, **_OPTIONS},
    ),
    "BottleneckAdapter": Case(valid=lambda: {"dim": 8, "bottleneck": 2}),
    "inject_adapters": Case(
        valid=lambda: {"model": _vit(), "bottleneck": 4},
        accepts={"modules": [None], "train_head": _BOOL_OK, "train_norms": _BOOL_OK, "adapter_name": _NAME_OK},
    ),
    "adapter_layers": _model_case(_vit),
    "remove_adapters": _model_case(_vit),
    "PromptTuningCallback": Case(
        valid=dict,
        accepts={"init_token_ids": [None, [1]], "tokenizer": [None], "train_head": _BOOL_OK, **_ONE_PER_MODEL},
    ),
    "VisualPromptCallback": Case(
        valid=dict, accepts={"deep": _BOOL_OK, "dropout": [0], "train_head": _BOOL_OK, **_ONE_PER_MODEL}
    ),
    "SoftPrompt": Case(
        valid=lambda: {"num_virtual_tokens": 2, "dim": 8},
        accepts={"placeholder_id": [0]},
    ),
    "VisualPrompts": Case(
        valid=lambda: {"num_virtual_tokens": 2, "dim": 8, "depth": 2, "num_prefix_tokens": 1},
        accepts={"num_prefix_tokens": [0], "dropout": [0]},
    ),
    "inject_prompt_tuning": Case(
        valid=lambda: {"model": _bert(), "num_virtual_tokens": 2},
        accepts={"tokenizer": [None], "init_token_ids": [None, [1]], "train_head": _BOOL_OK},
    ),
    "inject_visual_prompts": Case(
        valid=lambda: {"model": _vit(), "num_virtual_tokens": 2},
        accepts={"deep": _BOOL_OK, "dropout": [0], "train_head": _BOOL_OK},
    ),
    "remove_prompt_tuning": _model_case(_bert),
    "remove_visual_prompts": _model_case(_vit),
    "FreezeBackbone": Case(
        valid=dict,
        accepts={"freeze": [-1, 0, "bogus", ["bogus"]], "train_bn": _BOOL_OK, "coarse": _BOOL_OK, "module": _MODULE_OK},
    ),
    "HeadOnly": Case(valid=dict, accepts={"train_bn": _BOOL_OK, "module": _MODULE_OK}),
    "HeadThenFull": Case(valid=dict, accepts={"lr_multiplier": _NUMBER_OK, "train_bn": _BOOL_OK, "module": _MODULE_OK}),
    "LayerwiseUnfreezing": Case(valid=dict, accepts={"train_bn": _BOOL_OK, "coarse": _BOOL_OK, "module": _MODULE_OK}),
    "LayerFreezer": _model_case(
        _vit,
        accepts={"layers": [None], "train_bn": _BOOL_OK, "coarse": _BOOL_OK},
    ),
    "freeze_layers": _model_case(
        _vit,
        accepts={"freeze": [-1, 0], "train_bn": _BOOL_OK, "coarse": _BOOL_OK},
    ),
    "describe_layers": _model_case(_vit, accepts={"coarse": _BOOL_OK}),
    "split_layers": _model_case(_vit, accepts={"coarse": _BOOL_OK}),
    "SlimCheckpoint": Case(valid=dict),
    "ForgettingMonitor": Case(
        valid=lambda: {"dataloader": _loader()},
        accepts={
            "metric": [None],
            "base_head": [None],
            "forward_fn": [None],
            "module": _MODULE_OK,
            "num_classes": [None],
            "every_n_epochs": [None],
            "every_n_steps": [None],
            "limit_batches": [None],
            "drift": _BOOL_OK,
            "max_forgetting": [None, 0, 1.5],
            "relative": _BOOL_OK,
            "val_metric": [None, "bogus"],
            "plot": _BOOL_OK,
            "plot_dir": _PATH_OK,
            "prefix": [None, "bogus"],  # None: the default namespace
            "dataloader": ["bogus", ["bogus"], [1]],  # a method name or an iterable of batches, both read at fit time
        },
    ),
    "ReplayCallback": Case(valid=lambda: {"dataloader": _loader()}, accepts={"dataloader": _LOADERS, **_BASE_TASK}),
    "DistillationCallback": Case(valid=dict, accepts={"weight": [1.5], "temperature": [1.5], **_BASE_TASK}),
    "L2SPCallback": Case(
        valid=dict,
        accepts={
            "weight": [1.5],
            "base_head": [None],
            "module": _MODULE_OK,
            "prefix": [None, "bogus"],
            "normalize": _BOOL_OK,
        },
    ),
    "ForgettingBudget": Case(
        valid=lambda: {"dataloader": _loader(), "max_forgetting": 0.1},
        accepts={
            "dataloader": _LOADERS,
            "metric": [None],  # label-free feature drift
            "max_forgetting": [0],
            "num_classes": [None],
            "limit_batches": [None],
            "margin": [0, None],  # None: the margin from the base score's noise
            "replay": [None, *_LOADERS],  # None: the penalty is the strength controlled
            "dense_steps": [None, 0],
            "restore": _BOOL_OK,
            **_BASE_TASK,
        },
    ),
    "EWCCallback": Case(
        valid=lambda: {"dataloader": _loader()},
        accepts={
            "dataloader": _LOADERS,
            "weight": [1.5],
            "fisher_batches": [None],
            "normalize": _BOOL_OK,
            **_BASE_TASK,
        },
    ),
    "ForgettingAwareFinish": Case(
        valid=lambda: {"dataloader": _loader()},
        accepts={
            "dataloader": _LOADERS,
            "max_forgetting": [0],
            "grid": [None],
            "metric": [None],
            "val_dataloader": [None, *_LOADERS],
            "val_forward_fn": [None],
            "limit_batches": [None],
            "plot": _BOOL_OK,
            "plot_dir": _PATH_OK,
            **_BASE_TASK,
        },
    ),
    "MergeCheck": Case(
        valid=dict,
        accepts={
            "new_task": [None, *_LOADERS],
            "base_task": [None, *_LOADERS],
            "tolerance": [0],
            "base_head": [None],
            "limit_batches": [None],
        },
    ),
    "check_artifact": Case(
        valid=lambda: {"adapted": _net(), "artifact": _net(), "tasks": {"t": _loader()}},
        accepts={
            "tolerance": [0],
            "name": ["bogus"],
            "forward_fns": [None, {}],
            "base_heads": [None, {}],
            "module": _MODULE_OK,
            "limit_batches": [None],
            "shards": [None, {}],
        },
    ),
    "save_adapter": Case(
        valid=lambda: {"model": _lora_net(), "directory": _tmpdir()},
        accepts={"directory": _DIRECTORY_OK, "adapter_name": [None], "card_sections": [None, [], ["bogus"]]},
    ),
    "export_peft": Case(
        valid=lambda: {"model": _lora_net(), "directory": _tmpdir()},
        accepts={"directory": _DIRECTORY_OK, "adapter_name": [None], "card_sections": [None, [], ["bogus"]]},
    ),
    "load_adapter": Case(
        valid=lambda: {"model": _net(), "directory": _saved("save_adapter")},
        accepts={"directory": [""], "strict": _BOOL_OK, "adapter_name": [None, "bogus"]},
        also_raises=(FileNotFoundError,),
    ),
    "import_peft": Case(
        valid=lambda: {"model": _net(), "directory": _saved("export_peft")},
        accepts={"directory": [""], "adapter_name": [None, "bogus"]},
        also_raises=(FileNotFoundError,),
    ),
    "load_checkpoint": Case(
        valid=lambda: {"module": _Module(), "checkpoint_path": _checkpoint()},
        accepts={"merged": _BOOL_OK, "map_location": [None, {}], "strict": [None, True], "weights_only": [None, True]},
        also_raises=(FileNotFoundError,),
    ),
    "adapter_names": _model_case(_two_adapters),
    "active_adapters": _model_case(_two_adapters),
    "set_adapter": Case(
        valid=lambda: {"model": _two_adapters(), "adapter_name": "a"}, accepts={"inference_mode": _BOOL_OK}
    ),
    "using_adapter": Case(valid=lambda: {"model": _two_adapters(), "adapter_name": ["a", "b"]}, enter=True),
    "delete_adapter": Case(valid=lambda: {"model": _two_adapters(), "adapter_name": "b"}),
    "merge_adapter": _model_case(_two_adapters, accepts={"adapter_names": [None]}),
    "unmerge_adapter": _model_case(_two_adapters),
    "adapters_per_row": Case(
        valid=lambda: {"model": _two_adapters(), "adapter_names_per_row": ["a", "__base__"]}, enter=True
    ),
    "add_weighted_adapter": Case(
        valid=lambda: {
            "model": _two_adapters(),
            "adapters": ["a", "b"],
            "weights": [0.5, -0.5],
            "adapter_name": "mix",
            "combination_type": "cat",
        },
        accepts={
            "adapter_name": _NAME_OK,
            "svd_rank": [None],
            "svd_clamp": [None, 0],
            "svd_full_matrices": _BOOL_OK,
            "svd_driver": [None],
            "density": [None, 0],
        },
    ),
}


def _vera_projections() -> nn.Module:
    from peft_callbacks.methods.vera import VeRAProjections

    return VeRAProjections(4, 4, 3, seed=0)


def _hf_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(3, 4)


def exported_callables() -> list[str]:
    """Names in ``peft_callbacks.__all__`` that are functions or classes (exception types excluded)."""
    names = []
    for name in peft_callbacks.__all__:
        obj = getattr(peft_callbacks, name)
        if callable(obj) and not (isinstance(obj, type) and issubclass(obj, BaseException)):
            names.append(name)
    return names


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
    with pytest.raises((ValueError, TypeError, *CASES[name].also_raises)) as excinfo:
        _call(name, kwargs)
    message = str(excinfo.value)
    named = [a for a in arguments if re.search(rf"\b{re.escape(a)}\b", message)]
    if isinstance(excinfo.value, CASES[name].also_raises):  # e.g. FileNotFoundError: it names the path instead
        named = [a for a in arguments if str(kwargs[a]) in message]
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
    return [pytest.param(name, id=name) for name in exported_callables() if name in CASES and not CASES[name].abstract]


@pytest.mark.parametrize("name", _single_cases())
def test_valid_arguments_work(name):
    _call(name, CASES[name].valid())


@pytest.mark.parametrize("name", _single_cases())
def test_each_bad_argument_is_refused_by_name(name):
    case = CASES[name]
    checked = 0
    for argument in _arguments(name):
        if argument in case.gaps:
            continue
        accepted = case.accepted(argument)
        for bad in BAD_VALUES:
            if _is_accepted(bad, accepted):
                continue
            kwargs = case.valid()
            kwargs[argument] = bad
            _check_refusal(name, [argument], kwargs)
            checked += 1
    assert checked or not [a for a in _arguments(name) if a not in case.gaps]


def test_random_mixtures_of_bad_arguments():
    seed = int(os.environ.get("PEFT_FUZZ_SEED", "1234"))
    rng = random.Random(seed)
    names = [n for n in exported_callables() if n in CASES and not CASES[n].abstract and _arguments(n)]
    for _ in range(150):
        name = rng.choice(names)
        case = CASES[name]
        arguments = [a for a in _arguments(name) if a not in case.gaps]
        if not arguments:
            continue
        kwargs = case.valid()
        bad_args = rng.sample(arguments, rng.randint(1, min(3, len(arguments))))
        for argument in bad_args:
            choices = [v for v in BAD_VALUES if not _is_accepted(v, case.accepted(argument))]
            kwargs[argument] = rng.choice(choices)
        _check_refusal(name, bad_args, kwargs)


def _gap_cases() -> list:
    return [
        pytest.param(name, argument, id=f"{name}-{argument}")
        for name in exported_callables()
        if name in CASES
        for argument in CASES[name].gaps
    ]


@pytest.mark.parametrize(("name", "argument"), _gap_cases())
def test_known_gaps_are_still_open(name, argument):
    """Each listed gap is real; when it is fixed this fails: remove the entry from ``gaps`` in :data:`CASES`."""
    case = CASES[name]
    assert argument in _arguments(name), f"{name} has no argument {argument!r}: remove it from gaps"
    for bad in BAD_VALUES:
        if _is_accepted(bad, case.accepted(argument)):
            continue
        kwargs = case.valid()
        kwargs[argument] = bad
        try:
            _check_refusal(name, [argument], kwargs)
        except BaseException:  # noqa: BLE001 - any failure is the gap showing
            return
    pytest.fail(f"{name}({argument}=...) now refuses every bad value by name: remove it from CASES[{name!r}].gaps")
