r"""LoKr (Yeh et al. 2024, "LyCORIS", §3.2): the update is the Kronecker product of a small and a low-rank matrix.

::

    ΔW = (alpha / r) · W1 ⊗ W2          W1: (a, c)    W2: (b, d·k…)    out = a·b, in = c·d

The widths are split into two factors each (:func:`factorization`: near the square root, or ``decompose_factor``).
``W2`` is stored in full when that is no bigger than a rank-``r`` pair would be (``r ≥ max(b, d) / 2``), else as
``W2a·W2b`` (or, with ``use_effective_conv2d`` on a kernel larger than 1, through a core tensor ``T2``); ``W1`` is
stored in full unless ``decompose_both`` and ``r < max(a, c) / 2``. These are HF PEFT's rules, so the same config
creates the same tensors (``lokr_w1``, ``lokr_w2_a`` …) with the same shapes, the same tensors give the same outputs
as ``peft.LoKrConfig``, and directories move between the two libraries.

``W1`` (or ``W1a``) starts at zero, the others Kaiming-uniform, so an adapted layer computes what the base did until
training moves it. ``rank_dropout`` and ``module_dropout`` act during training only
(:mod:`peft_callbacks.methods.lycoris`).

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.engine import inject
    >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    >>> layer = inject(model, LoKrConfig(rank=4, alpha=4, target_modules=["0"]))[0]
    >>> lokr = layer.adapters["default"]  # out 256 = 16·16, in 64 = 8·8
    >>> {name: tuple(p.shape) for name, p in lokr.named_parameters()}  # W2 at rank 4: (16, 4)·(4, 8)
    {'lokr_w1': (16, 8), 'lokr_w2_a': (16, 4), 'lokr_w2_b': (4, 8)}
    >>> sum(p.numel() for p in lokr.parameters()), layer.weight.numel()  # LoRA at rank 4 would train 1280
    (224, 16384)
    >>> with torch.no_grad():
    ...     _ = lokr.lokr_w1.normal_()
    >>> delta = torch.kron(lokr.lokr_w1, lokr.lokr_w2_a @ lokr.lokr_w2_b) * lokr.scaling  # (16·16, 8·8)
    >>> torch.allclose(lokr.delta_weight(), delta)
    True
    >>> x = torch.randn(3, 64)
    >>> torch.allclose(layer(x), layer.base_layer(x) + x @ delta.T, atol=1e-5)
    True
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from peft_callbacks._validation import check_bool, check_int
from peft_callbacks.engine import register_method
from peft_callbacks.methods.lycoris import LycorisAdapter, LycorisConfig, LycorisMethod, kind_classes, peft_mapping

__all__ = ["LoKrAdapter", "LoKrConfig", "LoKrConv", "LoKrConv1D", "LoKrLinear", "factorization"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoKrConfig(LycorisConfig, method="lokr"):
    """LoKr: a Kronecker product ``W1 ⊗ W2`` scaled by ``alpha / rank`` (HF PEFT's ``LoKrConfig``).

    Attributes:
        rank: the rank ``r`` of the factored matrices (> 0) [PEFT: ``r``].
        alpha: the update is multiplied by ``alpha / rank`` (> 0).
        rank_dropout: probability of zeroing each output row of the update during training, in ``[0, 1)``.
        module_dropout: probability of skipping a layer's whole update for one training step, in ``[0, 1)``.
        use_effective_conv2d: factor kernels larger than 1 through a core tensor ``lokr_t2``.
        decompose_both: also factor ``W1`` as ``W1a·W1b`` when that is smaller.
        decompose_factor: split each width as ``(f, width / f)`` when ``f`` divides it; ``-1`` (default) splits
            near the square root (see :func:`factorization`).
        rank_dropout_scale: rescale the rows ``rank_dropout`` keeps by the inverse of the kept fraction.

    Example::

        >>> LoKrConfig(rank=4, decompose_both=True, decompose_factor=8).to_dict()["decompose_factor"]
        8
        >>> LoKrConfig(decompose_factor=0)
        Traceback (most recent call last):
        ...
        ValueError: `decompose_factor` must be -1 (split near the square root) or an int >= 1, got 0.
    """

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def validate(self) -> None:
        super().validate()
        check_bool("decompose_both", self.decompose_both)
        if check_int("decompose_factor", self.decompose_factor) != -1 and self.decompose_factor < 1:
            raise ValueError(
                f"`decompose_factor` must be -1 (split near the square root) or an int >= 1, "
                f"got {self.decompose_factor!r}."
            )
        check_bool("rank_dropout_scale", self.rank_dropout_scale)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` as ``m · n`` with ``m ≤ n`` (LyCORIS's rule, as in HF PEFT).

    ``factor`` dividing ``dimension`` gives ``(factor, dimension / factor)``; otherwise ``m`` grows through the
    divisors of ``dimension`` while ``m + n`` shrinks and ``m`` stays at most ``factor`` (``-1``: no bound, i.e. the
    divisor pair nearest the square root).

    Example::

        >>> factorization(256), factorization(128), factorization(127), factorization(128, 4), factorization(96, 5)
        ((16, 16), (8, 16), (1, 127), (4, 32), (4, 24))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > bound:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrAdapter(LycorisAdapter):
    """A LoKr update of one layer: ``lokr_w1`` (or ``lokr_w1_a``/``lokr_w1_b``) and ``lokr_w2`` (or
    ``lokr_w2_a``/``lokr_w2_b``, plus ``lokr_t2`` for a factored kernel), in PEFT's shapes.

    Args:
        base_layer: the layer to adapt (read for its shape, device and dtype).
        config: a :class:`LoKrConfig`.
    """

    def parameter_shapes(self, config: LoKrConfig) -> dict[str, tuple[int, ...]]:
        self.scale_rank_dropout = config.rank_dropout_scale
        r, kernel = self.r, self.kernel_size
        in_m, in_n = factorization(self.in_features, config.decompose_factor)
        out_l, out_k = factorization(self.out_features, config.decompose_factor)
        self.full_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
        self.full_w2 = r >= max(out_k, in_n) / 2
        shapes = {"lokr_w1": (out_l, in_m)} if self.full_w1 else {"lokr_w1_a": (out_l, r), "lokr_w1_b": (r, in_m)}
        if self.full_w2:
            shapes["lokr_w2"] = (out_k, in_n, *kernel)
        elif self.effective_conv:
            shapes.update(lokr_t2=(r, r, *self._core_shape()), lokr_w2_a=(r, out_k), lokr_w2_b=(r, in_n))
        else:
            shapes.update(lokr_w2_a=(out_k, r), lokr_w2_b=(r, in_n * math.prod(kernel)))
        return shapes

    def reset_parameters(self) -> None:
        """``W1`` (or ``W1a``) at zero, so ``ΔW = 0``; the others Kaiming-uniform, as PEFT does."""
        if self.full_w1:
            nn.init.zeros_(self.lokr_w1)
        else:
            nn.init.zeros_(self.lokr_w1_a)
            self.kaiming_("lokr_w1_b")
        names = ("lokr_w2",) if self.full_w2 else ("lokr_w2_a", "lokr_w2_b", *(("lokr_t2",) * self.effective_conv))
        self.kaiming_(*names)

    def update_factor(self) -> torch.Tensor:
        return self.lokr_w1 if self.full_w1 else self.lokr_w1_a  # ΔW = c·W1 ⊗ W2: linear in W1 (or W1a)

    def kernel_delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = lambda name: self._tensor(name, dtype)  # noqa: E731
        w1 = t("lokr_w1") if self.full_w1 else t("lokr_w1_a") @ t("lokr_w1_b")  # (a, c)
        if self.full_w2:
            w2 = t("lokr_w2")  # (b, d, k…)
        elif self.effective_conv:
            w2 = torch.einsum("ij...,ip,jr->pr...", t("lokr_t2"), t("lokr_w2_a"), t("lokr_w2_b"))  # (b, d, k…)
        else:
            w2 = t("lokr_w2_a") @ t("lokr_w2_b")  # (b, d·k…)
        if w2.dim() >= 4:  # (a, c) -> (a, c, 1, …): the kernel dims come from W2. A 3-d W2 (Conv1d) is
            w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))  # left as PEFT leaves it, so the layouts agree
        # kron views its inputs: give them standard strides (an einsum can leave a size-1 dim with a stride that
        # kron cannot view; PEFT fails there, e.g. on a Conv1d with an effective kernel at rank 1)
        delta = torch.kron(_standard(w1), _standard(w2)) * self.scaling
        return delta.reshape(self.out_features, self.in_features, *self.kernel_size)


def _standard(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(tensor.shape)


LoKrLinear, LoKrConv, LoKrConv1D = kind_classes(LoKrAdapter, "LoKr")


class LoKrMethod(LycorisMethod):
    """LoKr: ``W₀x + (alpha/r)·(W1 ⊗ W2)·x`` on Linear, Conv and ``Conv1D`` layers."""

    name = "lokr"
    title = "LoKr"
    config_class = LoKrConfig
    examples = {
        "plain": LoKrConfig(rank=4, alpha=8),
        "decompose-both": LoKrConfig(rank=2, alpha=8, decompose_both=True, decompose_factor=4),
        "effective-conv2d": LoKrConfig(
            rank=2, alpha=8, use_effective_conv2d=True, rank_dropout=0.1, rank_dropout_scale=True
        ),
    }
    adapter_classes = {"linear": LoKrLinear, "conv": LoKrConv, "hf_conv1d": LoKrConv1D}
    peft = peft_mapping("LOKR", "LoKr", LoKrConfig, ("decompose_both", "decompose_factor", "rank_dropout_scale"))


register_method(LoKrMethod())
