r"""LoRA on token embeddings (``nn.Embedding``), held as HF PEFT holds it.

An embedding looks row ``i`` up in ``W₀`` (``num_embeddings × dim``). LoRA adds ``ΔW = s · (B·A)ᵀ`` with::

    lora_embedding_A: (r, num_embeddings)     zeros at the start
    lora_embedding_B: (dim, r)                normal(0, 1) at the start

    h = W₀[x] + s · A[:, x]ᵀ · Bᵀ             (the rows of Aᵀ looked up, then projected: (…, r) @ (r, dim))

so ``A`` is the factor that starts at zero (the reverse of LoRA on Linear layers, where ``B`` does), exactly as in PEFT
and in the original ``loralib``; the names and shapes are PEFT's, so its ``lora_embedding_A`` / ``lora_embedding_B``
tensors move between the two unchanged. Scaled embeddings (Gemma's ``Gemma3TextScaledWordEmbedding``, BART's
``BartScaledWordEmbedding``) multiply their output by a scalar ``embed_scale``; the update is multiplied by it too,
so the adapted layer still equals the layer with its weight merged. As in PEFT, ``dropout`` does not apply to an
embedding's update (its input is token ids), and embeddings are adapted only where ``target_modules`` names them.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> model = inject_lora(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2)), rank=2, alpha=4, target_modules=["0"])
    >>> layer = model[0]
    >>> lora = layer.adapters["default"]
    >>> tuple(lora.lora_embedding_A.shape), tuple(lora.lora_embedding_B.shape)
    ((2, 10), (8, 2))
    >>> ids = torch.tensor([[1, 5, 9]])
    >>> torch.equal(layer(ids), layer.base_layer(ids))  # A = 0 at injection
    True
    >>> _ = nn.init.normal_(lora.lora_embedding_A)
    >>> torch.allclose(nn.functional.embedding(ids, layer.merged_weight()), layer(ids), atol=1e-5)
    True
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from peft_callbacks.core.kinds import embed_scale
from peft_callbacks.engine.layers import AdaptedLayer, Adapter
from peft_callbacks.methods.lora.layers import factored_norm

if TYPE_CHECKING:
    from peft_callbacks.methods.lora.config import LoRAConfig

__all__ = ["LoRAEmbedding", "check_plain_lora", "drop_saved_embedding"]


class LoRAEmbedding(Adapter):
    """LoRA on an ``nn.Embedding`` (see the module docstring): ``W₀[x] + s·A[:, x]ᵀ·Bᵀ`` (times ``embed_scale``).

    Args:
        base_layer: the embedding to adapt (read for its size, device and dtype).
        config: a :class:`~peft_callbacks.methods.lora.LoRAConfig` (rank, alpha, rsLoRA; dropout does not apply).
    """

    base_kind = "embedding"
    absorbs_scale = True

    def __init__(self, base_layer: nn.Embedding, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        self.r = config.rank
        self.lora_alpha = config.alpha
        self.lora_scaling = config.alpha / (math.sqrt(config.rank) if config.use_rslora else config.rank)
        weight = base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else None
        num, dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.Parameter(torch.zeros(self.r, num, device=weight.device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, self.r, device=weight.device, dtype=dtype))
        nn.init.normal_(self.lora_embedding_B)  # PEFT's (and loralib's) start: A = 0, B ~ N(0, 1)
        self.__dict__["_base_layer"] = weakref.ref(base_layer)  # not a submodule: read when importing PEFT's files

    @property
    def scaling(self) -> float:
        """``s = alpha / r`` (or ``alpha / √r``) times :attr:`scale`."""
        return self.lora_scaling * self.scale

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        base = layer.base_layer
        rows = F.embedding(  # (…, r): the columns of A for the ids, as the base looks its rows up
            x,
            self.lora_embedding_A.T,
            padding_idx=base.padding_idx,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        update = (rows @ self.lora_embedding_B.T) * self.scaling  # (…, r) @ (r, dim) -> (…, dim)
        scale = embed_scale(base)
        if scale is not None:  # the base output is scaled inside its forward: its update is too
            update = update * (scale.to(update.dtype) if isinstance(scale, torch.Tensor) else scale)
        return result + update.to(result.dtype)

    def delta_weight(self, layer: AdaptedLayer | None = None) -> torch.Tensor:
        """``ΔW = s · (B·A)ᵀ`` in float32, shaped ``(num_embeddings, dim)`` like the base weight (no ``layer``)."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling

    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Bᵀ, Aᵀ)`` as float32 matrices ``(r, dim)`` and ``(num_embeddings, r)``: ``ΔW = s · Aᵀ·Bᵀ``."""
        return self.lora_embedding_B.float().T, self.lora_embedding_A.float().T

    def update_norm(self, layer: AdaptedLayer | None = None, *, squared: bool = False) -> torch.Tensor:
        """``‖ΔW‖_F`` from the ``r × r`` Gram matrices, without forming ``ΔW``."""
        return factored_norm(*self.update_factors(), self.scaling, squared=squared)

    def store_scale(self, scale: float) -> None:
        self.lora_embedding_B.mul_(scale)

    def merge_into(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight()

    def unmerge_from(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight()

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}"


def check_plain_lora(kind: str, config: LoRAConfig) -> None:
    """Refuse the LoRA variants that embeddings and attention modules do not have here (DoRA, PiSSA/OLoRA,
    orthogonal, EVA).

    Example::

        >>> from peft_callbacks.methods.lora import LoRAConfig
        >>> check_plain_lora("embedding", LoRAConfig(use_dora=True))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `use_dora=True` is not supported on nn.Embedding layers here (plain LoRA only); ...
    """
    from peft_callbacks.core.kinds import KIND_NAMES
    from peft_callbacks.methods.lora.init import is_residual_init

    name = KIND_NAMES.get(kind, kind)
    if config.use_dora:
        raise ValueError(
            f"`use_dora=True` is not supported on {name} layers here (plain LoRA only); leave them out of "
            f"`target_modules` or set use_dora=False."
        )
    if is_residual_init(config.init) or config.init in ("orthogonal", "eva"):
        raise ValueError(
            f"`init`={config.init!r} is not supported on {name} layers (plain LoRA only, as in HF PEFT); use "
            f"'default' or 'gaussian', or leave them out of `target_modules`."
        )


def drop_saved_embedding(adapter: LoRAEmbedding, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's tensors of one embedding without the whole embedding weight PEFT saves beside its factors
    (``base_layer.weight``, ``save_embedding_layers="auto"``), once checked equal to the base it is imported into.

    Raises:
        ValueError: the saved embedding differs from the base's (a resized or trained vocabulary): this import adds
            adapters and never rewrites a base weight.
    """
    saved = tensors.get("base_layer.weight")
    if saved is None:
        return tensors
    base = adapter.__dict__["_base_layer"]()
    weight = None if base is None else base.weight
    if weight is None or saved.shape != weight.shape or not torch.equal(saved.to(weight), weight.detach()):
        shape = None if weight is None else tuple(weight.shape)
        raise ValueError(
            f"the file holds an embedding weight {tuple(saved.shape)} (PEFT's save_embedding_layers) that differs "
            f"from the model's {shape}: resize the vocabulary and load that embedding into the model first, then "
            f"import the adapter (which never rewrites a base weight)."
        )
    return {k: t for k, t in tensors.items() if k != "base_layer.weight"}
