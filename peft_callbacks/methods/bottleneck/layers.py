r"""Bottleneck adapters (Houlsby et al. 2019, §2.1; Pfeiffer et al. 2021): a small residual MLP on a sub-layer output.

::

    h ──┬──► down (d → m) ──► activation ──► up (m → d) ──┐
        │                                                 ▼
        └────────────────────────────────────────────────(+) ──► h + up(act(down(h)))

``up`` starts at zero, so an adapter is the identity until training moves it. One adapter holds
``2·d·m + d + m`` parameters (two weight matrices and their biases). Its
:attr:`~peft_callbacks.engine.scaling.Scalable.scale` ``s`` scales what it adds, ``h + s·up(act(down(h)))`` (``s = 0``:
the identity); absorbing it scales ``up``'s weight and bias.

Example::

    >>> import torch
    >>> adapter = BottleneckAdapter(dim=32, bottleneck=4)
    >>> h = torch.randn(2, 5, 32)
    >>> torch.equal(adapter(h), h)  # identity at injection
    True
    >>> sum(p.numel() for p in adapter.parameters()) == 2 * 32 * 4 + 32 + 4
    True
"""

from __future__ import annotations

import torch
import torch.nn as nn

from peft_callbacks._validation import check_choice, check_positive_int
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.engine.scaling import Scalable

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(Scalable, PEFTModule):
    """``h + up(act(down(h)))`` on the last dimension of ``h``.

    Args:
        dim: width ``d`` of the hidden states the adapter sits on.
        bottleneck: width ``m`` of the bottleneck (Houlsby et al. 2019 use 8-256).
        activation: one of ``"gelu"``, ``"relu"``, ``"silu"``, ``"tanh"``.

    Example::

        >>> BottleneckAdapter(dim=768, bottleneck=64)
        BottleneckAdapter(
          dim=768, bottleneck=64
          (down): Linear(in_features=768, out_features=64, bias=True)
          (act): GELU(approximate='none')
          (up): Linear(in_features=64, out_features=768, bias=True)
        )
    """

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu") -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("bottleneck", bottleneck)
        check_choice("activation", activation, ACTIVATIONS)
        self.dim = dim
        self.bottleneck = bottleneck
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.disabled = False

    absorbs_scale = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.scale == 0.0:
            return h
        return h + self.times_scale(self.up(self.act(self.down(h))))  # (..., d) -> (..., m) -> (..., d)

    def store_scale(self, scale: float) -> None:
        self.up.weight.mul_(scale)
        if self.up.bias is not None:
            self.up.bias.mul_(scale)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bottleneck={self.bottleneck}"

    def hook(self, module: nn.Module, args: tuple, output):
        """Forward hook for the wrapped sub-layer: pass its output (or the first item of a tuple) through."""
        if isinstance(output, torch.Tensor):
            return self(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self(output[0]),) + tuple(output[1:])
        raise TypeError(
            f"A bottleneck adapter on {type(module).__name__} expected a tensor or a tuple starting with one as its "
            f"output, got {type(output).__name__}; name a module that returns hidden states in `modules`."
        )
