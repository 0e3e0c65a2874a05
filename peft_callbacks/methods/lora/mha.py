r"""LoRA on ``nn.MultiheadAttention``: its packed ``in_proj`` and its ``out_proj``, as HF PEFT adapts them.

``nn.MultiheadAttention`` keeps q, k and v as one parameter ``in_proj_weight`` (``3E × E``) and reads it, and
``out_proj.weight``, directly inside its forward: no Linear layer is ever called, so an update beside one would never
run. LoRA therefore changes the two weights themselves for the duration of the forward
(:class:`~peft_callbacks.engine.AdaptedParameters`, ``torch.func.functional_call``)::

    in_proj_weight'  = W_in  + s · B·A                 lora_A: (r, E)   lora_B: (3E, r)
    out_proj.weight' = W_out + s · B_out·A_out         out_proj.lora_A: (r, E)   out_proj.lora_B: (E, r)

PEFT does the same by merging before and unmerging after each forward; here nothing is written, so the base weights
stay bit-exact and gradients reach the factors through the attention itself. Both weights are adapted together (as
in PEFT: there is no way to adapt only one), ``A`` starts kaiming-uniform and ``B`` at zero, and a merge writes
exactly the weights the forward used. Tensors carry PEFT's names: ``lora_A.weight`` / ``lora_B.weight`` for
``in_proj`` and ``base_layer.out_proj.lora_A.weight`` … for ``out_proj`` in PEFT's files. PEFT before 0.22 applied
``out_proj``'s update twice; a file it wrote is read with that ``B`` doubled, so the outputs are what PEFT computed
when it trained it (:func:`peft_out_proj_factor`). As in PEFT, ``dropout`` does
not apply (the update is folded into weights, not added to an output), and only attention whose q, k and v share
one size (a packed ``in_proj_weight``) is adapted.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine import AdaptedParameters
    >>> from peft_callbacks.methods.lora import LoRAConfig
    >>> attention = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> lora = LoRAMultiheadAttention(attention, LoRAConfig(rank=2))
    >>> tuple(lora.lora_B.weight.shape), tuple(lora.out_proj.lora_B.weight.shape)
    ((24, 2), (8, 2))
    >>> layer = AdaptedParameters(attention)
    >>> layer.add_adapter("default", lora)
    >>> x = torch.randn(2, 5, 8)
    >>> torch.equal(layer(x, x, x)[0], attention(x, x, x)[0])  # B = 0 at injection
    True
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from peft_callbacks.engine.method import peft_version
from peft_callbacks.methods.lora.params import LowRankParameters

if TYPE_CHECKING:
    from peft_callbacks.methods.lora.config import LoRAConfig

__all__ = [
    "PEFT_OUT_PROJ_FIXED",
    "LoRAMultiheadAttention",
    "attention_from_peft",
    "attention_to_peft",
    "peft_out_proj_factor",
]

IN_PROJ, OUT_PROJ = "in_proj_weight", "out_proj.weight"
# HF PEFT up to 0.21.2 added out_proj's update twice in its MultiheadAttention layer: its merge wrote W + ΔW, then
# merged the wrapped out_proj again (W + 2ΔW), in the forward pass and in merge_and_unload; 0.22.0 applies it once
# (peft PR #3774). Files record the PEFT version that wrote them (since PEFT 0.18); exports here are marked with it.
PEFT_OUT_PROJ_FIXED = "0.22.0"
_PEFT_OUT = "base_layer.out_proj."


class _Factors(nn.Module):
    """``lora_A`` / ``lora_B`` of one weight (``out_proj``'s, under the adapter's ``out_proj`` child)."""

    def __init__(self, in_features: int, out_features: int, r: int, like: torch.Tensor) -> None:
        super().__init__()
        dtype = like.dtype if like.is_floating_point() else None
        self.lora_A = nn.Linear(in_features, r, bias=False, device=like.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=like.device, dtype=dtype)


class LoRAMultiheadAttention(LowRankParameters):
    """LoRA factors for ``in_proj_weight`` and ``out_proj.weight`` of one ``nn.MultiheadAttention`` (see the module
    docstring); it lives in an :class:`~peft_callbacks.engine.AdaptedParameters` around the attention.

    Args:
        base_layer: the attention module (``_qkv_same_embed_dim``: one packed ``in_proj_weight``).
        config: a :class:`~peft_callbacks.methods.lora.LoRAConfig` (rank, alpha, rsLoRA, ``init="gaussian"``).
    """

    def __init__(self, base_layer: nn.MultiheadAttention, config: LoRAConfig) -> None:
        super().__init__(base_layer, config, [IN_PROJ, OUT_PROJ])
        self.r = config.rank
        self.lora_alpha = config.alpha
        self.lora_scaling = config.alpha / (math.sqrt(config.rank) if config.use_rslora else config.rank)
        embed = base_layer.embed_dim
        in_proj = _Factors(embed, 3 * embed, self.r, base_layer.in_proj_weight)  # (3E, E) = (3E, r) @ (r, E)
        self.lora_A, self.lora_B = in_proj.lora_A, in_proj.lora_B
        out_features, in_features = base_layer.out_proj.weight.shape
        self.out_proj = _Factors(in_features, out_features, self.r, base_layer.out_proj.weight)
        for lora_A, lora_B in self.factor_pairs():
            self.reset_factors(lora_A, lora_B, config.init, self.r)

    def factor_pairs(self) -> list[tuple[nn.Linear, nn.Linear]]:
        """``[(lora_A, lora_B)]`` of ``in_proj`` then ``out_proj``."""
        return [(self.lora_A, self.lora_B), (self.out_proj.lora_A, self.out_proj.lora_B)]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        lora_A, lora_B = self.factor_pairs()[0 if name == IN_PROJ else 1]
        return lora_B.weight, lora_A.weight  # (out, r) @ (r, in)

    def store_scale(self, scale: float) -> None:
        for _, lora_B in self.factor_pairs():
            lora_B.weight.mul_(scale)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}"


def peft_out_proj_factor(peft_config: dict) -> float:
    """How many times the PEFT that wrote ``peft_config`` (an ``adapter_config.json``) applied ``out_proj``'s update:
    2 before :data:`PEFT_OUT_PROJ_FIXED` (and for a file without ``peft_version``: PEFT < 0.18), else 1.

    Example::

        >>> peft_out_proj_factor({"peft_version": "0.21.2"}), peft_out_proj_factor({"peft_version": "0.22.0"})
        (2.0, 1.0)
        >>> peft_out_proj_factor({}), peft_out_proj_factor({"peft_version": "0.23.0.dev0@1a2b3c"})
        (2.0, 1.0)
    """
    version = peft_version(peft_config)
    fixed = tuple(int(v) for v in PEFT_OUT_PROJ_FIXED.split("."))
    return 2.0 if not version or version < fixed[: len(version)] else 1.0


def attention_to_peft(adapter: LoRAMultiheadAttention) -> dict[str, torch.Tensor]:
    """One attention adapter's tensors under PEFT's keys (for PEFT ≥ :data:`PEFT_OUT_PROJ_FIXED`, which applies each
    update once; the export says so in ``peft_version``)."""
    return {
        "lora_A.weight": adapter.lora_A.weight,
        "lora_B.weight": adapter.lora_B.weight,
        f"{_PEFT_OUT}lora_A.weight": adapter.out_proj.lora_A.weight,
        f"{_PEFT_OUT}lora_B.weight": adapter.out_proj.lora_B.weight,
    }


def attention_from_peft(tensors: dict[str, torch.Tensor], out_proj_factor: float = 1.0) -> dict[str, torch.Tensor]:
    """PEFT's tensors of one attention module under our keys (inverse of :func:`attention_to_peft`), ``out_proj``'s
    ``B`` multiplied by ``out_proj_factor`` (:func:`peft_out_proj_factor` of the file); unknown keys are passed on for
    the caller to report.

    Example::

        >>> peft_keys = ["lora_A.weight", "base_layer.out_proj.lora_B.weight"]
        >>> out = attention_from_peft({key: torch.ones(1) for key in peft_keys}, out_proj_factor=2.0)  # PEFT 0.21
        >>> sorted(out), out["out_proj.lora_B.weight"].item()
        (['lora_A.weight', 'out_proj.lora_B.weight'], 2.0)
    """
    out = {}
    for key, tensor in tensors.items():
        ours = f"out_proj.{key[len(_PEFT_OUT) :]}" if key.startswith(_PEFT_OUT) else key
        out[ours] = tensor * out_proj_factor if ours == "out_proj.lora_B.weight" else tensor
    return out
