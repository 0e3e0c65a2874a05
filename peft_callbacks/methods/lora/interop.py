"""LoRA in HF PEFT's directory format: the config fields, and the tensors where they are not one-to-one.

* Plain LoRA / DoRA: PEFT's keys (``lora_A.weight``, ``lora_magnitude_vector.weight``) and shapes.
* PiSSA / OLoRA: written as PEFT writes them (``init_lora_weights: "pissa"``, only ``lora_A`` / ``lora_B``): PEFT
  recomputes the decomposition of the original base when it loads them, as it does for its own files. A randomised
  SVD (``pissa_niter_<K>``) cannot be recomputed, nor can factors from data (``corda``, ``lora_ga``), so these are
  written as the plain rank-``2r`` LoRA that applies to the original base (``[B, −B₀]·[A; A₀]``, alpha and
  ``alpha_pattern`` doubled or ×√2 with rsLoRA, ``rank_pattern`` doubled), which is PEFT's own conversion
  (``path_initial_model_for_weight_conversion``). Importing a PiSSA/OLoRA directory decomposes the fresh base here.
* LoftQ: a plain LoRA on a quantized base; written with ``init_lora_weights: true`` (PEFT loads it onto its LoftQ
  base), and PEFT's ``"loftq"`` files are read as plain LoRA, with a warning naming the base they need.
  PEFT's unconverted CorDA / LoRA-GA files are refused: their factors belong to a residual base PEFT did not save.
* LoRA on parameters: PEFT nests one wrapper per targeted parameter of a module, the first parameter (in the module's
  order) innermost: ``experts.base_layer.lora_A.weight`` (``gate_up_proj``), ``experts.lora_A.weight``
  (``down_proj``); the config lists ``target_parameters``.

Example::

    >>> _peft_init("pissa"), _peft_init("default"), _our_init(True), _our_init("olora")
    ('pissa', True, 'default', 'olora')
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks.engine import AdaptedLayer
from peft_callbacks.methods.lora.config import LoRAConfig
from peft_callbacks.methods.lora.embedding import LoRAEmbedding, drop_saved_embedding
from peft_callbacks.methods.lora.init import DATA_INITS, ResidualLoRAAdapter, is_residual_init
from peft_callbacks.methods.lora.layers import LoRAConv1D
from peft_callbacks.methods.lora.mha import (
    PEFT_OUT_PROJ_FIXED,
    LoRAMultiheadAttention,
    attention_from_peft,
    attention_to_peft,
    peft_out_proj_factor,
)
from peft_callbacks.methods.lora.params import ParameterLoRA
from peft_callbacks.methods.lora.tokens import TrainableTokens, resolve_token_layers, tokens_from_peft, tokens_to_peft

log = logging.getLogger(__name__)

__all__ = ["KEYS", "export_layer", "from_peft", "import_layer", "peft_targets", "to_peft"]

KEYS = {"lora_magnitude_vector": "lora_magnitude_vector.weight"}

_UNSUPPORTED_PEFT = (
    "layer_replication",
    "use_qalora",
    "alora_invocation_tokens",
)


def _converted(config: LoRAConfig) -> bool:
    """Is the adapter written as a plain rank-2r LoRA (a randomised SVD, or factors from data, PEFT cannot redo)?"""
    return config.init.startswith("pissa_niter_") or config.init in DATA_INITS


def _peft_init(init: str) -> bool | str:
    return True if init in ("default", "loftq") else init  # LoftQ: a plain LoRA on the quantized base (no re-init)


def _our_init(value: Any) -> str:
    if value is True or value is False or value is None:
        return "default"  # False (random B) only matters before the tensors are loaded
    if (
        isinstance(value, str)
        and (value in ("gaussian", "orthogonal") or is_residual_init(value))
        and value not in DATA_INITS
    ):
        return value
    if value == "eva":  # EVA's A is data: the file holds it, and its ranks in rank_pattern; no base change
        return "default"
    if value == "loftq":  # a plain LoRA, but on PEFT's LoftQ base: the weights LoftQ quantized, not the originals
        log.warning(
            "init_lora_weights='loftq': this adapter was trained on PEFT's LoftQ base (each target's weight replaced "
            "by its LoftQ-quantized one); load it onto that base: PEFT's saved base model, or "
            "loftq_quantize(original_model, config, adapter=False) (peft_callbacks.methods.lora.loftq)."
        )
        return "default"
    if value in DATA_INITS:  # PEFT saved factors for a residual base it did not save
        raise ValueError(
            f"init_lora_weights={value!r}: PEFT saved these factors for the residual base W - s*B0*A0 it computed from "
            f"data and did not save, so they cannot be applied to the original base. Save the adapter in PEFT with "
            f"`save_pretrained(..., path_initial_model_for_weight_conversion=<the initial adapter>)`, which writes a "
            f"plain LoRA for the original base (it imports here), or start it here with init={value!r}."
        )
    raise ValueError(
        f"init_lora_weights={value!r} is not supported here (peft_callbacks imports 'gaussian', 'pissa', "
        f"'pissa_niter_<K>', 'olora', 'orthogonal', 'eva' and 'loftq', and 'corda' / 'lora_ga' adapters PEFT saved "
        f"converted; others change the base in ways it does not record)"
    )


def to_peft(config: LoRAConfig, layers: dict[str, AdaptedLayer]) -> dict[str, Any]:
    """The LoRA fields of ``adapter_config.json``."""
    adapters = [a for layer in layers.values() for a in layer.adapters.values() if a.config == config]
    not_modules = (ParameterLoRA, TrainableTokens)  # PEFT lists these under target_parameters / trainable_token_indices
    modules = [p for p, layer in layers.items() if not any(isinstance(a, not_modules) for a in layer.adapters.values())]
    parameters = [
        f"{p}.{n}"
        for p, layer in layers.items()
        for a in adapters
        if a in layer.adapters.values()
        for n in (a.parameter_names if isinstance(a, ParameterLoRA) else ())
    ]
    r, alpha, init = config.rank, config.alpha, _peft_init(config.init)
    rank_pattern, alpha_pattern = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    if _converted(config):  # [B, −B₀]·[A; A₀]: twice the rank, and the alpha that keeps each layer's scaling
        factor = math.sqrt(2) if config.use_rslora else 2
        r, alpha, init = 2 * r, alpha * factor, True
        rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
        alpha_pattern = {k: v * factor for k, v in alpha_pattern.items()}
    attention = any(isinstance(a, LoRAMultiheadAttention) for a in adapters)
    return {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": any(isinstance(a, LoRAConv1D) for a in adapters),
        "bias": config.bias,
        "lora_bias": config.lora_bias,
        "init_lora_weights": init,
        "target_modules": modules,  # [] (not None) when only parameters: PEFT would add its default modules
        "target_parameters": parameters or None,
        "rank_pattern": rank_pattern,  # exact layer paths, longest first: PEFT reads them back
        "alpha_pattern": alpha_pattern,
        "trainable_token_indices": config.trainable_token_indices,
        **({"peft_version": PEFT_OUT_PROJ_FIXED} if attention else {}),  # out_proj's update applied once
    }


def from_peft(peft_config: dict[str, Any]) -> LoRAConfig:
    """Our config for a PEFT ``LoraConfig`` (``ValueError`` for options we do not support)."""
    used = [name for name in _UNSUPPORTED_PEFT if peft_config.get(name)]
    if used:
        raise ValueError(f"uses PEFT LoRA options that peft_callbacks does not support: {', '.join(used)}")
    return LoRAConfig(
        rank=peft_config.get("r"),
        alpha=peft_config.get("lora_alpha"),
        dropout=peft_config.get("lora_dropout") or 0.0,
        use_rslora=bool(peft_config.get("use_rslora", False)),
        use_dora=bool(peft_config.get("use_dora", False)),
        init=_our_init(peft_config.get("init_lora_weights", True)),
        rank_pattern=peft_config.get("rank_pattern") or None,
        alpha_pattern=peft_config.get("alpha_pattern") or None,
        bias=peft_config.get("bias", "none"),
        lora_bias=bool(peft_config.get("lora_bias", False)),
        trainable_token_indices=peft_config.get("trainable_token_indices"),
        train_head=False,
    )


def _nesting(adapter: ParameterLoRA, index: int) -> str:
    """PEFT's key prefix for the ``index``-th targeted parameter of a module: the first is innermost."""
    return "base_layer." * (len(adapter.parameter_names) - 1 - index)


def export_layer(path: str, adapter: nn.Module) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's keys."""
    if isinstance(adapter, ParameterLoRA):
        return {
            f"{_nesting(adapter, i)}{factor}.weight": getattr(adapter, factor)[name].weight
            for i, name in enumerate(adapter.parameter_names)
            for factor in ("lora_A", "lora_B")
        }
    if isinstance(adapter, ResidualLoRAAdapter):
        if _converted(adapter.config):
            lora_A = torch.cat([adapter.lora_A.weight, adapter.lora_A_init], dim=0)  # (2r, …)
            lora_B = torch.cat([adapter.lora_B.weight, -adapter.lora_B_init], dim=1)  # (out, 2r, …)
            return {"lora_A.weight": lora_A, "lora_B.weight": lora_B}
        return {"lora_A.weight": adapter.lora_A.weight, "lora_B.weight": adapter.lora_B.weight}
    if isinstance(adapter, LoRAMultiheadAttention):
        return attention_to_peft(adapter)
    if isinstance(adapter, TrainableTokens):
        return tokens_to_peft(adapter)
    return {KEYS.get(key, key): tensor for key, tensor in adapter.state_dict().items()}


def import_layer(
    peft_config: dict[str, Any], path: str, adapter: nn.Module, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """PEFT's tensors of one layer under our keys (unknown keys are passed on, for the caller to report)."""
    if isinstance(adapter, ParameterLoRA):
        out, used = {}, set()
        for i, name in enumerate(adapter.parameter_names):
            for factor in ("lora_A", "lora_B"):
                key = f"{_nesting(adapter, i)}{factor}.weight"
                if key in tensors:
                    out[f"{factor}.{name}.weight"] = tensors[key]
                    used.add(key)
        return {**out, **{k: t for k, t in tensors.items() if k not in used}}
    if isinstance(adapter, LoRAEmbedding):
        tensors = drop_saved_embedding(adapter, tensors)
    if isinstance(adapter, LoRAMultiheadAttention):
        return attention_from_peft(tensors, peft_out_proj_factor(peft_config))
    if isinstance(adapter, TrainableTokens):
        return tokens_from_peft(tensors)
    inverse = {theirs: ours for ours, theirs in KEYS.items()}
    out = {inverse.get(k, k): t for k, t in tensors.items()}
    if isinstance(adapter, ResidualLoRAAdapter):  # B₀, A₀ of the fresh base, decomposed at injection as PEFT does
        out.setdefault("lora_A_init", adapter.lora_A_init)
        out.setdefault("lora_B_init", adapter.lora_B_init)
    return out


def peft_targets(model: nn.Module, peft_config: dict[str, Any], paths: list[str]) -> list[str]:
    """Our targets for the modules holding tensors in a PEFT file: their parameters where ``target_parameters``
    names them (PEFT's rule: the parameter's path equals a name or ends with ``"." + name``), else the module."""
    names = peft_config.get("target_parameters") or []
    if isinstance(names, str):
        raise ValueError("target_parameters must be a list of parameter names (PEFT does not take a string).")
    tokens = peft_config.get("trainable_token_indices")
    tokens = resolve_token_layers(model, tokens) if tokens else {}  # their tensors are rows, not LoRA factors
    targets = []
    for path in [p for p in paths if p not in tokens]:
        module = model.get_submodule(path)
        own = [
            f"{path}.{n}"
            for n, _ in module.named_parameters(recurse=False)
            if any(f"{path}.{n}" == t or f"{path}.{n}".endswith(f".{t}") for t in names)
        ]
        targets.extend(own or [path])
    return targets
