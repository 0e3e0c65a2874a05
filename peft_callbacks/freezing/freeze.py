"""Freeze and unfreeze a model's layers (plain PyTorch): ``freeze=N``, ``"backbone"`` or name patterns.

Freezing composes with other surgery: a :class:`LayerFreezer` remembers which parameters were trainable when it was
created (after LoRA, say, only the LoRA factors and the head), and unfreezing a layer gives back exactly those. So
"unfreeze layer 3" means "train its LoRA factors" on a LoRA model and "train all its weights" on a plain one.
BatchNorm layers inside frozen layers keep their running statistics frozen (eval mode through ``model.train()``)
unless ``train_bn=True``, which leaves their affine weights trainable and their statistics updating.

Example::

    >>> import timm
    >>> model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    >>> freezer = freeze_layers(model, freeze=4)  # stem, layer1, layer2, layer3
    >>> sorted(freezer.frozen)
    [0, 1, 2, 3]
    >>> model.layer3[0].conv1.weight.requires_grad, model.layer4[0].conv1.weight.requires_grad
    (False, True)
    >>> freezer.restore()  # everything as it was
    >>> model.layer3[0].conv1.weight.requires_grad
    True
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from peft_callbacks._validation import check_bool, check_int, check_module, check_patterns
from peft_callbacks.core.params import freeze_batchnorm_stats, has_frozen_batchnorm_stats, unfreeze_batchnorm_stats
from peft_callbacks.core.targets import in_subtree, path_matches
from peft_callbacks.freezing.layers import Layer, split_layers

log = logging.getLogger(__name__)

FreezeSpec = int | str | list[str]


class LayerFreezer:
    """Freezes and unfreezes whole layers of one model, and can put everything back.

    Args:
        model: the model; parameters trainable now are the ones unfreezing gives back.
        layers: the units to freeze; by default :func:`split_layers` of ``model``.
        train_bn: keep BatchNorm layers inside frozen layers trainable (weights and running statistics).
        coarse: passed to :func:`split_layers` when ``layers`` is not given.

    Attributes:
        frozen: indices (into ``layers``) of the layers frozen now.

    Example::

        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        >>> freezer = LayerFreezer(model)
        >>> [layer.name for layer in freezer.layers]
        ['0', '1', '2']
        >>> freezer.freeze([0, 1])
        >>> [p.requires_grad for p in model.parameters()]
        [False, False, False, False, True, True]
        >>> len(freezer.unfreeze([1]))  # the BatchNorm's weight and bias train again
        2
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[Layer] | None = None,
        *,
        train_bn: bool = False,
        coarse: bool = False,
    ) -> None:
        self.model = check_module("model", model)
        if layers is not None and (
            not isinstance(layers, (list, tuple)) or not all(isinstance(x, Layer) for x in layers)
        ):
            raise TypeError(
                f"`layers` must be None or a list of Layer objects from split_layers(model), got "
                f"{type(layers).__name__} {layers!r}."
            )
        if layers is not None and not layers:
            raise ValueError(
                "`layers` is an empty list: pass None to use split_layers(model), or the layers to manage."
            )
        self.layers = split_layers(model, coarse=coarse) if layers is None else list(layers)
        self.train_bn = check_bool("train_bn", train_bn)
        self.frozen: set[int] = set()
        params = dict(model.named_parameters())
        self._params = {layer.index: [params[n] for n in layer.parameters] for layer in self.layers}
        self._trainable = {id(p) for p in params.values() if p.requires_grad}
        self._bn_params: set[int] = set()
        self._batchnorms: dict[int, list[nn.Module]] = {}
        batchnorms = [(path, m) for path, m in model.named_modules() if isinstance(m, _BatchNorm)]
        for layer in self.layers:
            found = [m for path, m in batchnorms if in_subtree(path, layer.paths)]
            self._batchnorms[layer.index] = found
            self._bn_params.update(id(p) for m in found for p in m.parameters(recurse=False))
        self._stats_frozen_by_us: set[int] = set()

    def trainable_parameters(self, index: int) -> list[nn.Parameter]:
        """The parameters of layer ``index`` that unfreezing makes trainable (those trainable at creation)."""
        return [p for p in self._params[index] if id(p) in self._trainable]

    def freeze(self, indices: Iterable[int]) -> None:
        """Freeze the layers ``indices`` (their BatchNorm statistics too, unless ``train_bn``)."""
        for i in indices:
            for p in self._params[i]:
                if not (self.train_bn and id(p) in self._bn_params):
                    p.requires_grad_(False)
            if not self.train_bn:
                for bn in self._batchnorms[i]:
                    if not has_frozen_batchnorm_stats(bn):
                        freeze_batchnorm_stats(bn)
                        self._stats_frozen_by_us.add(id(bn))
            self.frozen.add(i)

    def unfreeze(self, indices: Iterable[int]) -> list[nn.Parameter]:
        """Unfreeze the layers ``indices``; returns the parameters that became trainable, in layer order."""
        released: list[nn.Parameter] = []
        for i in sorted(set(indices) & self.frozen):
            for p in self.trainable_parameters(i):
                if not p.requires_grad:
                    p.requires_grad_(True)
                    released.append(p)
            for bn in self._batchnorms[i]:
                if id(bn) in self._stats_frozen_by_us:
                    unfreeze_batchnorm_stats(bn)
                    bn.train(self.model.training)  # the hook kept it in eval mode; follow the model again
                    self._stats_frozen_by_us.discard(id(bn))
            self.frozen.discard(i)
        return released

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters this freezer froze and has not given back yet."""
        return [p for i in sorted(self.frozen) for p in self.trainable_parameters(i) if not p.requires_grad]

    def restore(self) -> None:
        """Unfreeze every layer this freezer froze and release the BatchNorm statistics it held."""
        self.unfreeze(list(self.frozen))


def resolve_freeze(model: nn.Module, layers: list[Layer], freeze: FreezeSpec) -> list[Layer]:
    """Turn ``freeze`` (``N``, ``"backbone"`` or patterns) into the layers to freeze.

    An int freezes layers ``0 … N-1``; ``"backbone"`` freezes every layer but the head; any other string or a list of
    strings are module/parameter name patterns (as in ``target_modules``), each of which must match something. The
    result for patterns is one layer holding every matched parameter.

    Raises:
        TypeError: ``freeze`` is not an int, a string or a list of strings.
        ValueError: ``N`` is below 1 or leaves no layer trainable, the model has no head for ``"backbone"``, or a
            pattern matches nothing.

    Example::

        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> [layer.name for layer in resolve_freeze(model, split_layers(model), 2)]
        ['0', '1']
        >>> resolve_freeze(model, split_layers(model), 3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `freeze`=3 but Sequential has 3 layers (0: 0; 1: 1; 2: 2); freeze at most 2 so that the last ...
    """
    name = type(model).__name__
    if isinstance(freeze, int) and not isinstance(freeze, bool):
        check_int("freeze", freeze, minimum=1)
        if freeze >= len(layers):
            raise ValueError(
                f"`freeze`={freeze} but {name} has {len(layers)} layers ({_listing(layers)}); freeze at most "
                f"{len(layers) - 1} so that the last layer still trains. Print "
                f"peft_callbacks.describe_layers(model) to see them."
            )
        return layers[:freeze]
    if freeze == "backbone":
        if not layers[-1].is_head:
            raise ValueError(
                f"`freeze`='backbone' needs a task head with parameters of its own, and {name} has none "
                f"(its last layer is {layers[-1].name!r}); freeze a number of layers instead, e.g. "
                f"freeze={len(layers) - 1}."
            )
        return layers[:-1]
    if freeze is None:
        raise TypeError("`freeze` must be an int N, 'backbone' or a list of name patterns, got None.")
    return [_pattern_layer(model, check_patterns("freeze", freeze))]


def _pattern_layer(model: nn.Module, patterns: list[str]) -> Layer:
    modules = [path for path, _ in model.named_modules() if path]
    params = [n for n, _ in model.named_parameters()]
    roots: list[str] = []
    for pattern in patterns:
        hits = [p for p in modules + params if path_matches(pattern, p)]
        if not hits:
            raise ValueError(
                f"`freeze` entry {pattern!r} matched no module or parameter in {type(model).__name__}; its layers "
                f"are: {_listing(split_layers(model))}."
            )
        roots.extend(hits)
    selected = tuple(n for n in params if in_subtree(n, roots))
    if not selected:
        raise ValueError(f"`freeze`={patterns!r} matched only modules without parameters in {type(model).__name__}.")
    return Layer(0, tuple(dict.fromkeys(roots)), selected)


def _listing(layers: list[Layer]) -> str:
    shown = [f"{layer.index}: {layer.name}" for layer in layers[:8]]
    return "; ".join(shown) + ("; …" if len(layers) > 8 else "")


def freeze_layers(
    model: nn.Module,
    freeze: FreezeSpec = "backbone",
    *,
    train_bn: bool = False,
    coarse: bool = False,
) -> LayerFreezer:
    """Freeze the first ``freeze`` layers of ``model``, its backbone, or the modules matching patterns (in place).

    Args:
        model: a timm model, a transformers model or any ``nn.Module``.
        freeze: ``N`` (layers ``0 … N-1`` of :func:`split_layers`), ``"backbone"`` (everything but the head) or
            name patterns (a list, or a string other than ``"backbone"``).
        train_bn: keep BatchNorm layers in the frozen part trainable, running statistics included.
        coarse: timm only: count stages instead of blocks.

    Returns:
        The :class:`LayerFreezer`; call ``.restore()`` to undo.

    Raises:
        ValueError: see :func:`resolve_freeze`; also when nothing would be left to train.

    Example::

        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = freeze_layers(model)  # "backbone": the head (last Linear) alone trains
        >>> [p.requires_grad for p in model.parameters()]
        [False, False, True, True]
    """
    check_bool("train_bn", train_bn)
    layers = split_layers(model, coarse=coarse)
    chosen = resolve_freeze(model, layers, freeze)
    if isinstance(freeze, int) or freeze == "backbone":
        freezer = LayerFreezer(model, layers, train_bn=train_bn)
        freezer.freeze(layer.index for layer in chosen)
    else:
        freezer = LayerFreezer(model, chosen, train_bn=train_bn)
        freezer.freeze([0])
    if not any(p.requires_grad for p in model.parameters()):
        freezer.restore()
        raise ValueError(
            f"`freeze`={freeze!r} would leave nothing of {type(model).__name__} to train (the rest was already "
            f"frozen, e.g. by LoRA with train_head=False)."
        )
    return freezer
