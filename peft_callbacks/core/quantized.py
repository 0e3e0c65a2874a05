r"""Quantized base layers (bitsandbytes): how surgery recognises them, reads their weight and rebuilds them.

==================  ===========================================================================================
kind                layers
==================  ===========================================================================================
``"linear_4bit"``   ``bitsandbytes.nn.Linear4bit`` (NF4 or FP4, with or without double quantization; also
                    ``LinearNF4``/``LinearFP4`` and Lightning's ``BitsandbytesPrecision`` layers, its subclasses)
``"linear_8bit"``   ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8())
==================  ===========================================================================================

Both compute ``x·Wᵀ + b`` with a weight stored in a few bits. Surgery never changes that storage: an adapter adds its
update to the quantized layer's *output* (QLoRA, Dettmers et al. 2023, §3), and everything that needs the weight's
values (DoRA's norm, merging, fingerprints) reads :func:`dequantize`, the ``(out, in)`` floating-point weight the
layer computes with. Writing a merged weight back into 4 or 8 bits would round most of a small update away, so it is
never done silently (:func:`~peft_callbacks.core.kinds.write_weight` refuses; see :func:`requantized`).

bitsandbytes is never imported here unless it already is: a quantized layer cannot exist without it, and a model
without one must not pay for the import. Functions that need it (re-quantizing) call :func:`require_bitsandbytes`,
whose error names the extra to install.

One trait of bitsandbytes on CPU is switched off for every model that carries surgery (:func:`prepare_quantized_base`):
in eval mode without gradients, ``Linear4bit`` rewrites its weight into a layout for AVX512-BF16 kernels with its
scales rounded to bfloat16, and rewrites it back, not bit-identically, when the state dict is read. The frozen base
would then change under an evaluation loop, and outputs move by the rounding of the scales.

Example::

    >>> import torch.nn as nn
    >>> quantized_kind(nn.Linear(4, 2)) is None  # a plain layer; bitsandbytes is not needed to ask
    True
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType

import torch
import torch.nn as nn

from peft_callbacks.core.sharding import is_dtensor

__all__ = [
    "INSTALL_HINT",
    "dequantize",
    "forget_quantization",
    "holds_quantized",
    "is_quantized",
    "load_quantized_states",
    "plain_linear",
    "prepare_quantized_base",
    "quantization_label",
    "quantized_kind",
    "quantized_layers",
    "require_bitsandbytes",
    "requantized",
    "round_trip",
    "sharded_statistics",
    "stores_quantized",
    "weight_shape",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'peft-callbacks[quant]'"


def _bnb_nn() -> ModuleType | None:
    """``bitsandbytes.nn`` if bitsandbytes is already imported (never imports it)."""
    return sys.modules.get("bitsandbytes.nn")


def require_bitsandbytes(purpose: str) -> ModuleType:
    """Import bitsandbytes, or raise an ``ImportError`` that says which extra installs it.

    Args:
        purpose: what needs it, completing "bitsandbytes is needed to …".

    Example::

        >>> import pytest
        >>> _ = pytest.importorskip("bitsandbytes")  # the example needs it installed
        >>> require_bitsandbytes("re-quantize merged weights").__name__
        'bitsandbytes'
    """
    try:
        return importlib.import_module("bitsandbytes")
    except Exception as err:  # a missing package, or one whose native library fails to load
        raise ImportError(
            f"bitsandbytes is needed to {purpose}, but it cannot be imported ({type(err).__name__}: {err}). "
            f"Install the `quant` extra: {INSTALL_HINT}."
        ) from err


def quantized_kind(module: nn.Module) -> str | None:
    """``"linear_4bit"``, ``"linear_8bit"`` for bitsandbytes layers, else ``None`` (see the module docstring)."""
    bnb_nn = _bnb_nn()
    if bnb_nn is None:
        return None
    if isinstance(module, bnb_nn.Linear4bit):
        return "linear_4bit"
    if isinstance(module, bnb_nn.Linear8bitLt):
        return "linear_8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    """Is ``module`` a bitsandbytes layer that surgery reads through :func:`dequantize`?"""
    return quantized_kind(module) is not None


def stores_quantized(layer: nn.Module) -> bool:
    """Is the weight of ``layer`` held in 4 or 8 bits now? (Lightning's plugin quantizes on the first ``.to()``.)"""
    kind = quantized_kind(layer)
    if kind == "linear_4bit":  # FSDP2 shards the packed bits as a DTensor; the state stays on the layer
        return bool(getattr(layer.weight, "bnb_quantized", False)) or _sharded_4bit(layer)
    return kind == "linear_8bit" and layer.weight.dtype == torch.int8


def sharded_statistics(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The quantization statistics a 4-bit layer's ``state_dict`` holds beside its weight (``absmax``, …, keyed as
    after ``"weight."``) when FSDP2 shards its weight: the sharded layer's own ``state_dict`` leaves them out (its
    weight no longer carries them), so a sharded model can describe itself as the same model on one process does.
    Empty for any other layer.

    Example::

        >>> sharded_statistics(nn.Linear(2, 2))
        {}
    """
    if not _sharded_4bit(layer):
        return {}
    return layer.quant_state.as_dict(packed=True)


def _sharded_4bit(layer: nn.Module) -> bool:
    """Is this 4-bit layer's packed weight held outside bitsandbytes' ``Params4bit`` with its quantization state on
    the layer: sharded by FSDP2 (a ``DTensor``), or gathered from such shards (``full_parameters``)?"""
    return not hasattr(layer.weight, "bnb_quantized") and getattr(layer, "quant_state", None) is not None


def quantization_label(layer: nn.Module) -> str:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` (the stored format, for messages and fingerprints).

    Example::

        >>> import torch.nn as nn
        >>> quantization_label(nn.Linear(2, 2))
        'float32'
    """
    kind = quantized_kind(layer)
    if kind == "linear_4bit":  # the parameter knows it; a copy on `meta` (dry runs) only the layer's own state
        state = getattr(layer, "quant_state", None)
        return str(getattr(layer.weight, "quant_type", None) or getattr(state, "quant_type", None) or "4-bit")
    if kind == "linear_8bit":
        return "int8"
    return str(layer.weight.dtype).removeprefix("torch.")


def weight_shape(layer: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)``: the logical shape of a quantized layer's weight (its storage is packed)."""
    return (layer.out_features, layer.in_features)


def _unpack_cpu_layout(layer: nn.Module) -> bool:
    """Undo bitsandbytes' AVX512-BF16 CPU layout of a ``Linear4bit`` weight, as its own state-dict code does."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return False
    functional = sys.modules["bitsandbytes.functional"]
    weight.data, state = functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not state.nested and state.absmax.dim() == 2:  # bitsandbytes (0.50) restores nested scales only: the others
        state.absmax = state.absmax.T.reshape(-1).float()  # stay (in/block, out) and would scale the wrong blocks
    weight.quant_state = layer.quant_state = state
    return True


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` floating-point weight a bitsandbytes layer computes with.

    4-bit layers give the dtype their weight was quantized from (``quant_state.dtype``), 8-bit layers float32. A
    weight not quantized yet (Lightning's plugin before its first ``.to()``) is returned as it is; on ``meta`` an
    empty tensor of the logical shape. A 4-bit weight sharded by FSDP2 is gathered first: every rank must call it.
    """
    weight = layer.weight
    if weight.device.type == "meta":
        return torch.empty(weight_shape(layer), device="meta")
    if not stores_quantized(layer):
        return weight.detach()
    functional = sys.modules["bitsandbytes.functional"]
    with torch.no_grad():
        if _sharded_4bit(layer):  # the packed bits, gathered from every rank if still sharded (a collective)
            packed = weight.full_tensor() if is_dtensor(weight) else weight
            return functional.dequantize_4bit(packed, layer.quant_state)
        if quantized_kind(layer) == "linear_4bit":
            _unpack_cpu_layout(layer)
            return functional.dequantize_4bit(weight.data, weight.quant_state)
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB  # moved at 1st forward
        return functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: layer}`` of every bitsandbytes layer inside ``model`` (wrapped ones under ``….base_layer``)."""
    if _bnb_nn() is None:
        return {}
    return {path: m for path, m in model.named_modules() if is_quantized(m)}


def holds_quantized(model: nn.Module) -> bool:
    """Does ``model`` hold bitsandbytes layers, or say it was loaded quantized by bitsandbytes (transformers)?"""
    return bool(quantized_layers(model)) or _declares_bitsandbytes(model)


def _declares_bitsandbytes(model: nn.Module) -> bool:
    """Does a transformers model say it was loaded quantized by bitsandbytes?"""
    for m in model.modules():
        config = getattr(getattr(m, "config", None), "quantization_config", None)
        method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
        if str(getattr(method, "value", method)) == "bitsandbytes":
            return True
    return False


def _own_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of ``model`` outside its quantized layers and outside inserted PEFT modules (their
    wrapped base layers are the model's own again)."""
    from peft_callbacks.core.modules import PEFTModule

    out: dict[str, nn.Parameter] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if is_quantized(module):
            return
        if not isinstance(module, PEFTModule):
            out.update({prefix + n: p for n, p in module.named_parameters(recurse=False)})
        for name, child in module.named_children():
            if not isinstance(module, PEFTModule) or name == "base_layer":
                visit(child, f"{prefix}{name}.")

    visit(model, "")
    return out


def prepare_quantized_base(model: nn.Module) -> list[str]:
    """Make a quantized base ready to train adapters on, as HF PEFT's ``prepare_model_for_kbit_training`` does.

    Surgery calls this itself on every model that holds bitsandbytes layers (``inject``, the callbacks, adapter
    files); calling it again changes nothing. It

    * puts every float16/bfloat16 parameter that is not quantized in float32 (layer norms, embeddings, the LM
      head), as PEFT does: half-precision norms hurt training, and a float32 norm makes the activations after it
      float32, which a half-precision layer downstream (the LM head) would refuse. Quantized layers, and adapters
      (whose dtype ``adapter_dtype`` sets), keep theirs;
    * keeps bitsandbytes' 4-bit weights in their standard layout on CPU (see the module docstring), so the frozen
      base stays bit-identical through evaluation loops and state-dict reads.

    The rest of what PEFT's function does is already part of every surgery: the base is frozen, and adapters inside
    reentrant-checkpointed blocks get gradients (``enable_input_grads_for_checkpointing``). Gradient checkpointing
    itself is left as the user set it (PEFT switches it on); call ``model.gradient_checkpointing_enable()`` to trade
    compute for activation memory.

    Args:
        model: any module; only its bitsandbytes layers and normalisation layers are touched.

    Returns:
        The names of the parameters put in float32.

    Raises:
        ImportError: ``model`` says it was quantized by bitsandbytes (a transformers ``quantization_config``), but
            bitsandbytes cannot be imported; the message names the extra to install.

    Example::

        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)).to(torch.bfloat16)
        >>> prepare_quantized_base(net), net[1].weight.dtype
        (['0.weight', '1.weight', '1.bias'], torch.float32)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if _declares_bitsandbytes(model) and _bnb_nn() is None:
        require_bitsandbytes(f"adapt {type(model).__name__}, which was loaded quantized by bitsandbytes")
    for layer in quantized_layers(model).values():
        if quantized_kind(layer) == "linear_4bit":
            if _unpack_cpu_layout(layer):
                log.info(
                    "A 4-bit layer of %s was in bitsandbytes' CPU layout; it is back in the standard one.",
                    type(model).__name__,
                )
            layer.support_avx512bf16_for_cpu = False
    upcast = []
    for name, p in _own_parameters(model).items():
        if is_dtensor(p):
            continue  # sharded already (FSDP2): its dtype is the sharding's (FSDP2's MixedPrecisionPolicy sets it)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            upcast.append(name)
    return upcast


def plain_linear(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` in ``dtype`` holding ``weight`` and ``bias``, on ``weight``'s device, frozen like the base."""
    out_features, in_features = weight.shape
    plain = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    plain.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().to(weight.device, dtype), requires_grad=layer.bias.requires_grad)
    return plain.train(layer.training)


def _quantize(layer: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    """A new weight parameter for ``layer`` holding ``weight`` quantized as the layer's own weight is."""
    bnb = require_bitsandbytes("re-quantize merged weights")
    old = layer.weight
    if quantized_kind(layer) == "linear_4bit":
        data = weight.to("cpu", old.quant_state.dtype)
        new = bnb.nn.Params4bit(
            data,
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=layer,
        )
        return new.to(old.device)
    return bnb.nn.Int8Params(weight.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False).to(
        old.device
    )


def round_trip(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized as ``layer`` stores its own, then dequantized: what re-quantizing would keep of it.

    Nothing in ``layer`` changes.
    """
    bnb = require_bitsandbytes("measure the error of re-quantizing merged weights")
    functional = bnb.functional
    old = layer.weight
    with torch.no_grad():
        if quantized_kind(layer) == "linear_4bit":
            data = weight.to(old.device, old.quant_state.dtype)
            packed, state = functional.quantize_4bit(
                data,
                blocksize=old.blocksize,
                compress_statistics=old.compress_statistics,
                quant_type=old.quant_type,
                quant_storage=old.quant_storage,
            )
            return functional.dequantize_4bit(packed, state).float()
        rows, scales, _ = functional.int8_vectorwise_quant(weight.to(old.device, torch.float16))
        return functional.int8_vectorwise_dequant(rows, scales).float()


def requantized(layer: nn.Module, weight: torch.Tensor) -> None:
    """Store ``weight`` (floating point, ``(out, in)``) in ``layer`` quantized as before: same format, block size,
    double quantization and storage type. Lossy: the values kept are :func:`round_trip`'s."""
    new = _quantize(layer, weight)
    layer.weight = new
    if quantized_kind(layer) == "linear_4bit":
        layer.quant_state = new.quant_state
    else:  # LLM.int8() moves the row scales into the layer's state at the first forward; start afresh
        layer.state.CB = None
        layer.state.SCB = None


def load_quantized_states(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Make ``state_dict``'s quantized layers loadable into ``model``: the 4-bit statistics taken out of it (in place)
    and put into the layers, the 8-bit scales given a place to load into.

    A ``Linear4bit`` writes its packed weight under ``<path>.weight`` and its statistics beside it
    (``<path>.weight.absmax``, ``.quant_map``, ``.nested_absmax``, ``.quant_state.bitsandbytes__nf4``, …), but its
    ``load_state_dict`` reads back only the packed weight: a model's own state dict fails to load ("Unexpected
    key(s) … absmax"). Here each such layer gets a weight rebuilt from the stored packed data and statistics
    (bitsandbytes' ``Params4bit.from_prequantized``, on the layer's device), so what was saved is what is loaded,
    scales included; the statistics' keys are removed and ``<path>.weight`` stays, for the load that follows to copy
    onto the rebuilt weight (the same values). 8-bit layers load their row scales (``SCB``) themselves, but only
    while the weight holds them: after a first forward they sit in the layer's state, and bitsandbytes refuses the
    load ("Loading a quantized checkpoint into non-quantized Linear8bitLt"); they are handed back to the weight.

    Args:
        model: the module ``state_dict`` is for (the keys are relative to it).
        state_dict: a state dict of ``model`` as ``model.state_dict()`` writes it.

    Returns:
        The paths of the 4-bit layers whose statistics were loaded.
    """
    loaded = []
    for path, layer in quantized_layers(model).items():
        if quantized_kind(layer) == "linear_8bit":
            _scales_on_weight(layer)
            continue
        prefix = f"{path}.weight."
        stats = {k[len(prefix) :]: state_dict[k] for k in list(state_dict) if k.startswith(prefix)}
        data = state_dict.get(f"{path}.weight")
        if not stats or not isinstance(data, torch.Tensor):
            continue
        bnb = require_bitsandbytes("load the statistics of 4-bit layers from a checkpoint")
        old = layer.weight
        device = old.device if old.device.type != "meta" else data.device
        new = bnb.nn.Params4bit.from_prequantized(data, dict(stats), requires_grad=False, device=device, module=layer)
        layer.weight = new
        layer.quant_state = new.quant_state
        for key in stats:
            del state_dict[prefix + key]
        loaded.append(path)
    return loaded


def _scales_on_weight(layer: nn.Module) -> None:
    """Point an 8-bit weight at the row scales its first forward moved into the layer's state (the same tensor), so
    that bitsandbytes' ``load_state_dict`` writes the stored scales into it."""
    state = getattr(layer, "state", None)
    if getattr(layer.weight, "SCB", None) is None and getattr(state, "SCB", None) is not None:
        layer.weight.SCB = state.SCB


def forget_quantization(model: nn.Module) -> None:
    """After every bitsandbytes layer of ``model`` was replaced by a plain one: drop transformers' record that the
    model is quantized, so ``save_pretrained`` writes a plain model and ``.to(dtype)`` is allowed again."""
    for m in model.modules():
        quantizer = getattr(m, "hf_quantizer", None)
        if quantizer is not None and callable(getattr(quantizer, "remove_quantization_config", None)):
            quantizer.remove_quantization_config(m)
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if getattr(m, flag, False):
                setattr(m, flag, False)
