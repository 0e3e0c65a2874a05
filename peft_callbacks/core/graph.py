"""Find a generic model's output layer from its forward, without running it: a symbolic trace (``torch.fx``).

A model that follows no timm/transformers contract says nothing about its task head, and the order in which layers
are registered says little either: in a SwiGLU feed-forward ``w2(silu(w1(x)) * w3(x))`` registered as ``w1, w2,
w3``, the last layer is the gate branch ``w3``, not the output ``w2``. :func:`output_layers` traces ``forward``
symbolically (no input needed, no weight touched: the surgery runs before any batch exists) and walks back from the
model's output (its first element for a tuple, ``"logits"`` for a dict) through parameter-free operations. The layers
reached first are the output layers when

* every path back from the output ends at a weight layer (Linear/Conv, adapted or not): a path that reaches the input
  (a residual around the last layer), a parameter read directly, or another module with parameters (a norm after
  the head) means the output is not one layer's, and
* none of them feeds another (``fc2(fc1(x)) + fc1(x)`` has no single output layer).

Otherwise, or when the forward cannot be traced symbolically (data-dependent control flow), nothing is guessed: the
reason is returned for a log line. A module without a ``forward`` of its own (a LightningModule whose network is its
one child holding parameters, called in ``training_step``) is traced through that child.

Example::

    >>> import torch.nn as nn, torch.nn.functional as F
    >>> class FeedForward(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w1, self.w2, self.w3 = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 8)
    ...     def forward(self, x):
    ...         return self.w2(F.silu(self.w1(x)) * self.w3(x))
    >>> output_layers(FeedForward())
    ['w2']
    >>> output_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Softmax(-1)))
    ['2']
    >>> class Residual(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return x + self.fc(x)
    >>> output_layers(Residual())
    'the input reaches the output without passing a weight layer'
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch.fx as fx
import torch.nn as nn

from peft_callbacks.core.models import defines_forward
from peft_callbacks.core.modules import PEFTModule

__all__ = ["output_layers"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_weight_layer(module: nn.Module) -> bool:
    """A Linear/Conv layer (any subclass: quantized, custom), transformers' ``Conv1D``, or our wrapper around one."""
    base = module._modules.get("base_layer") if isinstance(module, PEFTModule) else None
    if base is not None:
        return _is_weight_layer(base)
    return isinstance(module, (nn.Linear, *_CONVS)) or type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class _LayerTracer(fx.Tracer):
    """Weight layers and our inserted modules stay single nodes (``call_module``); other modules are traced into."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (
            _is_weight_layer(module) or isinstance(module, PEFTModule) or super().is_leaf_module(module, qualified_name)
        )

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        # trace into ``m.forward`` itself, not ``m(...)``: the module's hooks (FSDP2's all-gathers and lazy init, a
        # tensor-parallel plan's redistributions) must never run on symbolic inputs
        return super().call_module(m, m.forward, args, kwargs)


def _traced_root(model: nn.Module) -> tuple[nn.Module, str]:
    """The module to trace and its path: ``model``, or its single child with parameters when it has no forward."""
    if defines_forward(model):
        return model, ""
    children = [(name, child) for name, child in model.named_children() if any(True for _ in child.parameters())]
    if len(children) == 1:
        return children[0][1], children[0][0]
    return model, ""


def _main_output(graph: fx.Graph) -> fx.Node | None:
    """The node of the model's output tensor: the output itself, a tuple's first element, a dict's ``logits``."""
    output = next(n for n in graph.nodes if n.op == "output")
    value = output.args[0]
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    elif isinstance(value, dict):
        value = value.get("logits")
    return value if isinstance(value, fx.Node) else None


_METADATA_METHODS = frozenset({"size", "dim", "numel", "type", "get_device"})
_METADATA_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda"})


def _is_metadata(node: fx.Node) -> bool:
    """A shape, dtype or device read (``x.shape[0]`` in a ``view``): no data flows through it."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _METADATA_ATTRIBUTES
    return False


def _inputs(node: fx.Node) -> Iterator[fx.Node]:
    """The nodes whose data ``node`` uses (shape and dtype reads left out)."""
    for parent in node.all_input_nodes:
        if not _is_metadata(parent):
            yield parent


def _walk_back(start: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[fx.Node], str | None]:
    """The weight-layer nodes first reached from ``start`` going backwards, or a reason why the output is not theirs."""
    reached: list[fx.Node] = []
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            return [], "the input reaches the output without passing a weight layer"
        if node.op == "get_attr":
            return [], f"the output reads the tensor {node.target!r} directly"
        if node.op == "call_module":
            module = modules[node.target]
            if _is_weight_layer(module):
                reached.append(node)
                continue
            if any(True for _ in module.parameters()):
                return [], f"a module with parameters ({node.target}, {type(module).__name__}) follows the last layer"
        stack.extend(_inputs(node))
    return reached, None


def _feeds_another(nodes: list[fx.Node]) -> bool:
    """Does one of ``nodes`` feed another (a residual path around the last layer)?"""
    wanted = set(nodes)
    for node in nodes:
        stack, seen = list(_inputs(node)), set()
        while stack:
            current = stack.pop()
            if current in wanted:
                return True
            if current not in seen:
                seen.add(current)
                stack.extend(_inputs(current))
    return False


def output_layers(model: nn.Module) -> list[str] | str:
    """Paths of the layers whose output is ``model``'s output (see the module docstring), or why none can be told.

    Args:
        model: any module; its ``forward`` is traced symbolically, never run.

    Returns:
        The output layers' paths in ``model`` (in registration order), or a sentence saying why none is named.
    """
    root, prefix = _traced_root(model)
    try:
        graph = _LayerTracer().trace(root)
    except Exception as error:  # noqa: BLE001 - any tracing failure means: the forward cannot be read this way
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"its forward cannot be traced symbolically ({type(error).__name__}: {message[:120]})"
    start = _main_output(graph)
    if start is None:
        return "its forward returns no tensor node"
    modules = dict(root.named_modules())
    reached, reason = _walk_back(start, modules)
    if reason is not None:
        return reason
    if not reached:
        return "no weight layer reaches the output"
    if _feeds_another(reached):
        return "a residual path joins the output layer to an earlier one"
    paths = {node.target for node in reached}
    full = [f"{prefix}.{name}" if prefix else name for name, _ in root.named_modules() if name in paths]
    return full
