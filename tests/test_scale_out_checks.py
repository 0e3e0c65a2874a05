"""Set-ups known to break under sharding strategies are refused before the first step, each saying what to change.

These run in one CPU process: FSDP1 and DeepSpeed need CUDA in Lightning, so their strategies are built but never
launched; each check is called the way the callbacks call it (the two-process FSDP2 fits are in test_scale_out.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from fsdp2_jobs import LanguageModel, tiny_llama
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from peft_callbacks import (
    FreezeBackbone,
    HeadThenFull,
    LayerwiseUnfreezing,
    LoRACallback,
    LoRAConfig,
    SlimCheckpoint,
    full_parameters,
    gather_state_dict,
    inject,
)
from peft_callbacks.plumbing.strategies import check_sharded_setup, refuse_unbuilt_base, strategy_kind


def fake_trainer(strategy) -> SimpleNamespace:
    return SimpleNamespace(strategy=strategy, callbacks=[], optimizers=[], lr_scheduler_configs=[])


def deepspeed() -> DeepSpeedStrategy:
    return DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # never launched: DeepSpeed is not installed here


def adapted_module() -> LanguageModel:
    module = LanguageModel()
    inject(module.model, LoRAConfig(rank=4))
    return module


def test_fsdp1_without_orig_params_refuses_units_mixing_frozen_and_trainable():
    trainer = fake_trainer(FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=False))
    assert strategy_kind(trainer) == "fsdp"
    with pytest.raises(ValueError, match=r"'model.model.layers.0' mixes frozen and trainable.*use_orig_params=True"):
        check_sharded_setup(trainer, adapted_module(), "LoRACallback")
    # Lightning's default (use_orig_params=True) runs such units
    check_sharded_setup(fake_trainer(FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})), adapted_module(), "x")


def test_fsdp1_refuses_a_unit_with_two_dtypes():
    module = adapted_module()
    module.model.model.layers[1].mlp.to(torch.bfloat16)
    trainer = fake_trainer(FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}))
    with pytest.raises(
        ValueError, match=r"'model.model.layers.1' holds tensors of several dtypes \(bfloat16, float32\)"
    ):
        check_sharded_setup(trainer, module, "LoRACallback")


def test_fsdp1_size_based_policy_is_read_as_fsdp_would_wrap():
    from functools import partial

    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    policy = partial(size_based_auto_wrap_policy, min_num_params=1000)
    trainer = fake_trainer(FSDPStrategy(auto_wrap_policy=policy, use_orig_params=False))
    with pytest.raises(ValueError, match="mixes frozen and trainable"):
        check_sharded_setup(trainer, adapted_module(), "LoRACallback")


@pytest.mark.parametrize("callback", [LayerwiseUnfreezing(), HeadThenFull()], ids=lambda c: type(c).__name__)
def test_deepspeed_refuses_schedules_that_add_param_groups(callback):
    with pytest.raises(ValueError, match=r"DeepSpeed flattens the optimizer's param groups.*use FreezeBackbone"):
        callback.setup(fake_trainer(deepspeed()), LanguageModel(), "fit")


def test_deepspeed_accepts_fixed_freezing():
    FreezeBackbone(freeze=1).setup(fake_trainer(deepspeed()), LanguageModel(), "fit")


def test_lora_variants_that_cannot_follow_the_strategy_are_refused():
    with pytest.raises(ValueError, match=r"loraplus_lr_ratio=16.*loraplus_param_groups\(self, lr, ratio=16\)"):
        LoRACallback(loraplus_lr_ratio=16).setup(fake_trainer(deepspeed()), LanguageModel(), "fit")
    with pytest.raises(ValueError, match=r"lora_pro=True.*FSDPStrategy keeps sharded"):
        LoRACallback(lora_pro=True).setup(fake_trainer(FSDPStrategy()), LanguageModel(), "fit")


@pytest.mark.parametrize(
    ("strategy", "match"),
    [
        (FSDPStrategy(), "does not support FSDPStrategy.*ModelParallelStrategy"),
        (deepspeed(), "does not support DeepSpeedStrategy"),
        (ModelParallelStrategy(save_distributed_checkpoint=False), r"save_distributed_checkpoint=True"),
    ],
    ids=["fsdp1", "deepspeed", "fsdp2-full-checkpoint"],
)
def test_slim_checkpoint_refuses_checkpoint_formats_it_cannot_slim(strategy, match):
    with pytest.raises(ValueError, match=match):
        SlimCheckpoint().setup(fake_trainer(strategy), LanguageModel(), "fit")


def test_a_base_without_values_is_refused():
    with torch.device("meta"):
        on_meta = tiny_llama()
    with pytest.raises(ValueError, match=r"meta device after `configure_model`.*LoRA's B would not start at zero"):
        refuse_unbuilt_base(fake_trainer(ModelParallelStrategy()), on_meta, "LoRACallback")
    partitioned = nn.Linear(4, 4)
    partitioned.weight.ds_id, partitioned.weight.ds_shape = 0, (4, 4)  # what ZeRO-3 leaves on a parameter
    with pytest.raises(ValueError, match=r"ZeRO-3.*Build the model in `__init__`"):
        refuse_unbuilt_base(fake_trainer(deepspeed()), partitioned, "LoRACallback")


def test_gathering_helpers_leave_unsharded_models_as_they_are():
    net = inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LoRAConfig(rank=2))
    weight = net[0].base_layer.weight
    with full_parameters(net, writeback=True):
        assert net[0].base_layer.weight is weight
    state = gather_state_dict(net)
    assert sorted(state) == sorted(net.state_dict()) and state["0.base_layer.weight"] is not None
