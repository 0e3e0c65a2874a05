r"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", §3): frozen random projections shared
by every adapted layer, and two trained vectors per layer.

::

    h = W₀x + Λ_b · B · Λ_d · A · x          A: (r, in)  B: (out, r)    frozen, random, shared by all layers
                                             Λ_d = diag(vera_lambda_d): (r,)    starts at d_initial
                                             Λ_b = diag(vera_lambda_b): (out,)  starts at 0: the layer starts as W₀

One pair of projections serves every layer of an injection: it is sized for the widest input and output among the
adapted layers, and each layer uses its top-left slice (``A[:, :in]``, ``B[:out, :]``), as in HF PEFT. The
projections come from a seeded generator (``projection_prng_key``, on the CPU, kaiming-uniform as PEFT draws them),
so they are *not* stored: adapter files hold only the per-layer vectors (a few kB) and the recipe holds the seed,
from which a reload draws exactly the same projections. ``save_projection`` says whether an HF PEFT directory written
by :func:`~peft_callbacks.io.export_peft` carries them (``base_model.vera_A`` / ``vera_B``), as PEFT's flag does.

With the same seed and vectors the outputs equal ``peft.VeraConfig``'s, and directories move between the two.
The adapter's :attr:`~peft_callbacks.engine.scaling.Scalable.scale` multiplies ``Λ_b`` (``W₀ + scale·ΔW``, linear;
absorbed into ``vera_lambda_b``).

Example::

    >>> import torch, transformers
    >>> from peft_callbacks.engine import inject, merge
    >>> config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                                  intermediate_size=37, vocab_size=99)
    >>> model = inject(transformers.BertModel(config).eval(), VeRAConfig(rank=16, target_modules=["query", "value"]))
    >>> vera = model.encoder.layer[0].attention.self.query.adapters["default"]
    >>> tuple(vera.vera_lambda_b.shape), tuple(vera.vera_lambda_d.shape), tuple(vera.projections.vera_A.shape)
    ((32,), (16,), (16, 32))
    >>> value = model.encoder.layer[0].attention.self.value.adapters["default"]
    >>> value.projections is vera.projections  # one pair per injection
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peft_callbacks._validation import check_bool, check_float, check_int, check_positive_int
from peft_callbacks.core.kinds import base_weight, is_hf_conv1d
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.engine import AdaptedLayer, AdditiveAdapter, LayerConfig, LayerMethod, PeftMapping, register_method

__all__ = ["VeRA", "VeRAConfig", "VeRAProjections"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeRAConfig(LayerConfig, method="vera"):
    """VeRA: shared frozen random projections, a trained scaling vector on each side per layer.

    Attributes:
        rank: the size ``r`` of the shared projections (> 0; VeRA uses ranks well above LoRA's, PEFT's default 256).
        projection_prng_key: the seed of the projections (an int >= 0); the same seed gives the same projections.
        save_projection: store the projections in HF PEFT directories (``export_peft``), as PEFT's flag of that name
            does. Adapter files of this library never store them: the recipe holds the seed.
        dropout: dropout on the VeRA branch input, in ``[0, 1)``.
        d_initial: the initial value of every ``vera_lambda_d`` entry (> 0; the paper recommends <= 0.1).

    Example::

        >>> VeRAConfig(rank=64, projection_prng_key=7).to_dict()["projection_prng_key"]
        7
    """

    rank: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0
    d_initial: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_positive_int("rank", self.rank)
        check_int("projection_prng_key", self.projection_prng_key, minimum=0)
        check_bool("save_projection", self.save_projection)
        self._set("dropout", check_float("dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False))
        self._set("d_initial", check_float("d_initial", self.d_initial, low=0.0, low_inclusive=False))


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain √2, fan-in ``shape[1]``) drawn from ``generator`` on the CPU, as PEFT draws VeRA's."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


class VeRAProjections(PEFTModule):
    """The frozen random projections of one VeRA injection, shared by all its adapters.

    ``vera_A`` (``(rank, in_features)``) and ``vera_B`` (``(out_features, rank)``) are drawn in this order from a CPU
    generator seeded with ``seed``, then moved to ``device`` / ``dtype``. They are non-persistent buffers: never in a
    ``state_dict``, rebuilt from the seed.

    Args:
        rank: ``r``.
        in_features: the widest input among the adapted layers.
        out_features: the widest output among the adapted layers.
        seed: ``projection_prng_key``.
        device: where the adapted layers live.
        dtype: the adapted layers' floating dtype.

    Example::

        >>> a, b = VeRAProjections(4, 8, 6, seed=0), VeRAProjections(4, 8, 6, seed=0)
        >>> torch.equal(a.vera_A, b.vera_A), tuple(a.vera_B.shape)
        (True, (6, 4))
    """

    def __init__(
        self,
        rank: int,
        in_features: int,
        out_features: int,
        seed: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("rank", rank), ("in_features", in_features), ("out_features", out_features)):
            check_positive_int(name, value)
        generator = torch.Generator(device="cpu").manual_seed(check_int("seed", seed, minimum=0))
        vera_A = _kaiming_uniform((rank, in_features), generator)  # (r, in)
        vera_B = _kaiming_uniform((out_features, rank), generator)  # (out, r)
        self.seed = seed
        self.register_buffer("vera_A", vera_A.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("vera_B", vera_B.to(device=device, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        return f"rank={self.vera_A.shape[0]}, in={self.vera_A.shape[1]}, out={self.vera_B.shape[0]}, seed={self.seed}"


def _in_out(base_layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or transformers ``Conv1D`` (stored ``(in, out)``)."""
    weight = base_weight(base_layer)
    return (weight.shape[0], weight.shape[1]) if is_hf_conv1d(base_layer) else (weight.shape[1], weight.shape[0])


class VeRA(AdditiveAdapter):
    """The VeRA vectors of one Linear or ``Conv1D`` layer, using the injection's shared projections.

    Args:
        base_layer: the layer to adapt.
        config: a :class:`VeRAConfig`.
        shared: the injection's :class:`VeRAProjections` (at least as wide as this layer).

    Example::

        >>> base = nn.Linear(8, 6)
        >>> vera = VeRA(base, VeRAConfig(rank=4), shared=VeRAProjections(4, 16, 16, seed=0))
        >>> vera.delta_weight().shape, bool(vera.delta_weight().eq(0).all())  # Λ_b = 0 at the start
        (torch.Size([6, 8]), True)
    """

    def __init__(self, base_layer: nn.Module, config: VeRAConfig, shared: VeRAProjections) -> None:
        super().__init__(base_layer, config)
        if not isinstance(shared, VeRAProjections):
            raise TypeError(f"`shared` must be the injection's VeRAProjections, got {type(shared).__name__}.")
        self.in_features, self.out_features = _in_out(base_layer)
        if shared.vera_A.shape[1] < self.in_features or shared.vera_B.shape[0] < self.out_features:
            raise ValueError(
                f"`shared` projections are {tuple(shared.vera_B.shape[:1])} x {tuple(shared.vera_A.shape[1:])}, "
                f"smaller than this layer ({self.out_features} x {self.in_features})."
            )
        self.r = config.rank
        self.projections = shared
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        weight = base_weight(base_layer)
        dtype = weight.dtype if weight.is_floating_point() else None
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=weight.device, dtype=dtype))
        self.vera_lambda_d = nn.Parameter(torch.full((self.r,), config.d_initial, device=weight.device, dtype=dtype))

    absorbs_scale = True

    def store_scale(self, scale: float) -> None:
        self.vera_lambda_b.mul_(scale)

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        projections = self.projections
        return projections.vera_A[:, : self.in_features], projections.vera_B[: self.out_features, :]

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        vera_A, vera_B = self._sliced()
        x = x.to(self.vera_lambda_d.dtype)
        h = self.vera_lambda_d * F.linear(self.dropout(x), vera_A)  # (…, in) -> (…, r)
        lambda_b = self.times_scale(self.vera_lambda_b)
        return result + (lambda_b * F.linear(h, vera_B)).to(result.dtype)  # (…, r) -> (…, out)

    def delta_weight(self, layer: AdaptedLayer | None = None) -> torch.Tensor:
        """``Λ_b·B·Λ_d·A`` (times :attr:`scale`) in float32, shaped like the stored base weight (no ``layer``
        needed)."""
        vera_A, vera_B = (t.float() for t in self._sliced())
        delta = (self.times_scale(self.vera_lambda_b).float()[:, None] * vera_B) @ (
            self.vera_lambda_d.float()[:, None] * vera_A
        )
        return delta.T if self.kind == "hf_conv1d" else delta  # Conv1D stores (in, out)

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_features}, out={self.out_features}"


def _to_peft(config: VeRAConfig, layers: dict[str, AdaptedLayer]) -> dict[str, Any]:
    return {
        "r": config.rank,
        "projection_prng_key": config.projection_prng_key,
        "save_projection": config.save_projection,
        "vera_dropout": config.dropout,
        "d_initial": config.d_initial,
        "fan_in_fan_out": any(a.kind == "hf_conv1d" for layer in layers.values() for a in layer.adapters.values()),
        "bias": "none",
        "init_weights": True,
    }


def _from_peft(peft_config: dict[str, Any]) -> VeRAConfig:
    used = []  # layers_to_transform / layers_pattern: the file's tensors name the layers they chose
    if peft_config.get("bias", "none") != "none":
        used.append(f"bias={peft_config['bias']!r}")
    if used:
        raise ValueError(f"uses PEFT VeRA options that peft_callbacks does not support: {', '.join(used)}")
    return VeRAConfig(
        rank=peft_config.get("r"),
        projection_prng_key=peft_config.get("projection_prng_key", 0),
        save_projection=bool(peft_config.get("save_projection", True)),
        dropout=peft_config.get("vera_dropout") or 0.0,
        d_initial=peft_config.get("d_initial", 0.1),
        train_head=False,
    )


def _export_shared(config: VeRAConfig, adapters: dict[str, VeRA]) -> dict[str, torch.Tensor]:
    if not config.save_projection:
        return {}
    projections = next(iter(adapters.values())).projections
    return {"vera_A": projections.vera_A, "vera_B": projections.vera_B}


def _import_shared(peft_config: dict[str, Any], adapters: dict[str, VeRA], tensors: dict[str, torch.Tensor]) -> None:
    unknown = sorted(set(tensors) - {"vera_A", "vera_B"})
    if unknown:
        raise ValueError(f"tensors {unknown} are not VeRA's (expected base_model.vera_A / base_model.vera_B).")
    projections = next(iter(adapters.values())).projections
    for name, stored in tensors.items():
        ours = getattr(projections, name)
        if stored.shape != ours.shape or not torch.equal(stored.to(ours.dtype), ours):
            raise ValueError(
                f"the stored projection {name} {tuple(stored.shape)} is not the one projection_prng_key="
                f"{projections.seed} draws for these layers {tuple(ours.shape)}; peft_callbacks rebuilds the "
                f"projections from the seed, so it cannot hold other ones."
            )


class VeRAMethod(LayerMethod):
    """VeRA: trained vectors around frozen random projections shared by every adapted Linear / ``Conv1D``."""

    name = "vera"
    title = "VeRA"
    config_class = VeRAConfig
    examples = {
        "plain": VeRAConfig(rank=16),
        "dropout": VeRAConfig(rank=16, dropout=0.1, d_initial=0.5, save_projection=False, projection_prng_key=3),
    }
    adapter_classes = {"linear": VeRA, "hf_conv1d": VeRA}
    peft = PeftMapping("VERA", _to_peft, _from_peft, export_shared=_export_shared, import_shared=_import_shared)

    def shared(self, model: nn.Module, targets: list[str], config: VeRAConfig, adapter_name: str) -> VeRAProjections:
        bases = [model.get_submodule(path) for path in targets]
        bases = [b.base_layer if isinstance(b, AdaptedLayer) else b for b in bases]
        sizes = [_in_out(b) for b in bases]
        weight = base_weight(bases[0])
        return VeRAProjections(
            config.rank,
            max(i for i, _ in sizes),
            max(o for _, o in sizes),
            config.projection_prng_key,
            device=weight.device,
            dtype=weight.dtype if weight.is_floating_point() else None,
        )

    def describe(self, config: VeRAConfig) -> str:
        return f"r={config.rank} seed={config.projection_prng_key}"


register_method(VeRAMethod())
