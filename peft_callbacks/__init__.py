"""peft_callbacks: parameter-efficient fine-tuning for PyTorch Lightning, as model surgery done by callbacks.

Add one callback to an unchanged LightningModule that wraps a timm or Hugging Face model::

    trainer = Trainer(callbacks=[LoRACallback(rank=8)])

The surgery itself (``inject_lora``, ``inject(model, config)``, ``merge``, ``count_parameters``, …) is plain PyTorch
and works without a Trainer. Names are imported when first used, so ``from peft_callbacks import inject_lora`` does
not import Lightning; the callbacks do.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_callbacks._version import __version__  # noqa: F401  (peft_callbacks.__version__)


def _lazy_exports() -> dict[str, str]:
    """``{name: module}`` of the ``TYPE_CHECKING`` imports below: one list of what the package exports, read once."""
    tree = ast.parse(Path(__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    return {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}


_EXPORTS = _lazy_exports()

__all__ = [
    "AdaLoRA",
    "AdaLoRACallback",
    "AdaLoRAConfig",
    "AdaptedLayer",
    "Adapter",
    "AdapterCallback",
    "AdapterFileError",
    "BottleneckAdapter",
    "BottleneckConfig",
    "CorDAOptions",
    "DistillationCallback",
    "DistributedCheckError",
    "DoRAAdapter",
    "DoRAConv",
    "DoRAConv1D",
    "DoRALinear",
    "EVAOptions",
    "EWCCallback",
    "ForgettingAwareFinish",
    "ForgettingBudget",
    "ForgettingMonitor",
    "FreezeBackbone",
    "HeadOnly",
    "HeadThenFull",
    "IA3",
    "IA3Callback",
    "IA3Config",
    "L2SPCallback",
    "LayerFreezer",
    "LayerwiseUnfreezing",
    "LoHaAdapter",
    "LoHaCallback",
    "LoHaConfig",
    "LoHaConv",
    "LoHaConv1D",
    "LoHaLinear",
    "LoKrAdapter",
    "LoKrCallback",
    "LoKrConfig",
    "LoKrConv",
    "LoKrConv1D",
    "LoKrLinear",
    "LoRAAdapter",
    "LoRACallback",
    "LoRAConfig",
    "LoRAConv",
    "LoRAConv1D",
    "LoRAGAOptions",
    "LoRALinear",
    "LoRAProAdamW",
    "LoftQOptions",
    "MergeCheck",
    "MethodConfig",
    "OFTAdapter",
    "OFTCallback",
    "OFTConfig",
    "OFTConv",
    "OFTConv1D",
    "OFTLinear",
    "PEFTCallback",
    "ParameterCount",
    "ParameterLoRA",
    "PromptTuningCallback",
    "PromptTuningConfig",
    "RankAllocator",
    "ReplayCallback",
    "SlimCheckpoint",
    "SoftPrompt",
    "VeRA",
    "VeRACallback",
    "VeRAConfig",
    "VisualPromptCallback",
    "VisualPromptConfig",
    "VisualPrompts",
    "active_adapters",
    "adapter_layers",
    "adapter_names",
    "adapters_per_row",
    "add_weighted_adapter",
    "apply_lora_pro",
    "check_artifact",
    "corda_init",
    "count_parameters",
    "delete_adapter",
    "describe_layers",
    "disabled",
    "estimate_memory",
    "eva_init",
    "export_peft",
    "find_models",
    "freeze_batchnorm_stats",
    "freeze_layers",
    "full_parameters",
    "gather_state_dict",
    "import_peft",
    "inject",
    "inject_adapters",
    "inject_lora",
    "inject_prompt_tuning",
    "inject_visual_prompts",
    "load_adapter",
    "load_checkpoint",
    "loftq_init",
    "loftq_quantize",
    "lora_disabled",
    "lora_ga_init",
    "lora_layers",
    "loraplus_param_groups",
    "memory_table",
    "merge",
    "merge_adapter",
    "merge_lora",
    "prepare_quantized_base",
    "registered_methods",
    "remove_adapters",
    "remove_prompt_tuning",
    "remove_visual_prompts",
    "requantization_error",
    "save_adapter",
    "scaled",
    "set_adapter",
    "split_layers",
    "unload",
    "unload_lora",
    "unmerge_adapter",
    "using_adapter",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'peft_callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from peft_callbacks.callbacks import (  # importing one callback imports the package: all of them
        AdaLoRACallback,
        AdapterCallback,
        DistillationCallback,
        EWCCallback,
        ForgettingAwareFinish,
        ForgettingBudget,
        ForgettingMonitor,
        FreezeBackbone,
        HeadOnly,
        HeadThenFull,
        IA3Callback,
        L2SPCallback,
        LayerwiseUnfreezing,
        LoHaCallback,
        LoKrCallback,
        LoRACallback,
        MergeCheck,
        OFTCallback,
        PEFTCallback,
        PromptTuningCallback,
        ReplayCallback,
        SlimCheckpoint,
        VeRACallback,
        VisualPromptCallback,
    )
    from peft_callbacks.core.distributed_checks import DistributedCheckError
    from peft_callbacks.core.memory import estimate_memory, memory_table
    from peft_callbacks.core.models import find_models
    from peft_callbacks.core.params import ParameterCount, count_parameters, freeze_batchnorm_stats
    from peft_callbacks.core.quantized import prepare_quantized_base
    from peft_callbacks.core.sharding import full_parameters, gather_state_dict
    from peft_callbacks.engine import (
        AdaptedLayer,
        Adapter,
        MethodConfig,
        disabled,
        inject,
        merge,
        registered_methods,
        requantization_error,
        scaled,
        unload,
    )
    from peft_callbacks.engine.adapters import (
        active_adapters,
        adapter_names,
        delete_adapter,
        merge_adapter,
        set_adapter,
        unmerge_adapter,
        using_adapter,
    )
    from peft_callbacks.engine.mixed import adapters_per_row
    from peft_callbacks.forgetting.verify import check_artifact
    from peft_callbacks.freezing import LayerFreezer, describe_layers, freeze_layers, split_layers
    from peft_callbacks.io import AdapterFileError, export_peft, import_peft, load_adapter, save_adapter
    from peft_callbacks.methods.adalora import AdaLoRA, AdaLoRAConfig, RankAllocator
    from peft_callbacks.methods.bottleneck import (
        BottleneckAdapter,
        BottleneckConfig,
        adapter_layers,
        inject_adapters,
        remove_adapters,
    )
    from peft_callbacks.methods.ia3 import IA3, IA3Config
    from peft_callbacks.methods.loha import LoHaAdapter, LoHaConfig, LoHaConv, LoHaConv1D, LoHaLinear
    from peft_callbacks.methods.lokr import LoKrAdapter, LoKrConfig, LoKrConv, LoKrConv1D, LoKrLinear
    from peft_callbacks.methods.lora import (
        DoRAAdapter,
        DoRAConv,
        DoRAConv1D,
        DoRALinear,
        LoRAAdapter,
        LoRAConfig,
        LoRAConv,
        LoRAConv1D,
        LoRALinear,
        LoRAProAdamW,
        ParameterLoRA,
        add_weighted_adapter,
        apply_lora_pro,
        inject_lora,
        lora_disabled,
        lora_layers,
        loraplus_param_groups,
        merge_lora,
        unload_lora,
    )
    from peft_callbacks.methods.lora.corda import CorDAOptions, corda_init
    from peft_callbacks.methods.lora.eva import EVAOptions, eva_init
    from peft_callbacks.methods.lora.loftq import LoftQOptions, loftq_init, loftq_quantize
    from peft_callbacks.methods.lora.loraga import LoRAGAOptions, lora_ga_init
    from peft_callbacks.methods.oft import OFTAdapter, OFTConfig, OFTConv, OFTConv1D, OFTLinear
    from peft_callbacks.methods.prompts import (
        PromptTuningConfig,
        SoftPrompt,
        VisualPromptConfig,
        VisualPrompts,
        inject_prompt_tuning,
        inject_visual_prompts,
        remove_prompt_tuning,
        remove_visual_prompts,
    )
    from peft_callbacks.methods.vera import VeRA, VeRAConfig
    from peft_callbacks.plumbing.checkpoint_hooks import load_checkpoint
