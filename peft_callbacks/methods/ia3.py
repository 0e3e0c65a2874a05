r"""IA3 (Liu et al. 2022, "(IA)³", §3.3): learned vectors that rescale activations of frozen layers.

::

    attention-type layer:   h = l ⊙ (W₀x + b)        l: (out,)   the output is rescaled
    feed-forward layer:     h = W₀(l ⊙ x) + b        l: (in,)    the input is rescaled

``l`` starts at ones, so an adapted layer computes what the base did. The adapter's
:attr:`~peft_callbacks.engine.scaling.Scalable.scale` ``s`` uses the vector ``1 + s·(l − 1)`` (forward and merge):
the weight is then exactly ``W₀ + s·ΔW`` (and the bias ``b + s·Δb``), ``s = 0`` the base layer; absorbing the scale
writes that vector into ``l``. The paper rescales keys, values and the
intermediate activation of the feed-forward block (the input of its second projection); here every targeted layer
gets one vector, and the layers named by ``feedforward_modules`` (by default: those whose input is wider than their
output, i.e. the down-projections of MLP blocks) rescale their input. Both forms fold into the weight exactly
(``W₀·diag(l)`` or ``diag(l)·W₀``, and ``l ⊙ b`` for the bias), so IA3 merges into a plain model. Tensors are kept in
HF PEFT's shapes (``ia3_l``: ``(out, 1)`` / ``(1, in)``, convolutions ``(1, C, 1, …)``), so the same vectors give the
same outputs as ``peft.IA3Config`` and directories move between the two.

Example::

    >>> import torch
    >>> from transformers import GPT2Config, GPT2Model
    >>> from peft_callbacks.engine import inject, merge
    >>> gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=32)).eval()
    >>> ids = torch.randint(0, 32, (2, 8))
    >>> before = gpt2(ids).last_hidden_state
    >>> gpt2 = inject(gpt2, IA3Config(target_modules=["c_attn", "mlp.c_fc", "mlp.c_proj"]))
    >>> torch.equal(gpt2(ids).last_hidden_state, before)  # l = 1 at injection
    True
    >>> up, down = gpt2.h[0].mlp.c_fc, gpt2.h[0].mlp.c_proj  # transformers Conv1D, 16 -> 64 and 64 -> 16
    >>> up.adapters["default"].feedforward, down.adapters["default"].feedforward  # by shape: the down-projection
    (False, True)
    >>> l = down.adapters["default"].ia3_l  # (1, 64): one factor per input of the down-projection
    >>> with torch.no_grad():
    ...     _ = l.uniform_(0.5, 1.5)
    >>> h = torch.randn(2, 64)
    >>> torch.allclose(down(h), down.base_layer(h * l), atol=1e-6)  # W₀(l ⊙ x) + b
    True
    >>> adapted = gpt2(ids).last_hidden_state
    >>> torch.allclose(merge(gpt2)(ids).last_hidden_state, adapted, atol=1e-5)  # folded in: W₀·diag(l)
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_bool, check_patterns
from peft_callbacks.core.kinds import layer_kind, weight_shape
from peft_callbacks.core.targets import path_matches
from peft_callbacks.engine import AdaptedLayer, Adapter, LayerConfig, LayerMethod, PeftMapping, register_method

__all__ = ["IA3", "IA3Config"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(LayerConfig, method="ia3"):
    """IA3: one learned scaling vector per adapted layer (on its output, or on its input for feed-forward layers).

    Attributes:
        feedforward_modules: which targeted layers rescale their *input* (names, dotted suffixes, regexes or a list,
            as ``target_modules``); ``None`` picks the layers whose input is wider than their output (the
            down-projection of each MLP block); ``[]`` makes every layer rescale its output. Recorded as the exact
            paths it selected.

    Example::

        >>> IA3Config(target_modules=["qkv", "fc2"], feedforward_modules="fc2").feedforward_modules
        ['fc2']
    """

    feedforward_modules: str | list[str] | None = None

    def validate(self) -> None:
        super().validate()
        if self.feedforward_modules != []:  # [] (after resolving: no feed-forward layer) is a valid record
            self._set("feedforward_modules", check_patterns("feedforward_modules", self.feedforward_modules))


class IA3(Adapter):
    """An IA3 vector for one Linear, ``Conv1D`` or ``groups=1`` convolution.

    Args:
        base_layer: the layer to rescale.
        config: an :class:`IA3Config`.
        feedforward: rescale the input (``True``) or the output (``False``).
    """

    def __init__(self, base_layer: nn.Module, config: IA3Config, feedforward: bool = False) -> None:
        super().__init__(base_layer, config)
        weight, full = base_layer.weight, self.weight_shape  # read without gathering a sharded weight
        self.feedforward = self.changes_input = check_bool("feedforward", feedforward)
        if self.kind == "conv":
            channels = full[1] if feedforward else full[0]
            shape = (1, channels, *([1] * (len(full) - 2)))  # (1, C, 1, …) broadcasts over (N, C, …)
        else:
            out_features, in_features = full[::-1] if self.kind == "hf_conv1d" else full
            shape = (1, in_features) if feedforward else (out_features, 1)
        dtype = weight.dtype if weight.is_floating_point() else None
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=dtype))

    absorbs_scale = True

    def scaled_vector(self) -> torch.Tensor:
        """``1 + scale·(l − 1)``: ``l`` itself at scale 1, ones at scale 0."""
        return self.ia3_l if self.scale == 1.0 else 1 + self.scale * (self.ia3_l - 1)

    def store_scale(self, scale: float) -> None:
        self.ia3_l.copy_(1 + scale * (self.ia3_l - 1))

    def _vector(self, ndim: int) -> torch.Tensor:
        vector = self.scaled_vector()
        return vector if self.kind == "conv" else vector.flatten()  # Linear: (in,) or (out,) on the last dim

    def transform_input(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.ia3_l.dtype) * self._vector(x.ndim)).to(x.dtype)

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.feedforward:
            return result  # applied to the input already
        return (result * self._vector(result.ndim)).to(result.dtype)

    def _weight_scale(self) -> torch.Tensor:
        """``l`` shaped to multiply the stored base weight: rows (outputs) or columns (inputs)."""
        scale = self.scaled_vector().float()
        if self.kind == "conv":
            return scale if self.feedforward else scale.transpose(0, 1)  # (1, in, 1, …) or (out, 1, 1, …)
        return scale.T if self.kind == "hf_conv1d" else scale  # Conv1D stores (in, out)

    def tensor_parallel_dims(self) -> dict[str, tuple[int | None, int | None]] | None:
        if self.kind not in ("linear", "linear_4bit", "linear_8bit"):
            return None
        return {"ia3_l": (None, 1) if self.feedforward else (0, None)}  # (1, in) or (out, 1)

    def merge_into(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        return weight * self._weight_scale()

    def unmerge_from(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        return weight / self._weight_scale()

    def merge_bias_into(self, layer: AdaptedLayer, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.feedforward else bias * self.scaled_vector().float().reshape(bias.shape)

    def unmerge_bias_from(self, layer: AdaptedLayer, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.feedforward else bias / self.scaled_vector().float().reshape(bias.shape)

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}"


def _is_feedforward_by_shape(layer: nn.Module) -> bool:
    """Is the layer's input wider than its output (an MLP down-projection)?"""
    base = layer.base_layer if isinstance(layer, AdaptedLayer) else layer
    shape = weight_shape(base)
    in_features, out_features = (shape if layer_kind(base) == "hf_conv1d" else shape[1::-1])[:2]
    return in_features > out_features


def _to_peft(config: IA3Config, layers: dict[str, AdaptedLayer]) -> dict[str, Any]:
    return {
        "feedforward_modules": list(config.feedforward_modules or []),
        "fan_in_fan_out": any(a.kind == "hf_conv1d" for layer in layers.values() for a in layer.adapters.values()),
        "init_ia3_weights": True,
    }


def _from_peft(peft_config: dict[str, Any]) -> IA3Config:
    return IA3Config(feedforward_modules=peft_config.get("feedforward_modules") or [], train_head=False)


class IA3Method(LayerMethod):
    """IA3: a learned vector rescales each adapted layer's output (or input, for feed-forward layers)."""

    name = "ia3"
    title = "IA3"
    config_class = IA3Config
    examples = {
        "feedforward-by-shape": IA3Config(),  # the down-projections rescale their input, the others their output
        "outputs-only": IA3Config(feedforward_modules=[]),
    }
    adapter_classes = {"linear": IA3, "conv": IA3, "hf_conv1d": IA3, "linear_4bit": IA3, "linear_8bit": IA3}
    peft = PeftMapping("IA3", _to_peft, _from_peft)

    def resolve(self, model: nn.Module, config: IA3Config, targets: list[str]) -> IA3Config:
        patterns = config.feedforward_modules
        if patterns is None:
            chosen = [p for p in targets if _is_feedforward_by_shape(model.get_submodule(p))]
        else:
            patterns = [patterns] if isinstance(patterns, str) else patterns
            for pattern in patterns:
                if not any(path_matches(pattern, p) for p in targets):
                    raise ValueError(
                        f"`feedforward_modules` entry {pattern!r} matches none of the {len(targets)} adapted layers "
                        f"(it must name layers that target_modules selects), e.g. {targets[:4]}."
                    )
            chosen = [p for p in targets if any(path_matches(pattern, p) for pattern in patterns)]
        return config.replace(feedforward_modules=chosen)

    def create_adapter(self, model, path, base, config: IA3Config, shared) -> Adapter:
        return IA3(base, config, feedforward=path in set(config.feedforward_modules or []))

    def describe(self, config: IA3Config) -> str:
        return f"{len(config.feedforward_modules or [])} feed-forward"


register_method(IA3Method())
