"""LoRA's settings: one frozen dataclass, checked once, recorded in recipes and taken by ``LoRACallback``."""

from __future__ import annotations

import dataclasses
from typing import Literal

from peft_callbacks._validation import (
    check_bool,
    check_choice,
    check_float,
    check_patterns,
    check_positive_float,
    check_positive_int,
)
from peft_callbacks.engine import LayerConfig, not_recorded
from peft_callbacks.engine.bias import BIAS_CHOICES
from peft_callbacks.engine.patterns import check_pattern_dict
from peft_callbacks.methods.lora.init import RESIDUAL_INITS, is_residual_init
from peft_callbacks.methods.lora.tokens import check_token_indices

__all__ = ["INITS", "LoRAConfig"]

PLAIN_INITS = ("default", "gaussian", "orthogonal", "eva", "loftq")  # the base weight untouched, no buffers
INITS = ("default", "gaussian", *RESIDUAL_INITS, "orthogonal", "eva", "loftq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(LayerConfig, method="lora"):
    """LoRA (Hu et al. 2021) and its variants rsLoRA, DoRA, PiSSA/OLoRA initialisation, and LoRA on parameters.

    Attributes:
        rank: the rank ``r`` of the update (> 0; Hu et al. §4.1).
        alpha: ``lora_alpha`` (> 0); ``scaling = alpha / rank`` (or ``alpha / sqrt(rank)`` with ``use_rslora``).
        dropout: dropout on the LoRA branch input, in ``[0, 1)``.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)`` (Kalajdzievski 2023).
        use_dora: weight-decomposed LoRA (DoRA, Liu et al. 2024): a trainable magnitude per output unit on top of
            the low-rank direction update.
        init: how the factors start (HF PEFT's ``init_lora_weights``): ``"default"`` (``A`` kaiming-uniform, ``B``
            zero), ``"gaussian"`` (``A`` normal with std ``1/r``), or from the base weight, which then acts as the
            residual: ``"pissa"`` (SVD), ``"pissa_niter_<K>"`` (randomised SVD, K power iterations), ``"olora"`` (QR);
            see :mod:`peft_callbacks.methods.lora.init`. ``"orthogonal"``: ``A``, ``B`` from one random orthogonal
            matrix, both non-zero with ``B·A = 0`` (even ``rank``; :mod:`~peft_callbacks.methods.lora.orthogonal`).
            ``"eva"``: ``A`` from the principal components of each layer's inputs, ``B`` zero; needs data
            (:func:`~peft_callbacks.methods.lora.eva.eva_init`, or ``LoRACallback`` which uses the training data).
            ``"loftq"``: a quantized base whose quantization error ``B·A`` starts by compensating
            (:mod:`~peft_callbacks.methods.lora.loftq`: ``loftq_quantize`` for a full-precision model, ``loftq_init``
            with the original weights for a quantized one, or ``LoRACallback``).
            ``"corda"``: from the SVD of ``W·C`` (``C`` the covariance of the layer's inputs on data), ``"lora_ga"``:
            from the SVD of the loss gradient of ``W`` on a few batches; both leave the rest of the weight as the
            residual, as PiSSA does, and need data (:func:`~peft_callbacks.methods.lora.corda.corda_init`,
            :func:`~peft_callbacks.methods.lora.loraga.lora_ga_init`, or ``LoRACallback``); linear layers only.
        target_parameters: parameters to adapt directly (names, dotted suffixes as in PEFT —
            ``"experts.gate_up_proj"`` — or regexes): the fused 3-D expert weights of mixture-of-experts blocks get
            one ``A``, ``B`` per expert (:mod:`peft_callbacks.methods.lora.params`). With ``target_modules=None`` only
            these parameters are adapted. Recorded as the exact parameter paths it selected.
        rank_pattern: per-layer ranks, ``{key: rank}`` with HF PEFT's key semantics: a key is a regex matched
            against the end of a module's path (``"q_proj"``, ``"layers\\.0\\.self_attn\\.v_proj"``); the first
            matching key wins, other layers keep ``rank`` (:mod:`peft_callbacks.engine.patterns`). A key that matches
            no adapted layer is refused. Recorded as the exact paths it set.
        alpha_pattern: per-layer ``alpha``, ``{key: alpha}``, keys as in ``rank_pattern``.
        bias: which base biases train with the adapter (HF PEFT's ``bias``): ``"none"``, ``"all"`` (every bias of
            the model) or ``"lora_only"`` (those of the adapted layers); they are saved and exported with it
            (:mod:`peft_callbacks.engine.bias`).
        lora_bias: give ``lora_B`` a bias (HF PEFT's ``lora_bias``, zero at the start, scaled with the branch) that
            merging adds to the base layer's bias; a layer without a bias cannot merge it. Only with
            ``init="default"``, without DoRA or ``target_parameters``.
        trainable_token_indices: rows of the input embedding to train beside LoRA (new tokens added with
            ``resize_token_embeddings``), HF PEFT's option of the same name: a list of token ids (the input embedding;
            a tied output embedding reads the same rows), or ``{module name: ids}``; only those rows are trained and
            saved (:mod:`peft_callbacks.methods.lora.tokens`). Recorded with exact module paths.

    Example::

        >>> config = LoRAConfig(rank=8, alpha=16, target_modules=["qkv"])
        >>> config.to_dict()["alpha"], config.target_modules  # patterns are used, the exact targets recorded
        (16.0, ['qkv'])
        >>> LoRAConfig(init="svd")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `init` must be one of ('default', 'gaussian', 'pissa', ..., 'eva', 'loftq'), got 'svd'.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    target_parameters: str | list[str] | None = not_recorded()
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def validate(self) -> None:
        super().validate()
        check_positive_int("rank", self.rank)
        self._set("alpha", check_positive_float("alpha", self.alpha))
        self._set("dropout", check_float("dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False))
        check_bool("use_rslora", self.use_rslora)
        check_bool("use_dora", self.use_dora)
        if not isinstance(self.init, str) or not (self.init in PLAIN_INITS or is_residual_init(self.init)):
            raise ValueError(f"`init` must be one of {INITS}, got {self.init!r}.")
        if self.init == "orthogonal" and self.rank % 2:
            raise ValueError(
                f"`init`='orthogonal' needs an even `rank` (Q is split in two halves), got rank={self.rank}."
            )
        if self.use_dora and self.init in ("orthogonal", "eva", "loftq"):
            raise ValueError(f"`init`={self.init!r} cannot be combined with `use_dora=True` here; use init='default'.")
        if self.use_dora and is_residual_init(self.init):
            raise ValueError(
                f"`init`={self.init!r} cannot be combined with `use_dora=True`: DoRA's magnitude is taken from the "
                f"base weight, which {self.init} splits in two. Use one of them."
            )
        self._set("target_parameters", check_patterns("target_parameters", self.target_parameters))
        self._set("rank_pattern", check_pattern_dict("rank_pattern", self.rank_pattern, integer=True))
        self._set("alpha_pattern", check_pattern_dict("alpha_pattern", self.alpha_pattern, integer=False))
        check_choice("bias", self.bias, BIAS_CHOICES)
        check_bool("lora_bias", self.lora_bias)
        if self.lora_bias and (self.use_dora or self.init != "default"):
            raise ValueError(
                f"`lora_bias=True` works with `init='default'` and without DoRA (as in HF PEFT), got "
                f"init={self.init!r}, use_dora={self.use_dora}."
            )
        self._set(
            "trainable_token_indices", check_token_indices("trainable_token_indices", self.trainable_token_indices)
        )
        if self.target_parameters:
            check_parameter_options(self)


def check_parameter_options(config: LoRAConfig) -> None:
    """Refuse the LoRA options that LoRA on parameters cannot have (as HF PEFT refuses them)."""
    if config.dropout:
        raise ValueError(
            f"`dropout`={config.dropout:g} cannot be used with `target_parameters`: a parameter's update W + s·B·A "
            f"has no input to drop (HF PEFT refuses it too). Use dropout=0."
        )
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError(
            "`rank_pattern`/`alpha_pattern` cannot be used with `target_parameters` here (per-layer settings apply to "
            "adapted layers); give the parameters their own adapter with its own `rank`/`alpha`."
        )
    if config.lora_bias:
        raise ValueError("`lora_bias=True` cannot be used with `target_parameters` (HF PEFT refuses it too).")
    if config.use_dora:
        raise ValueError("`use_dora=True` cannot be used with `target_parameters` (DoRA is defined for layers).")
    if config.init not in ("default", "gaussian"):
        raise ValueError(
            f"`init`={config.init!r} cannot be used with `target_parameters`; use 'default' or 'gaussian'."
        )
