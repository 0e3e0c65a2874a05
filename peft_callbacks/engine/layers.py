r"""The two building blocks of every method that adapts weight layers: :class:`Adapter` and :class:`AdaptedLayer`.

::

    AdaptedLayer("blocks.0.attn.qkv")
    ├── base_layer        the original nn.Linear / nn.Conv2d / Conv1D, kept as is (frozen), never copied
    └── adapters          nn.ModuleDict: one Adapter per adapter name
        ├── "default"     e.g. LoRALinear: lora_A, lora_B, scaling
        └── "task_b"      another adapter of the same or another method

    forward(x):  x ─► [input transforms of active adapters] ─► base_layer ─► [each active adapter(x, result)] ─► out

A method writes only its :class:`Adapter` subclasses: what the update adds to the base output (``forward``), and
how it folds into and out of the base weight (``merge_into`` / ``unmerge_from``, on float32 weights). Everything
else (which adapters are active, disabling, merging in place or for good, key layout, the base layer's attributes)
is shared here.

Every adapter also answers two questions about its update, whatever the method (what forgetting control, L2-SP and
the monitors ask, :mod:`peft_callbacks.forgetting.updates`):

* **how big is it**: :meth:`Adapter.delta_weight` (``ΔW = W' − W₀``, float32, shaped like the stored base weight,
  differentiable) and :meth:`Adapter.update_norm` (``‖ΔW‖_F``). Both have defaults built on ``merge_into``; methods
  with a closed form override them (LoRA's norm comes from two ``r × r`` Gram matrices, ``ΔW`` is never formed);
* **scale it**: :attr:`Adapter.scale` (:mod:`peft_callbacks.engine.scaling`), applied in ``forward`` and in the
  merge: ``0`` is the base layer, ``1`` the trained one, and each method's docstring says what ``s`` between means.

The wrapper forwards attribute reads it does not know to the base layer, so model code that reads ``layer.weight``,
``layer.in_features`` or ``layer.kernel_size`` keeps working.

Example::

    >>> import torch, torch.nn as nn
    >>> from peft_callbacks.methods.lora import LoRAConfig, LoRALinear
    >>> base = nn.Linear(16, 32)
    >>> layer = AdaptedLayer(base)
    >>> layer.add_adapter("default", LoRALinear(base, LoRAConfig(rank=4)))
    >>> x = torch.randn(2, 16)
    >>> torch.equal(layer(x), base(x)), layer.in_features  # B = 0 at injection; base attributes pass through
    (True, 16)
    >>> _ = nn.init.ones_(layer.adapters["default"].lora_B.weight)
    >>> torch.allclose(nn.functional.linear(x, layer.merged_weight(), base.bias), layer(x), atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn as nn

from peft_callbacks.core.kinds import (
    KIND_NAMES,
    base_weight,
    dequantized_kind,
    kinds_description,
    layer_kind,
    weight_shape,
    write_weight,
)
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.sharding import full_parameters
from peft_callbacks.engine.config import MethodConfig
from peft_callbacks.engine.scaling import Scalable

__all__ = ["DEFAULT_ADAPTER", "AdaptedLayer", "Adapter", "AdditiveAdapter", "check_finite", "upgrade_state_keys"]

DEFAULT_ADAPTER = "default"
_BASE, _ADAPTERS = "base_layer", "adapters"


class Adapter(Scalable, PEFTModule):
    """One method's trainable update of one base layer, under one adapter name.

    Subclasses create their tensors in ``__init__(base_layer, config)`` and implement :meth:`forward`; mergeable
    methods also implement :meth:`merge_into` and :meth:`unmerge_from`. Both apply :attr:`scale` (see
    :mod:`peft_callbacks.engine.scaling`); :meth:`delta_weight` and :meth:`update_norm` then come for free, and a
    method with a closed form for them overrides them. Methods that change the layer's *input*
    (IA3 on feed-forward layers, OFT) set ``changes_input = True`` and implement :meth:`transform_input`.

    A subclass for ``"linear"`` layers adapts quantized linear layers too (``"linear_4bit"``, ``"linear_8bit"``,
    when the method's dispatch table lists them): its forward gets the quantized layer's output, and the weight it
    reads through :func:`~peft_callbacks.core.kinds.base_weight` is the dequantized one.

    Args:
        base_layer: the layer this adapter updates (read for shapes, device and dtype; not stored).
        config: the method's config (shared by all its adapters; not a module, never in ``state_dict``).
    """

    method: ClassVar[str] = ""  # the registered method's name, set by ``register_method``
    base_kind: ClassVar[str | None] = None  # the layer kind a subclass adapts (None: any the method dispatches here)
    changes_input: ClassVar[bool] = False
    mergeable: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module, config: MethodConfig) -> None:
        super().__init__()
        kind = self.kind_of(base_layer)
        if kind is None or (self.base_kind is not None and dequantized_kind(kind) != self.base_kind):
            wanted = f"a {self.base_kind} layer" if self.base_kind else "a weight layer the method supports"
            raise TypeError(
                f"`base_layer` of {type(self).__name__} must be {wanted} ({kinds_description(tuple(KIND_NAMES))}, "
                f"each with its own adapter class; the method's dispatch table picks it), got "
                f"{type(base_layer).__name__}."
            )
        if not isinstance(config, MethodConfig):
            raise TypeError(f"`config` of {type(self).__name__} must be a method config, got {type(config).__name__}.")
        self.config = config
        self.kind = kind
        self.weight_shape = weight_shape(base_layer) if kind in KIND_NAMES else ()  # full; quantized: (out, in)

    @classmethod
    def kind_of(cls, base_layer: Any) -> str | None:
        """The kind of ``base_layer`` as this adapter sees it (:func:`~peft_callbacks.core.kinds.layer_kind`);
        ``None`` when it cannot adapt it."""
        return layer_kind(base_layer) if isinstance(base_layer, nn.Module) else None

    def transform_input(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        """The input the base layer sees (only called when ``changes_input``)."""
        return x

    def fused(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor | None:
        """The whole layer's output in one step, when this adapter is the only active one and has a faster way than
        base layer + :meth:`forward` (LoRA's single autograd node); ``None`` to take the plain path."""
        return None

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The layer's output with this adapter applied, given its input ``x`` and the output so far."""
        raise NotImplementedError

    def tensor_parallel_dims(self) -> dict[str, tuple[int | None, int | None]] | None:
        """For each of this adapter's tensors (by ``named_parameters`` name): which of its dimensions runs along the
        base layer's outputs and which along its inputs (``None``: neither). Tensor parallelism splits each tensor
        the way its base is split (:mod:`peft_callbacks.core.tensor_parallel`); ``None`` (the default): this method
        cannot follow a split base, and surgery on one is refused."""
        return None

    def merge_into(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        """The base weight (float32, shaped as stored) with this adapter folded in."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base layer.")

    def unmerge_from(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merge_into`."""
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged from its base layer.")

    def merged(self, layer: AdaptedLayer, weight: torch.Tensor) -> None:
        """Called by :meth:`AdaptedLayer.merge` once this adapter is folded into ``weight`` (the weight before it),
        for adapters that need something of that moment to unmerge exactly (DoRA's scale)."""

    def merge_bias_into(self, layer: AdaptedLayer, bias: torch.Tensor) -> torch.Tensor:
        """The base bias (float32) with this adapter folded in; most methods leave it as it is (IA3 scales it)."""
        return bias

    def unmerge_bias_from(self, layer: AdaptedLayer, bias: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merge_bias_into`."""
        return bias

    # -- the update: its size (the scale is in Scalable) -------------------------------------------------------------
    def delta_weight(self, layer: AdaptedLayer | None = None) -> torch.Tensor:
        """``ΔW = W' − W₀``: what this adapter changes in its base layer's weight at its current :attr:`scale`, in
        float32, shaped like the stored base weight, differentiable in the adapter's tensors.

        By default ``merge_into(layer, W₀) − W₀``, which needs the ``layer`` the adapter lives in; methods with a
        closed form that does not depend on ``W₀`` (LoRA's ``s·B·A``) override it and need no layer.

        Raises:
            TypeError: no ``layer`` for a method whose update depends on the base weight.
        """
        if not isinstance(layer, AdaptedLayer):
            raise TypeError(
                f"`layer` of {type(self).__name__}.delta_weight must be the AdaptedLayer it lives in (its update "
                f"depends on the base weight), got {type(layer).__name__}."
            )
        weight = base_weight(layer.base_layer).float()
        return self.merge_into(layer, weight) - weight

    def delta_weights(self, layer: AdaptedLayer) -> dict[str, torch.Tensor]:
        """``{base tensor name: ΔW}`` of every weight this adapter changes: ``{"weight": delta_weight(layer)}`` for
        a weight layer (a bias change, IA3's, is not a weight), one entry per parameter for parameter adapters."""
        return {"weight": self.delta_weight(layer)}

    def update_norm(self, layer: AdaptedLayer, *, squared: bool = False) -> torch.Tensor:
        """``‖ΔW‖_F`` over :meth:`delta_weights` (float32 scalar, differentiable). ``squared=True`` gives ``‖ΔW‖²``,
        whose gradient is defined at ``ΔW = 0`` too (use it in a penalty)."""
        return norm_of(self.delta_weights(layer).values(), squared)


class AdditiveAdapter(Adapter):
    """An :class:`Adapter` whose update is a weight ``ΔW`` added to the base weight, independent of it: merging adds
    :meth:`delta_weight`, unmerging subtracts it (VeRA, AdaLoRA, LoHa, LoKr).

    Subclasses implement :meth:`delta_weight` in closed form (float32, shaped like the stored base weight, at the
    current :attr:`scale`, no ``layer`` needed); the base class's default, ``merge_into(W₀) − W₀``, would recurse.
    """

    def delta_weight(self, layer: AdaptedLayer | None = None) -> torch.Tensor:
        """``ΔW`` in closed form; every additive adapter must implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement delta_weight (an additive adapter).")

    def merge_into(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight()

    def unmerge_from(self, layer: AdaptedLayer, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight()


class AdaptedLayer(PEFTModule):
    """A base weight layer plus its adapters (see the module docstring).

    Attributes:
        base_layer: the wrapped original layer.
        adapters: ``{adapter name: Adapter}``.
        active_adapters: names whose update the forward pass applies, in order.
        merged_adapters: names currently folded into ``base_layer``'s weight (see :meth:`merge`).
        disabled: skip every adapter (the base layer alone), e.g. to score the original model.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.check_base_layer(base_layer)
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._register_load_state_dict_pre_hook(_upgrade_keys, with_module=True)

    @classmethod
    def check_base_layer(cls, base_layer: Any) -> None:
        """Refuse a module this wrapper cannot hold (here: anything but a weight layer)."""
        if not isinstance(base_layer, nn.Module) or layer_kind(base_layer) is None:
            raise TypeError(
                f"`base_layer` must be a weight layer ({kinds_description(tuple(KIND_NAMES))}), got "
                f"{type(base_layer).__name__}."
            )

    # -- adapters ---------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: Adapter, *, active: bool = True) -> None:
        """Add ``adapter`` under ``name`` (and make it active)."""
        if name in self.adapters:
            raise ValueError(f"This layer already has an adapter named {name!r}; delete it first or pick another.")
        self.adapters[name] = adapter
        if active:
            self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> Adapter:
        """Take the adapter ``name`` out (it must not be merged) and return it."""
        if name in self.merged_adapters:
            raise ValueError(f"Adapter {name!r} is merged into the base weight; unmerge it before deleting it.")
        self.active_adapters = [n for n in self.active_adapters if n != name]
        return self.adapters.pop(name)

    def set_active(self, names: Iterable[str]) -> None:
        """Apply exactly these adapters, in this order."""
        names = list(names)
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise ValueError(f"No adapter named {missing} here; this layer has {list(self.adapters)}.")
        if self.merged_adapters:
            raise ValueError(f"Adapters {self.merged_adapters} are merged here; unmerge before switching adapters.")
        self.active_adapters = names

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.__dict__.get("_called"):  # the model calls this layer (see engine.usage)
            self.__dict__["_called"] = True
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        rows = self.__dict__.get("row_adapters")  # set by `adapters_per_row`: one adapter name per row of x
        if rows is not None:
            from peft_callbacks.engine.mixed import mixed_forward  # here: mixed.py finds layers through this module

            return mixed_forward(self, x, rows, *args, **kwargs)
        names = [name for name in self.active_adapters if name not in self.merged_adapters]
        return self.forward_with(x, names, *args, **kwargs)

    def forward_with(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The layer's output with exactly the adapters ``names`` applied (unmerged ones; none: the base layer). An
        adapter at scale 0 changes nothing and is skipped, so the layer computes its base layer's output to the bit."""
        adapters = [self.adapters[name] for name in names if self.adapters[name].scale != 0.0]
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        # an adapter with hooks of its own (an FSDP2 unit: its hooks gather its shards) must be called as a module
        hooked = adapters[0]._forward_pre_hooks or adapters[0]._forward_hooks
        if len(adapters) == 1 and not args and not kwargs and not hooked:
            fused = adapters[0].fused(self, x)
            if fused is not None:
                return fused
        inner = x
        for adapter in adapters:
            if adapter.changes_input:
                inner = _transform_input(adapter, self, inner)
        result = self.base_layer(inner, *args, **kwargs)
        for adapter in adapters:
            result = adapter(self, x, result)
        return result

    # -- weights ----------------------------------------------------------------------------------------------
    def merge_order(self, names: Iterable[str] | None = None) -> list[str]:
        """The order in which the adapters ``names`` (default: the active ones) fold into the weight so that the
        merged layer computes what :meth:`forward` does.

        The forward pass feeds the base layer ``Tₖ(…T₁(x))`` (each input transform in turn) and lets the other
        adapters act on its output in their order; in weight space the input transforms compose right to left
        (``W·Mₖ·…·M₁``). So the input-changing adapters fold in first, the last one first, then the others in order.

        Example::

            >>> import torch.nn as nn
            >>> from peft_callbacks.methods.ia3 import IA3, IA3Config
            >>> base = nn.Linear(4, 4)
            >>> layer = AdaptedLayer(base)
            >>> layer.add_adapter("out", IA3(base, IA3Config()))
            >>> layer.add_adapter("in_1", IA3(base, IA3Config(), feedforward=True))
            >>> layer.add_adapter("in_2", IA3(base, IA3Config(), feedforward=True))
            >>> layer.merge_order()
            ['in_2', 'in_1', 'out']
        """
        names = list(self.active_adapters if names is None else names)
        inputs = [n for n in names if self.adapters[n].changes_input]
        return [*reversed(inputs), *(n for n in names if not self.adapters[n].changes_input)]

    def merged_weight(self, names: Iterable[str] | None = None) -> torch.Tensor:
        """The base weight with the adapters ``names`` (default: the active ones) folded in, in float32, in
        :meth:`merge_order`.

        Differentiable in the adapters' tensors (DoRA's norm is a constant, as in its paper).
        """
        weight = base_weight(self.base_layer).float()
        for name in self.merge_order(names):
            weight = self.adapters[name].merge_into(self, weight)
        return weight

    def merged_bias(self, names: Iterable[str] | None = None) -> torch.Tensor | None:
        """The base bias with the adapters ``names`` (default: the active ones) folded in, in float32 (or None)."""
        bias = getattr(self.base_layer, "bias", None)
        if not isinstance(bias, torch.Tensor):
            return None
        bias = bias.float()
        for name in self.merge_order(names):
            bias = self.adapters[name].merge_bias_into(self, bias)
        return bias

    def delta_weight(self, names: Iterable[str] | None = None) -> torch.Tensor:
        """``merged_weight(names) − W₀`` in float32: what the adapters change."""
        return self.merged_weight(names) - base_weight(self.base_layer).float()

    # -- the update, as forgetting control reads it -------------------------------------------------------------
    def applied_adapters(self) -> list[str]:
        """The adapters the forward pass applies now: the active ones that are not merged into the base."""
        return [name for name in self.active_adapters if name not in self.merged_adapters]

    def weight_names(self, names: Iterable[str] | None = None) -> list[str]:
        """The base tensors whose change is the update's size: ``["weight"]`` (parameter adapters: theirs)."""
        return ["weight"]

    def base_tensor(self, key: str) -> torch.Tensor:
        """The base layer's tensor ``key`` as the adapters see it, float32 (a quantized weight dequantized)."""
        return base_weight(self.base_layer).float() if key == "weight" else self.base_layer.get_parameter(key).float()

    def delta_weights(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``{weight name: ΔW}`` that the adapters ``names`` (default: :meth:`applied_adapters`) make, float32,
        differentiable. One adapter answers itself (:meth:`Adapter.delta_weights`: closed forms where it has them);
        several are composed as the merge composes them."""
        names = self.applied_adapters() if names is None else list(names)
        if len(names) == 1:
            return self.adapters[names[0]].delta_weights(self)
        merged = self.merged_state(names)
        return {key: merged[key] - self.base_tensor(key) for key in self.weight_names(names)}

    def update_norm(self, names: Iterable[str] | None = None, *, squared: bool = False) -> torch.Tensor:
        """``‖ΔW‖_F`` of :meth:`delta_weights` (float32 scalar, differentiable; ``squared``: ``‖ΔW‖²``). One adapter
        answers itself (LoRA without forming ``ΔW``)."""
        names = self.applied_adapters() if names is None else list(names)
        if len(names) == 1:
            return self.adapters[names[0]].update_norm(self, squared=squared)
        return norm_of(self.delta_weights(names).values(), squared)

    def merged_state(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``{base tensor name: value}`` (float32) of every base tensor the adapters ``names`` (default: the active
        ones) change, with them folded in: ``weight`` (and ``bias`` where the layer has one) here."""
        weight, bias = self.merged_weight(names), self.merged_bias(names)
        return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}

    def unmerged_state(self) -> dict[str, torch.Tensor]:
        """:meth:`merged_state`'s inverse for the merged adapters: the base tensors with them taken out (float32)."""
        bias = getattr(self.base_layer, "bias", None)
        weight = base_weight(self.base_layer).float()
        bias = bias.float() if isinstance(bias, torch.Tensor) else None
        for name in reversed(self.merge_order(self.merged_adapters)):
            weight = self.adapters[name].unmerge_from(self, weight)
            bias = None if bias is None else self.adapters[name].unmerge_bias_from(self, bias)
        return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}

    def write_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write :meth:`merged_state`'s tensors into the base layer, each cast to its stored dtype, in place."""
        write_weight(self.base_layer, tensors["weight"], tensors.get("bias"))

    def tell_merged(self, names: list[str]) -> None:
        """Tell each adapter (:meth:`Adapter.merged`) the weight it is folded into, in :meth:`merge_order`."""
        before = base_weight(self.base_layer).float()
        for name in self.merge_order(names):
            self.adapters[name].merged(self, before)
            before = self.adapters[name].merge_into(self, before)

    def merge(self, names: Iterable[str] | None = None) -> None:
        """Fold the active adapters (or ``names``) into the base weight in place; the wrapper stays.

        Computed in float32 and cast back once; refused (the layer unchanged) when the result is not finite.
        Merged adapters are skipped by the forward pass until :meth:`unmerge`.
        """
        if self.merged_adapters:
            raise ValueError(f"Adapters {self.merged_adapters} are merged already; unmerge them first.")
        names = list(self.active_adapters if names is None else names)
        with full_parameters(self, writeback=True), torch.no_grad():  # sharded tensors: gathered, then written back
            state = self.merged_state(names)
            for key, tensor in state.items():
                check_finite(f"into this layer's {key}", tensor)
            self.tell_merged(names)
            self.write_state(state)
        self.merged_adapters = names
        self.__dict__["_merged_scales"] = {name: self.adapters[name].scale for name in names}

    def unmerge(self) -> None:
        """Take the merged adapters out of the base weight again (float32, cast back once)."""
        if not self.merged_adapters:
            return
        scales = self.__dict__.pop("_merged_scales", {})
        current = {name: adapter.scale for name, adapter in self.adapters.items()}
        try:  # take out what went in: each adapter at the scale it was merged with
            for name, scale in scales.items():
                self.adapters[name].scale = scale
            with full_parameters(self, writeback=True), torch.no_grad():
                state = self.unmerged_state()
                self.write_state(state)
        finally:
            for name, scale in current.items():
                self.adapters[name].scale = scale
        self.merged_adapters = []

    # -- the base layer's attributes pass through ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get(_BASE)
            if base is None or name.startswith("__"):
                raise
            if name == "weight":  # read around the layer: if it is never called, its adapters never run
                self.__dict__["_weight_read"] = True
            return getattr(base, name)

    def extra_repr(self) -> str:
        merged = f", merged={self.merged_adapters}" if self.merged_adapters else ""
        return f"active={self.active_adapters}{merged}" + (", disabled" if self.disabled else "")


def norm_of(tensors: Iterable[torch.Tensor], squared: bool = False) -> torch.Tensor:
    """``‖·‖_F`` of ``tensors`` taken together (float32 scalar; ``squared``: its square), differentiable.

    Example::

        >>> norm_of([torch.full((2,), 3.0), torch.full((1,), 4.0)], squared=True)
        tensor(34.)
    """
    total = torch.zeros(())
    for tensor in tensors:
        value = tensor.float().pow(2).sum()
        total = total.to(value.device) + value
    return total if squared else total.sqrt()


def check_finite(where: str, weight: torch.Tensor) -> None:
    """Refuse a merged weight with NaN/Inf values (the adapter diverged); ``meta`` tensors pass.

    ``where`` completes "Refusing to merge …", e.g. ``"LoRA into 'blocks.0.attn.qkv'"``.
    """
    if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
        raise ValueError(
            f"Refusing to merge {where}: the merged weight has NaN or Inf values (the adapter's tensors "
            f"diverged during training). The model was left unmerged."
        )


def _upgrade_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-time pre-hook: checkpoints of version 0.1 kept one adapter's tensors right under the layer
    (``qkv.lora_A.weight``); they now live under ``adapters.default`` (``qkv.adapters.default.lora_A.weight``)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        first = key[len(prefix) :].split(".", 1)[0]
        if first not in (_BASE, _ADAPTERS):
            state_dict[f"{prefix}{_ADAPTERS}.{DEFAULT_ADAPTER}.{key[len(prefix) :]}"] = state_dict.pop(key)


def _transform_input(adapter: Adapter, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
    """``adapter.transform_input(layer, x)``; through the module call when the adapter has hooks of its own (an FSDP2
    unit gathers its shards in a forward pre-hook and reduces their gradients from its output), so that they run."""
    if not (adapter._forward_pre_hooks or adapter._forward_hooks):
        return adapter.transform_input(layer, x)
    adapter.forward = lambda layer, x, result: adapter.transform_input(layer, x)  # shadows the method, this call only
    try:
        return adapter(layer, x, None)
    finally:
        del adapter.forward


def upgrade_state_keys(tensors: dict[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """Move version-0.1 keys (``qkv.lora_A.weight``) to where they live now (``qkv.adapters.default.lora_A.weight``)
    when the moved key is one of ``known``; other keys stay as they are.

    Example::

        >>> upgrade_state_keys({"0.lora_A.weight": 1, "1.bias": 2}, ["0.adapters.default.lora_A.weight"])
        {'0.adapters.default.lora_A.weight': 1, '1.bias': 2}
    """
    known = set(known)
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        moved = (".".join([*parts[:i], _ADAPTERS, DEFAULT_ADAPTER, *parts[i:]]) for i in range(1, len(parts)))
        out[next((m for m in moved if m in known), key) if key not in known else key] = value
    return out
