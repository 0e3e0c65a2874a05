r"""OFT (Qiu et al. 2023, "Orthogonal Finetuning", §3; HF PEFT's current OFT): rotate a layer's input with a learned
block-diagonal orthogonal matrix, so the angles between the base weight's neurons are kept.

::

    R = diag(R₁, …, R_r)     Rᵢ = Cayley(Qᵢ) = (I − Qᵢ)(I + Qᵢ)⁻¹,   Qᵢ skew-symmetric (b × b)
    h = W₀·(Rᵀx) + b     i.e.  W = W₀·Rᵀ      (rows x: x·R, one block of ``b = oft_block_size`` inputs at a time)

Each block is parameterised by the ``b(b−1)/2`` entries above the diagonal of ``Qᵢ`` (``oft_R``, shape
``(r, b(b−1)/2)``, PEFT's name and shape). ``oft_R`` starts at zero, so ``R = I`` and an adapted layer computes what
the base did. As in PEFT, the Cayley transform is by default its Neumann series ``I + 2Q + 2Q² + … + Qᵏ``
(``use_cayley_neumann``, ``num_cayley_neumann_terms``: cheap, nearly orthogonal); ``use_cayley_neumann=False`` uses
the exact inverse. ``coft`` (constrained OFT) projects each ``Qᵢ`` back into a ball of radius ``eps / √r`` at every
forward pass; ``block_share`` uses one block for all.

The rotated width is the layer's input width (``in``, or ``in·k…`` for a convolution, whose kernel is flattened with
its input channels). If ``oft_block_size`` (or ``rank``, the number of blocks) does not divide it, the nearest value
that does is used, with a warning, exactly as PEFT does.

The adapter's :attr:`~peft_callbacks.engine.scaling.Scalable.scale` ``t`` scales the generator: ``R(t) =
Cayley(t·Q)``, block by block, in the forward pass and in the merge. ``t = 0`` is the identity (the base layer) and
``t = 1`` the trained rotation, exactly, and every ``R(t)`` is a rotation still (the angles between neurons stay
kept), so the layer's weight is not ``W₀ + t·ΔW`` between the two; absorbing the scale multiplies ``oft_R`` by ``t``.

Linear layers, transformers ``Conv1D`` and convolutions with a 1×1 kernel rotate their input (the base layer then
runs as it is). For larger kernels the weight itself is rotated (``W₀·Rᵀ``, an extra convolution with
``W₀·Rᵀ − W₀``): PEFT's Conv2d rotates overlapping input patches and folds them back, which neither starts at the
base model nor equals its own merged layer; here the unmerged layer equals the merged one, which equals PEFT's
``merge_and_unload``.

Example::

    >>> import timm, torch
    >>> from peft_callbacks.engine import inject, merge
    >>> model = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    >>> config = OFTConfig(oft_block_size=32, use_cayley_neumann=False, target_modules=["layer1.0.conv1"])
    >>> model = inject(model, config)
    >>> conv = model.layer1[0].conv1  # Conv2d(32, 32, 3×3): rotates its 32·3·3 = 288 flattened inputs
    >>> oft = conv.adapters["default"]
    >>> tuple(oft.oft_R.shape)  # 288 = 9 blocks of 32, each 32·31/2 angles
    (9, 496)
    >>> with torch.no_grad():
    ...     _ = oft.oft_R.normal_(0, 0.1)
    >>> R = torch.block_diag(*oft.rotation(dtype=torch.float64))  # (288, 288)
    >>> torch.allclose(R @ R.T, torch.eye(288, dtype=torch.float64))  # exact Cayley transform: orthogonal
    True
    >>> w0 = conv.base_layer.weight.detach().flatten(1).double()  # (32 filters, 288)
    >>> x = torch.randn(2, 3, 32, 32)
    >>> adapted = model(x)
    >>> w = merge(model).layer1[0].conv1.weight.detach().flatten(1).double()  # W₀·Rᵀ
    >>> torch.allclose(w @ w.T, w0 @ w0.T, atol=1e-5)  # norms of and angles between the filters are kept
    True
    >>> torch.allclose(model(x), adapted, atol=1e-5)
    True
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_bool, check_float, check_int, check_positive_float
from peft_callbacks.core.kinds import base_weight, conv_with_weight
from peft_callbacks.engine import (
    AdaptedLayer,
    Adapter,
    LayerConfig,
    LayerMethod,
    PeftMapping,
    peft_version,
    register_method,
)
from peft_callbacks.methods.lycoris import peft_layer_check

__all__ = ["OFTAdapter", "OFTConfig", "OFTConv", "OFTConv1D", "OFTLinear", "oft_blocks"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OFTConfig(LayerConfig, method="oft"):
    """OFT: a block-diagonal orthogonal rotation of each adapted layer's input (HF PEFT's ``OFTConfig``).

    Give the size of the blocks (``oft_block_size``) or their number per layer (``rank``), not both: the other is
    ``0``.

    Attributes:
        oft_block_size: the size ``b`` of each rotation block (>= 0); more parameters as it grows (``b(b−1)/2``
            per block).
        rank: the number of blocks per layer (>= 0) [PEFT: ``r``].
        module_dropout: during training, the probability of each block being replaced by the identity (OFT's
            multiplicative dropout; a fixed share ``int(p·r)`` of the blocks), in ``[0, 1)``. HF PEFT creates this
            dropout but does not apply it; evaluation outputs agree either way.
        coft: constrained OFT: keep each ``Q`` within ``eps`` of zero (the projection rewrites ``oft_R`` in place
            at every forward pass and merge, as PEFT does).
        eps: the radius of ``coft``'s constraint (> 0; divided by ``√r``).
        block_share: one block shared by all blocks of a layer.
        use_cayley_neumann: the Cayley transform by its Neumann series (faster, nearly orthogonal) instead of the
            exact inverse.
        num_cayley_neumann_terms: terms of that series (>= 2).

    Example::

        >>> OFTConfig(rank=4, oft_block_size=0).to_dict()["rank"]
        4
        >>> OFTConfig(rank=4)
        Traceback (most recent call last):
        ...
        ValueError: Give `rank` or `oft_block_size`, not both (the other one 0): got rank=4, oft_block_size=32.
    """

    oft_block_size: int = 32
    rank: int = 0
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        super().validate()
        check_int("oft_block_size", self.oft_block_size, minimum=0)
        check_int("rank", self.rank, minimum=0)
        if (self.rank == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"Give `rank` or `oft_block_size`, not both (the other one 0): got rank={self.rank}, "
                f"oft_block_size={self.oft_block_size}."
            )
        self._set(
            "module_dropout",
            check_float("module_dropout", self.module_dropout, low=0.0, high=1.0, high_inclusive=False),
        )
        check_bool("coft", self.coft)
        self._set("eps", check_positive_float("eps", self.eps))
        check_bool("block_share", self.block_share)
        check_bool("use_cayley_neumann", self.use_cayley_neumann)
        check_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms, minimum=2)


def _nearest_divisor(dimension: int, value: int) -> int:
    """The divisor of ``dimension`` nearest ``value`` (ties: the smaller; above ``dimension``: ``dimension``)."""
    if value >= dimension:
        return dimension
    higher = value
    while higher <= dimension and dimension % higher:
        higher += 1
    lower = value
    while lower > 1 and dimension % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def oft_blocks(dimension: int, rank: int, block_size: int) -> tuple[int, int]:
    """``(number of blocks, block size)`` for a rotated width ``dimension``, from ``rank`` or ``block_size`` (the
    other is 0); a value that does not divide ``dimension`` is moved to the nearest one that does, as PEFT does.

    Example::

        >>> oft_blocks(768, 0, 32), oft_blocks(37, 0, 32), oft_blocks(48, 0, 32), oft_blocks(64, 4, 0)
        ((24, 32), (1, 37), (2, 24), (4, 16))
    """
    if rank == 0:
        if dimension % block_size or block_size > dimension:
            block_size = _nearest_divisor(dimension, block_size)
        return dimension // block_size, block_size
    if dimension % rank or rank > dimension:
        rank = _nearest_divisor(dimension, rank)
    return rank, dimension // rank


class OFTAdapter(Adapter):
    """An OFT rotation of one layer's input (or, for convolutions with a kernel larger than 1, of its weight).

    Args:
        base_layer: the layer to adapt (read for its shape, device and dtype).
        config: an :class:`OFTConfig`.

    Attributes:
        r: the number of blocks; ``oft_block_size``: their size (after moving to a divisor of the rotated width).
        rotates_input: the input is rotated (Linear, ``Conv1D``, 1×1 kernels) rather than the weight.
    """

    absorbs_scale = True
    linear_scale = False  # the scale multiplies the rotation's generator Q, not ΔW

    def __init__(self, base_layer: nn.Module, config: OFTConfig) -> None:
        super().__init__(base_layer, config)
        weight = base_weight(base_layer)
        in_features = weight.shape[0] if self.kind == "hf_conv1d" else weight.shape[1]
        self.kernel_size = tuple(weight.shape[2:])
        self.rotates_input = self.changes_input = all(k == 1 for k in self.kernel_size)
        width = in_features * math.prod(self.kernel_size)
        self.r, self.oft_block_size = oft_blocks(width, config.rank, config.oft_block_size)
        self.adjusted = self.oft_block_size != config.oft_block_size if config.rank == 0 else self.r != config.rank
        self.module_dropout = config.module_dropout
        self.coft, self.eps, self.block_share = config.coft, config.eps, config.block_share
        self.use_cayley_neumann = config.use_cayley_neumann
        self.num_cayley_neumann_terms = config.num_cayley_neumann_terms
        n_elements = self.oft_block_size * (self.oft_block_size - 1) // 2
        dtype = weight.dtype if weight.is_floating_point() else None
        shape = (1 if config.block_share else self.r, n_elements)
        self.oft_R = nn.Parameter(torch.zeros(shape, device=weight.device, dtype=dtype))

    # -- the rotation -----------------------------------------------------------------------------------------------
    def _skew(self, vector: torch.Tensor) -> torch.Tensor:
        """``(n, b(b−1)/2)`` -> ``(n, b, b)`` skew-symmetric matrices (the entries fill the upper triangle)."""
        b = self.oft_block_size
        rows, cols = torch.triu_indices(b, b, 1, device=vector.device)
        matrix = torch.zeros(vector.shape[0], b, b, device=vector.device, dtype=vector.dtype)
        matrix[:, rows, cols] = vector
        return matrix - matrix.transpose(-2, -1)

    def _project(self) -> None:
        """COFT: move each ``Q`` back into the ball of radius ``eps / √n`` (in place, as PEFT does)."""
        with torch.no_grad():
            q = self._skew(self.oft_R)
            eps = self.eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
            norm = torch.norm(q, dim=(1, 2), keepdim=True)
            q = torch.where(norm <= eps, q, eps * (q / norm))
            rows, cols = torch.triu_indices(self.oft_block_size, self.oft_block_size, 1, device=q.device)
            self.oft_R.copy_(q[:, rows, cols])

    def _cayley(self, q: torch.Tensor) -> torch.Tensor:
        """``(I − Q)(I + Q)⁻¹`` per block, or its Neumann series ``I + 2Q + 2Q² + …`` truncated where PEFT truncates
        it (``num_cayley_neumann_terms``)."""
        eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
        if not self.use_cayley_neumann:
            return torch.linalg.solve(eye + q, eye - q, left=False)
        terms = self.num_cayley_neumann_terms
        rotation = torch.add(eye, q, alpha=2.0)
        if terms > 2:
            power = torch.bmm(q, q)
            rotation = rotation.add(power, alpha=2.0)
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                rotation = rotation.add(power, alpha=2.0)
            rotation = rotation + torch.bmm(power, q)
        return rotation

    def rotation(self, *, dtype: torch.dtype | None = None, dropout: bool = False) -> torch.Tensor:
        """The blocks ``(r, b, b)`` of ``R`` at the current scale, computed in ``dtype`` (default: ``oft_R``'s);
        ``dropout`` applies ``module_dropout`` (training forward passes only)."""
        if self.coft:
            self._project()
        vector = self.times_scale(self.oft_R if dtype is None else self.oft_R.to(dtype))  # t·Q
        blocks = self._cayley(self._skew(vector))  # (1 or r, b, b)
        if dropout and self.module_dropout > 0 and blocks.shape[0] > 1:  # OFT's multiplicative dropout
            count = blocks.shape[0]
            replaced = int(self.module_dropout * count)
            mask = torch.cat([torch.ones(replaced), torch.zeros(count - replaced)])[torch.randperm(count)]
            mask = mask.to(device=blocks.device, dtype=blocks.dtype).view(count, 1, 1)
            eye = torch.eye(self.oft_block_size, device=blocks.device, dtype=blocks.dtype)
            blocks = (1 - mask) * blocks + mask * eye
        return blocks.expand(self.r, -1, -1) if self.block_share else blocks  # block_share: the one block, r times

    # -- forward ------------------------------------------------------------------------------------------------------
    def transform_input(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        blocks = self.rotation(dropout=self.training)
        h = x.to(blocks.dtype)
        if self.kind == "conv":
            h = h.movedim(1, -1)  # (N, C, …) -> (N, …, C): a 1×1 kernel rotates the channels of every position
        shape = h.shape
        h = h.reshape(*shape[:-1], self.r, self.oft_block_size)  # (…, r, b)
        h = torch.einsum("...rk,rkc->...rc", h, blocks).reshape(shape)  # each block of inputs times its Rᵢ
        if self.kind == "conv":
            # the base conv sees the input's own strides: another layout picks other kernels here and downstream,
            # whose rounding differs (an identity rotation gives the base model's outputs exactly)
            return torch.empty_like(x).copy_(h.movedim(-1, 1))
        return h.to(x.dtype)

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.rotates_input:
            return result  # the base layer saw the rotated input
        self._check_alone(layer)
        blocks = self.rotation(dropout=self.training)
        weight = base_weight(layer.base_layer).to(blocks.dtype)
        delta = self._rotate_weight(weight, blocks) - weight  # W₀Rᵀ − W₀, (out, in, k…)
        return result + conv_with_weight(layer.base_layer, x.to(delta.dtype), delta).to(result.dtype)

    def _check_alone(self, layer: AdaptedLayer) -> None:
        """A rotated weight (``W₀Rᵀ``, added as ``W₀Rᵀ − W₀``) does not compose with other updates of the same layer."""
        others = [name for name in layer.active_adapters if layer.adapters[name] is not self]
        if others:
            kernel = "×".join(map(str, self.kernel_size))
            raise ValueError(
                f"OFT on a convolution with a {kernel} kernel rotates the layer's weight, which does not compose "
                f"with the other adapters active on the same layer ({others}): activate one at a time "
                f"(AdaptedLayer.set_active) or keep OFT on other layers."
            )

    # -- merge --------------------------------------------------------------------------------------------------------
    def _rotate_weight(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The stored weight times ``Rᵀ`` on its input side (``Conv1D``, stored ``(in, out)``: ``R`` from the left)."""
        b = self.oft_block_size
        if self.kind == "hf_conv1d":
            return torch.einsum("rck,rko->rco", blocks, weight.reshape(self.r, b, -1)).reshape(weight.shape)
        return torch.einsum("ork,rck->orc", weight.reshape(weight.shape[0], self.r, b), blocks).reshape(weight.shape)

    def merge_into(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        if not self.rotates_input:
            self._check_alone(layer)
        return self._rotate_weight(weight, self.rotation(dtype=torch.float32))

    def unmerge_from(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        return self._rotate_weight(weight, torch.linalg.inv(self.rotation(dtype=torch.float32)))

    def store_scale(self, scale: float) -> None:
        self.oft_R.mul_(scale)

    def extra_repr(self) -> str:
        share = ", block_share" if self.block_share else ""
        return f"r={self.r}, oft_block_size={self.oft_block_size}{share}"


class OFTLinear(OFTAdapter):
    """OFT on an ``nn.Linear``: the input is rotated."""

    base_kind = "linear"


class OFTConv(OFTAdapter):
    """OFT on ``nn.Conv1d/2d/3d`` (``groups=1``): 1×1 kernels rotate the input channels; larger kernels rotate the
    weight over its flattened ``(in, k…)`` inputs. (HF PEFT's OFT has Conv2d only.)"""

    base_kind = "conv"


class OFTConv1D(OFTAdapter):
    """OFT on transformers' ``Conv1D`` (GPT-2): the input is rotated, as for ``nn.Linear``. (HF PEFT's OFT does not
    adapt ``Conv1D``.)"""

    base_kind = "hf_conv1d"


# -- HF PEFT's format --------------------------------------------------------------------------------------------------
_PEFT_FIELDS = ("module_dropout", "coft", "eps", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms")
_NEUMANN_SINCE = (0, 18)  # PEFT changed its Neumann series in 0.18; ours is the series of 0.18 and later


def _to_peft(config: OFTConfig, layers: dict[str, AdaptedLayer]) -> dict[str, Any]:
    peft_layer_check("OFT", layers, conv_dims=(2,))
    odd = [p for p, layer in layers.items() if _odd_conv(layer.base_layer)]
    if odd:
        raise ValueError(
            f"HF PEFT's OFT adapts square, undilated Conv2d kernels only, so peft.PeftModel.from_pretrained would "
            f"refuse or misread this adapter on {odd[:4]}. Leave those layers out (`exclude_modules`) to export, or "
            f"keep the adapter in this library's format (save_adapter)."
        )
    return {
        "r": config.rank,
        "oft_block_size": config.oft_block_size,
        **{name: getattr(config, name) for name in _PEFT_FIELDS},
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "peft_version": ".".join(map(str, (*_NEUMANN_SINCE, 0))),  # the series PEFT reads as ours
    }


def _odd_conv(base: nn.Module) -> bool:
    kernel = getattr(base, "kernel_size", None)
    return isinstance(base, nn.Conv2d) and (kernel[0] != kernel[1] or any(d != 1 for d in base.dilation))


def _from_peft(peft_config: dict[str, Any]) -> OFTConfig:
    if "oft_block_size" not in peft_config:
        raise ValueError(
            "was saved by PEFT < 0.14, whose OFT is another parameterisation; retrain it with a newer PEFT"
        )
    used = []  # layers_to_transform / layers_pattern: the file's tensors name the layers they chose
    if peft_config.get("bias", "none") != "none":
        used.append(f"bias={peft_config['bias']!r}")
    if used:
        raise ValueError(f"uses PEFT OFT options that peft_callbacks does not support: {', '.join(used)}")
    if peft_config.get("use_cayley_neumann") and peft_version(peft_config)[:2] < _NEUMANN_SINCE:
        log.warning("This OFT adapter was saved by PEFT < 0.18, whose Cayley-Neumann series differed slightly.")
    defaults = OFTConfig()
    return OFTConfig(
        rank=peft_config.get("r", 0),
        oft_block_size=peft_config["oft_block_size"],
        **{name: peft_config.get(name, getattr(defaults, name)) for name in _PEFT_FIELDS},
        train_head=False,
    )


class OFTMethod(LayerMethod):
    """OFT: ``W₀·(Rᵀx)`` with ``R`` block-diagonal and orthogonal, on Linear, Conv and ``Conv1D`` layers."""

    name = "oft"
    title = "OFT"
    config_class = OFTConfig
    examples = {
        "block-size": OFTConfig(oft_block_size=8),
        "rank-exact-cayley": OFTConfig(rank=2, oft_block_size=0, use_cayley_neumann=False),
        "coft-block-share": OFTConfig(oft_block_size=4, coft=True, eps=1e-2, block_share=True, module_dropout=0.1),
    }
    adapter_classes = {"linear": OFTLinear, "conv": OFTConv, "hf_conv1d": OFTConv1D}
    peft = PeftMapping("OFT", _to_peft, _from_peft, keys={"oft_R": "oft_R.weight"})

    def insert(self, model: nn.Module, targets: list[str], config: OFTConfig, adapter_name: str) -> None:
        super().insert(model, targets, config, adapter_name)
        moved = {}
        for path in targets:
            adapter = model.get_submodule(path).adapters[adapter_name]
            if adapter.adjusted:
                moved[path] = adapter.oft_block_size if config.rank == 0 else adapter.r
        if moved:
            given = f"oft_block_size={config.oft_block_size}" if config.rank == 0 else f"rank={config.rank}"
            shown = ", ".join(f"{p}: {v}" for p, v in list(moved.items())[:4])
            log.warning(
                "OFT: %s does not divide the rotated width of %d layer(s); each uses the nearest value that does, as "
                "HF PEFT does (%s%s).",
                given,
                len(moved),
                shown,
                ", …" if len(moved) > 4 else "",
            )

    def describe(self, config: OFTConfig) -> str:
        return f"oft_block_size={config.oft_block_size}" if config.rank == 0 else f"r={config.rank}"


register_method(OFTMethod())
