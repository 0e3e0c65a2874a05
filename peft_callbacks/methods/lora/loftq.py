r"""LoftQ: LoRA factors that start by compensating the quantization error of the base (Li et al. 2023, "LoftQ:
LoRA-Fine-Tuning-Aware Quantization for Large Language Models"; HF PEFT's ``init_lora_weights="loftq"``).

QLoRA starts from ``Q + s·B·A`` with ``B = 0``: the model begins as far from the full-precision one as quantization put
it. LoftQ picks ``Q``, ``A``, ``B`` together so that ``deq(Q) + B·A ≈ W`` (§3, Algorithm 1)::

    res₀ = W                                              (out, in), float32
    for t = 1 … T  (loftq_iter):
        Q_t  = quantize(res_{t−1})                        NF4 (block 64, no double quantization) or int8 (row-wise)
        U S Vᵀ = svd(W − deq(Q_t))
        B = U·√S[:, :r],  A = √S[:r, :]·Vᵀ                (out, r), (r, in)   PEFT's ``_low_rank_decomposition``
        res_t = W − B·A
    base ← Q_T,  lora_A ← A,  lora_B ← B

Two entries, one per starting point:

* :func:`loftq_quantize` takes a **full-precision** model: it runs the iteration above on every targeted ``nn.Linear``
  (or transformers' ``Conv1D``, GPT-2's, read transposed) and puts a bitsandbytes layer holding ``Q_T`` in its place
  (``Linear4bit`` NF4 or ``Linear8bitLt``), then injects LoRA with ``A``, ``B``. HF PEFT writes ``deq(Q_T)`` back into
  a full-precision weight; here the base *is* the quantized model LoftQ asked for, so the engine's rule holds as on
  any QLoRA base: from then on the frozen base stays bit-identical, is fingerprinted as NF4/int8, and slim checkpoints
  and adapter files leave it out. Its dequantized weight equals PEFT's new base weight bit for bit (both computed on
  the same device), so PEFT's adapter and ours compute the same model.
* :func:`loftq_init` takes a model **already quantized** (transformers' ``BitsAndBytesConfig``, our QLoRA path) and
  the original weights (a state dict, or a safetensors file or folder read one tensor at a time, never unpickled):
  ``A``, ``B`` from the SVD of ``W − deq(Q)`` with ``Q`` as it is (PEFT's ``replace_lora_weights_loftq``, one
  iteration, any bitsandbytes format). An ``accept(model, path)`` check can keep a layer's new factors only where they
  help, as PEFT's ``callback``.

Both return a :class:`LoftQReport`: per layer the relative weight error ``‖W − deq(Q)‖/‖W‖`` of the plain quantized
start (QLoRA's) and ``‖W − (deq(Q) + s·B·A)‖/‖W‖`` of LoftQ's, and their totals over all layers.

**Scaling.** As in PEFT, ``B·A`` (not ``s·B·A``) approximates the error: LoftQ lowers the error as designed when the
LoRA scaling ``s = alpha/r`` is 1 (``alpha = rank``); with ``s = 2`` the truncated-SVD step exactly cancels its gain,
and above it makes the start worse. A warning says so, and the report shows it.

**Against PEFT.** On a float32 model the quantized weights and the factors are PEFT's bit for bit (tests compare
them, and ``replace_lora_weights_loftq``'s). PEFT computes on its default accelerator, here on the weight's device.
On a bfloat16/float16 model PEFT's base weight is ``deq(Q)`` rounded to that dtype (here the 4-bit layer computes in
it: the same), and its factors pass through that dtype too before they are upcast; here they stay float32, as QLoRA's
factors do (``adapter_dtype`` sets them), so they differ from PEFT's by that rounding.

**Reloading.** Adapter files hold ``A``, ``B`` only. Reload a LoftQ adapter onto the same quantized base:
``loftq_quantize(model, config, adapter=False)`` on the original model quantizes it again (the same ``Q``: the
iteration is deterministic on one device; the adapter file's fingerprint checks it), then ``load_adapter``.

Example::

    >>> import pytest, torch, torch.nn as nn
    >>> _ = pytest.importorskip("bitsandbytes")
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    >>> report = loftq_quantize(model, LoRAConfig(rank=8, alpha=8, target_modules=["0", "2"]))
    >>> type(model[0].base_layer).__name__, report.after < report.before
    ('Linear4bit', True)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import (
    check_adapter_name,
    check_bool,
    check_callable,
    check_instance,
    check_int,
    check_module,
    check_path,
    check_positive_int,
)
from peft_callbacks.core import quantized
from peft_callbacks.core.heads import find_head
from peft_callbacks.core.kinds import layer_kind
from peft_callbacks.engine import DEFAULT_ADAPTER, get_method, inject
from peft_callbacks.engine.method import replace_module
from peft_callbacks.engine.patterns import layer_settings, resolve_rank_alpha, select_layers
from peft_callbacks.io.original_weights import OriginalWeights
from peft_callbacks.methods.lora.config import LoRAConfig

log = logging.getLogger(__name__)

__all__ = [
    "LOFTQ_BITS",
    "LoftQOptions",
    "LoftQReport",
    "apply_loftq",
    "check_loftq_targets",
    "loftq_decompose",
    "loftq_init",
    "loftq_quantize",
    "residual_factors",
]

LOFTQ_BITS = (4, 8)  # NF4 and int8, PEFT's two
_QUANTIZED = ("linear_4bit", "linear_8bit")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoftQOptions:
    """How ``init="loftq"`` quantizes the base (HF PEFT's ``LoftQConfig``), or where it finds the original weights.

    Attributes:
        loftq_bits: PEFT's ``loftq_bits``: ``4`` (NF4, block size 64, no double quantization) or ``8`` (int8, one
            scale per row), the format the targeted layers of a full-precision model are quantized into.
        loftq_iter: PEFT's ``loftq_iter`` (≥ 1): alternations of quantizing and decomposing the residual (the
            paper's ``T``; each one is one SVD per layer).
        loftq_weights: for a model whose targeted layers are quantized already: the full-precision weights they
            were quantized from, as a safetensors file or a folder holding ``model.safetensors`` (or a sharded
            ``model.safetensors.index.json``); ``None`` for a full-precision model, which LoftQ quantizes itself.

    Example::

        >>> LoftQOptions().loftq_bits, LoftQOptions().loftq_iter
        (4, 1)
        >>> LoftQOptions(loftq_bits=3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `loftq_bits` must be 4 or 8 ..., got 3.
    """

    loftq_bits: int = 4
    loftq_iter: int = 1
    loftq_weights: str | None = None

    def __post_init__(self) -> None:
        _check_bits(self.loftq_bits)
        object.__setattr__(self, "loftq_iter", check_positive_int("loftq_iter", self.loftq_iter))
        if self.loftq_weights is not None:
            object.__setattr__(self, "loftq_weights", os.fspath(check_path("loftq_weights", self.loftq_weights)))


def _check_bits(bits: Any) -> None:
    check_int("loftq_bits", bits)
    if bits not in LOFTQ_BITS:
        raise ValueError(f"`loftq_bits` must be 4 or 8 (NF4 or int8, as HF PEFT's LoftQ), got {bits!r}.")


@dataclasses.dataclass
class LoftQReport:
    """The relative weight errors LoftQ started from and reached.

    Attributes:
        layers: ``{path: (before, after)}``: ``‖W − deq(Q)‖/‖W‖`` of the plain quantized start (QLoRA's, ``B = 0``)
            and ``‖W − (deq(Q_T) + s·B·A)‖/‖W‖`` of LoftQ's, per adapted layer.
        before: the same over all layers together, ``√(Σ‖error‖²) / √(Σ‖W‖²)``, before.
        after: the total after.
        kept: the layers whose LoftQ factors were kept (all of them unless ``accept`` rolled some back).
    """

    layers: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    before: float = 0.0
    after: float = 0.0
    kept: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"LoftQ: relative weight error {self.before:.4g} -> {self.after:.4g} over {len(self.layers)} layer(s) "
            f"({len(self.kept)} kept)"
        )


class _Errors:
    """Accumulates the squared norms of the report."""

    def __init__(self) -> None:
        self.report = LoftQReport()
        self._sums = [0.0, 0.0, 0.0]

    @torch.no_grad()
    def add(self, path: str, weight: torch.Tensor, start: torch.Tensor, now: torch.Tensor, kept: bool) -> None:
        norms = [weight.float().norm().item() ** 2, start.norm().item() ** 2, now.norm().item() ** 2]
        self._sums = [a + b for a, b in zip(self._sums, norms)]
        whole = max(norms[0], 1e-30) ** 0.5
        self.report.layers[path] = (norms[1] ** 0.5 / whole, norms[2] ** 0.5 / whole)
        if kept:
            self.report.kept.append(path)

    def done(self) -> LoftQReport:
        whole = max(self._sums[0], 1e-30) ** 0.5
        self.report.before, self.report.after = self._sums[1] ** 0.5 / whole, self._sums[2] ** 0.5 / whole
        log.info("%s", self.report)
        return self.report


# -- the maths (PEFT's loftq_utils, on the weight's own device) -----------------------------------------------------
def _low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_low_rank_decomposition``: ``(A, B) = (√S[:r,:]·Vᵀ, U·√S[:,:r])``, the same operations in the same
    order, so the factors agree bit for bit with PEFT's on one device."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)  # (out, k), (k,), (k, in)
    lora_B = u @ torch.sqrt(torch.diag(s)[:, 0:rank])  # (out, k) @ (k, r) -> (out, r)
    lora_A = torch.sqrt(torch.diag(s)[0:rank, :]) @ vh  # (r, k) @ (k, in) -> (r, in)
    return lora_A, lora_B


def _quantize(weight: torch.Tensor, num_bits: int) -> tuple[nn.Parameter, torch.Tensor]:
    """``(Q, deq(Q))`` of a float32 ``(out, in)`` weight as PEFT's ``loftq_init`` quantizes it."""
    bnb = quantized.require_bitsandbytes("quantize the base for LoftQ")
    device = weight.device
    if num_bits == 4:
        q = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, compress_statistics=False, quant_type="nf4")
        q = q.to(device)
        return q, bnb.functional.dequantize_4bit(q.data, q.quant_state)
    q = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False).to(device)
    return q, bnb.functional.int8_vectorwise_dequant(q.data, q.SCB)


@torch.no_grad()
def loftq_decompose(
    weight: torch.Tensor, num_bits: int = 4, rank: int = 8, num_iter: int = 1
) -> tuple[nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's alternation (module docstring) on one ``(out, in)`` weight: HF PEFT's ``loftq_init``.

    Args:
        weight: the full-precision weight (any floating dtype; computed in float32 on its device).
        num_bits: 4 (NF4) or 8 (int8).
        rank: the LoRA rank ``r``.
        num_iter: the number of alternations ``T`` (≥ 1).

    Returns:
        ``(Q_T, deq(Q_1), A, B)``: the bitsandbytes parameter of the last quantization (``Params4bit`` or
        ``Int8Params``, float32 statistics), the dequantized weight of the first one (plain quantization, for the
        report), and the factors, float32.

    Raises:
        ValueError: ``num_bits`` not 4 or 8, ``num_iter`` < 1, or a weight that is not 2-D.
    """
    _check_bits(num_bits)
    check_positive_int("loftq_iter", num_iter)
    check_positive_int("rank", rank)
    if weight.dim() != 2:
        raise ValueError(f"LoftQ decomposes 2-D weights (out, in), got one of shape {tuple(weight.shape)}.")
    weight = weight.detach().to(torch.float32)
    residual, first = weight.clone(), None
    for i in range(num_iter):
        q, dequantized = _quantize(residual, num_bits)
        first = dequantized if first is None else first
        lora_A, lora_B = _low_rank(weight - dequantized, rank)
        if i + 1 == num_iter:
            break
        residual = weight - torch.mm(lora_B, lora_A)
    return q, first, lora_A, lora_B


@torch.no_grad()
def residual_factors(layer: nn.Module, weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` from the SVD of ``weight − deq(Q)`` for a bitsandbytes ``layer`` holding ``Q``: PEFT's
    ``_loftq_init_new`` (which reads 4-bit layers only; 8-bit ones are read through the same dequantization here).

    Example::

        >>> import pytest, torch
        >>> bnb = pytest.importorskip("bitsandbytes")
        >>> layer = bnb.nn.Linear4bit(16, 8, quant_type="nf4")
        >>> w = torch.randn(8, 16)
        >>> layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4").to("cpu")
        >>> a, b = residual_factors(layer, w, rank=2)
        >>> tuple(a.shape), tuple(b.shape)
        ((2, 16), (8, 2))
    """
    dequantized = quantized.dequantize(layer).float()
    return _low_rank(weight.detach().to(dequantized.device, torch.float32) - dequantized, rank)


# -- full-precision models: quantize the targets, then LoRA --------------------------------------------------------
def _linear_weight(linear: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or of transformers' ``Conv1D`` (stored ``(in, out)``)."""
    return linear.weight.detach().T if layer_kind(linear) == "hf_conv1d" else linear.weight.detach()


def _quantized_layer(linear: nn.Module, q: nn.Parameter, num_bits: int) -> nn.Module:
    """A bitsandbytes layer holding ``q`` with ``linear``'s bias, frozen, in its training mode (a ``Conv1D``'s
    ``x·W + b`` is the ``x·Wᵀ + b`` of its transposed weight)."""
    bnb = quantized.require_bitsandbytes("quantize the base for LoftQ")
    has_bias = linear.bias is not None
    out_features, in_features = _linear_weight(linear).shape
    with torch.device("meta"):
        if num_bits == 4:
            layer = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=has_bias,
                compute_dtype=linear.weight.dtype,
                compress_statistics=False,
                quant_type="nf4",
            )
        else:
            layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias, has_fp16_weights=False)
    layer.weight = q
    if num_bits == 4:
        q.module = layer
        layer.quant_state = q.quant_state
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.train(linear.training)


def _targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The layers ``config`` selects in ``model`` (as ``inject`` would)."""
    selected = get_method("lora").select(model, config.replace(init="default"), find_head(model))
    return select_layers(selected, config.layers_to_transform, config.layers_pattern)


def _check_config(config: Any) -> LoRAConfig:
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"`config` must be a LoRAConfig, got {type(config).__name__}.")
    if config.use_dora or config.target_parameters:
        raise ValueError(
            "LoftQ initialises plain LoRA on linear layers; it cannot be combined with `use_dora=True` or "
            "`target_parameters`."
        )
    if config.init not in ("default", "loftq"):
        raise ValueError(f"LoftQ sets LoRA's initialisation itself; `init` must be 'loftq', got {config.init!r}.")
    return config.replace(init="loftq")


def _warn_scaling(scalings: dict[str, float]) -> None:
    off = {p: s for p, s in scalings.items() if abs(s - 1.0) > 1e-12}
    if off:
        path, s = next(iter(off.items()))
        log.warning(
            "LoftQ: %d layer(s) have a LoRA scaling alpha/r != 1 (%s: %g). LoftQ's factors (as HF PEFT's) approximate "
            "the quantization error by B·A while the model adds s·B·A: set alpha = rank for LoftQ to lower the error "
            "(with s >= 2 it does not).",
            len(off),
            path,
            s,
        )


@torch.no_grad()
def loftq_quantize(
    model: nn.Module,
    config: LoRAConfig,
    loftq: LoftQOptions | None = None,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    adapter: bool = True,
) -> LoftQReport:
    """Quantize the targeted linear layers of a full-precision ``model`` as LoftQ does and inject LoRA with
    LoftQ's factors (module docstring); the plain-PyTorch entry for ``init="loftq"`` on a full-precision model.

    Args:
        model: the model to quantize and adapt, in place (its targets ``nn.Linear`` or transformers' ``Conv1D``).
        config: LoRA's settings (``init`` is recorded as ``"loftq"``); ``alpha = rank`` is LoftQ's intended scaling.
        loftq: ``loftq_bits``, ``loftq_iter`` (:class:`LoftQOptions`; ``None``: PEFT's defaults, 4 bits, 1 iteration).
        adapter_name: the adapter's name.
        adapter: ``False`` quantizes the base only (the same ``Q``), to load a saved LoftQ adapter onto it.

    Returns:
        The errors before and after (:class:`LoftQReport`; with ``adapter=False`` after equals the error of ``Q``).

    Raises:
        ValueError: a target that is not a full-precision linear layer (a quantized one names :func:`loftq_init`),
            DoRA or ``target_parameters``, or ``loftq_weights`` given (this model's own weights are the originals).
        ImportError: bitsandbytes cannot be imported.
    """
    check_module("model", model)
    stored = _check_config(config)
    check_instance("loftq", loftq, LoftQOptions, optional=True)
    check_adapter_name(adapter_name)
    check_bool("adapter", adapter)
    loftq = LoftQOptions() if loftq is None else loftq
    if loftq.loftq_weights is not None:
        raise ValueError(
            f"`loftq_weights`={loftq.loftq_weights!r} is for a model whose targets are quantized already; "
            f"loftq_quantize reads the full-precision weights of {type(model).__name__} itself. Leave it None."
        )
    method = get_method("lora")
    if method.modules(model, adapter_name):
        raise ValueError(f"{type(model).__name__} already has LoRA adapter {adapter_name!r}; unload or merge it first.")
    targets = _targets(model, stored)
    kinds = {p: layer_kind(model.get_submodule(p)) for p in targets}
    already = [p for p, k in kinds.items() if k in _QUANTIZED]
    if already:
        raise ValueError(
            f"loftq_quantize quantizes full-precision linear layers; {already[:3]} of {type(model).__name__} are "
            f"bitsandbytes layers already. Use loftq_init(model, original, config) with the original weights "
            f"(LoRACallback: loftq_weights=...)."
        )
    other = [f"{p} ({k})" for p, k in kinds.items() if k not in ("linear", "hf_conv1d")]
    if other:
        raise ValueError(
            f"LoftQ quantizes linear layers (nn.Linear, transformers' Conv1D; as HF PEFT's); {other[:3]} are not. "
            f"Narrow `target_modules` (or add them to `exclude_modules`)."
        )
    quantized.require_bitsandbytes("quantize the base for LoftQ")
    resolved = resolve_rank_alpha(stored, targets)
    errors, new_layers, factors = _Errors(), {}, {}
    for path in targets:  # everything computed before the model changes
        linear = model.get_submodule(path)
        settings = layer_settings(resolved, path)
        weight = _linear_weight(linear)  # (out, in)
        q, first, lora_A, lora_B = loftq_decompose(weight, loftq.loftq_bits, settings.rank, loftq.loftq_iter)
        new_layers[path] = _quantized_layer(linear, q, loftq.loftq_bits)
        factors[path] = (linear, first, lora_A, lora_B)
    for path, layer in new_layers.items():
        replace_module(model, path, layer)
    try:
        if adapter:
            inject(model, stored, adapter_name=adapter_name, targets=targets)
    except Exception:
        for path, (linear, *_) in factors.items():
            replace_module(model, path, linear)
        raise
    scalings = {}
    for path, (linear, first, lora_A, lora_B) in factors.items():
        weight = _linear_weight(linear).float()
        dequantized = quantized.dequantize(new_layers[path]).float()
        update = torch.zeros_like(weight)
        if adapter:
            lora = model.get_submodule(path).adapters[adapter_name]
            lora.lora_A.weight.copy_(lora_A)
            lora.lora_B.weight.copy_(lora_B)
            scalings[path] = lora.scaling
            update = lora.scaling * (lora.lora_B.weight.float() @ lora.lora_A.weight.float())  # (out, r) @ (r, in)
        errors.add(path, weight, weight - first, weight - dequantized - update, kept=adapter)
    _warn_scaling(scalings)
    return errors.done()


# -- quantized models: the original weights from a file ------------------------------------------------------------
@torch.no_grad()
def loftq_init(
    model: nn.Module,
    original: Mapping[str, torch.Tensor] | str | os.PathLike,
    config: LoRAConfig | None = None,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    accept: Callable[[nn.Module, str], bool] | None = None,
) -> LoftQReport:
    """LoftQ's factors for LoRA on a model quantized already: ``A``, ``B`` from the SVD of ``W − deq(Q)``, the base
    untouched (HF PEFT's ``replace_lora_weights_loftq``).

    Args:
        model: a model whose targeted layers are bitsandbytes ``Linear4bit``/``Linear8bitLt`` (transformers'
            ``BitsAndBytesConfig``), adapted in place.
        original: the weights those layers were quantized from: a state dict, or a safetensors file or folder
            (``model.safetensors``, or sharded with ``model.safetensors.index.json``), read one tensor at a time.
            Keys are module paths + ``".weight"`` (a ``base_model_prefix`` more or less is tolerated).
        config: LoRA's settings to inject with (recorded with ``init="loftq"``); ``None`` re-initialises the factors of
            the adapter ``adapter_name`` the model carries already.
        adapter_name: the adapter's name.
        accept: ``accept(model, path) -> bool`` is called after each layer's factors are set; ``False`` puts the
            previous ones back (PEFT's ``callback``; e.g. compare the logits with the full-precision model's).

    Returns:
        The errors before and after (:class:`LoftQReport`).

    Raises:
        ValueError: a target that is not quantized (a full-precision one names :func:`loftq_quantize`), a weight
            missing from ``original`` or of another shape, ``config`` for an adapter already there, or none of
            either.
    """
    check_module("model", model)
    if not isinstance(original, (Mapping, str, os.PathLike)) or isinstance(original, str) and not original:
        raise TypeError(
            f"`original` must be a state dict or the path of a safetensors file or folder, got "
            f"{type(original).__name__} {str(original)[:60]!r}."
        )
    check_instance("config", config, LoRAConfig, optional=True)
    check_adapter_name(adapter_name)
    check_callable("accept", accept, optional=True)
    method = get_method("lora")
    existing = method.modules(model, adapter_name)
    if config is not None and existing:
        raise ValueError(
            f"{type(model).__name__} already has LoRA adapter {adapter_name!r}: pass config=None to re-initialise its "
            f"factors with LoftQ, or unload it first."
        )
    if config is None and not existing:
        raise ValueError(
            f"{type(model).__name__} has no LoRA adapter {adapter_name!r}: pass the LoRAConfig to inject it with."
        )
    originals = OriginalWeights(original, model)
    if config is not None:
        stored = _check_config(config)
        targets = _targets(model, stored)
        check_loftq_targets(model, targets)
        _check_originals(originals, {p: model.get_submodule(p) for p in targets})
        inject(model, stored, adapter_name=adapter_name, targets=targets)
        existing = method.modules(model, adapter_name)
    else:
        check_loftq_targets(model, [f"{p}.base_layer" for p in existing], paths=list(existing))
        _check_originals(originals, {p: layer.base_layer for p, layer in existing.items()})
    errors, scalings = _Errors(), {}
    for path, layer in existing.items():
        lora = layer.adapters[adapter_name]
        weight = originals.get(f"{path}.weight").to(lora.lora_A.weight.device, torch.float32)
        lora_A, lora_B = residual_factors(layer.base_layer, weight, lora.r)
        previous = (lora.lora_A.weight.detach().clone(), lora.lora_B.weight.detach().clone())
        lora.lora_A.weight.copy_(lora_A)
        lora.lora_B.weight.copy_(lora_B)
        kept = accept is None or bool(accept(model, path))
        if not kept:
            lora.lora_A.weight.copy_(previous[0])
            lora.lora_B.weight.copy_(previous[1])
        dequantized = quantized.dequantize(layer.base_layer).float()
        update = lora.scaling * (lora.lora_B.weight.float() @ lora.lora_A.weight.float())  # (out, r) @ (r, in)
        errors.add(path, weight, weight - dequantized, weight - dequantized - update, kept)
        scalings[path] = lora.scaling
    _warn_scaling(scalings)
    return errors.done()


def _check_originals(originals: OriginalWeights, layers: dict[str, nn.Module]) -> None:
    """Every layer's original weight is there with its shape (read from the headers), before anything changes."""
    for path, layer in layers.items():
        shape = originals.shape(f"{path}.weight")
        if shape != quantized.weight_shape(layer):
            raise ValueError(
                f"`original` weight {path}.weight has shape {shape}, the quantized layer "
                f"{quantized.weight_shape(layer)}: not the weights this model was quantized from."
            )


def check_loftq_targets(model: nn.Module, targets: list[str], paths: list[str] | None = None) -> None:
    """Refuse LoftQ's LoRA on layers that are not bitsandbytes layers: its factors describe the error of a quantized
    weight; on a full-precision layer they would change the model (a recipe or adapter file replayed onto the
    original model instead of the quantized one). ``paths`` name the layers in messages (default ``targets``)."""
    plain = [p for t, p in zip(targets, paths or targets) if layer_kind(model.get_submodule(t)) not in _QUANTIZED]
    if plain:
        raise ValueError(
            f"init='loftq' adapts quantized layers; {plain[:3]} of {type(model).__name__} are not bitsandbytes layers. "
            f"Quantize the full-precision model with loftq_quantize(model, config) (peft_callbacks.methods.lora."
            f"loftq; adapter=False to load a saved LoftQ adapter onto it), or use loftq_init(model, original, config) "
            f"on a model loaded quantized."
        )


def apply_loftq(
    model: nn.Module, config: LoRAConfig, loftq: LoftQOptions | None = None, *, adapter_name: str = DEFAULT_ADAPTER
) -> LoftQReport:
    """``init="loftq"`` as ``LoRACallback`` applies it: :func:`loftq_init` with ``loftq_weights`` where the targets
    are quantized already, else :func:`loftq_quantize`.

    Raises:
        ValueError: quantized targets without ``loftq_weights`` (the message says what to pass).
    """
    loftq = LoftQOptions() if loftq is None else loftq
    targets = _targets(model, _check_config(config))
    if not any(layer_kind(model.get_submodule(p)) in _QUANTIZED for p in targets):
        return loftq_quantize(model, config, loftq, adapter_name=adapter_name)
    if loftq.loftq_weights is None:
        labels = sorted({quantized.quantization_label(m) for m in quantized.quantized_layers(model).values()})
        raise ValueError(
            f"init='loftq': the targets of {type(model).__name__} are quantized already (bitsandbytes "
            f"{', '.join(labels)}); LoftQ needs the full-precision weights they came from. Pass "
            f"loftq_weights='path/to/model.safetensors' (or its folder), or call loftq_init(model, original, config)."
        )
    return loftq_init(model, loftq.loftq_weights, config, adapter_name=adapter_name)
