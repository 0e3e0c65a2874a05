"""Check an artifact against the adapted model it was made from: it must score the same on both tasks.

A merge folds the adapter into the base weights; a merge into ``bfloat16``/``float16`` rounds every weight, and a
re-quantized merge rounds the merged weights back into 4 or 8 bits, which can undo much of a small update. An export
converted to another format can lose a tensor. :func:`check_artifact` scores the adapted model and the artifact on the
same batches of the new task and the base task and compares: an artifact that moves a score by more than
``tolerance`` is refused (:attr:`ArtifactCheck.accepted` is ``False``) and :meth:`ArtifactCheck.message` says by how
much. Plain PyTorch: :class:`~peft_callbacks.PEFTCallback` calls it for its merge with ``verify=``, and any artifact
built by hand (``merge(copy, requantize=True)``, a model loaded back from an export) can be checked the same way.

The artifact is scored with its floating-point tensors in ``float32`` (a copy, when it holds others): the check sees
what the rounding of its *weights* changes, on any device, not the precision of the arithmetic it will later run in.
An artifact with quantized (bitsandbytes) layers is scored as it is.

Example::

    >>> import copy, torch, torch.nn as nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    >>> data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=8)
    >>> same = check_artifact(model, copy.deepcopy(model), {"new_task": data}, metric="loss", tolerance=0.0)
    >>> same.accepted, same.deltas["new_task"]
    (True, 0.0)
    >>> broken = copy.deepcopy(model)
    >>> _ = broken[2].weight.data.mul_(0.5)  # an artifact that lost half of its head
    >>> check = check_artifact(model, broken, {"new_task": data}, metric="loss", tolerance=0.01, name="half head")
    >>> check.accepted
    False
    >>> print(check.message())  # doctest: +ELLIPSIS
    half head refused: new_task loss ... -> ... (relative change ..., tolerance 0.01)...
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_choice, check_module, check_optional_str, check_positive_int
from peft_callbacks.core import quantized
from peft_callbacks.forgetting.batches import move_to_device
from peft_callbacks.forgetting.scoring import BaseTaskScorer, evaluation_mode

__all__ = ["VERIFY_METRICS", "ArtifactCheck", "check_artifact", "check_tolerance", "in_float32"]

VERIFY_METRICS = ("accuracy", "f1", "loss")
ForwardFn = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class ArtifactCheck:
    """The scores of the adapted model and of an artifact made from it, task by task.

    Attributes:
        name: what the artifact is (``"merged model (float16)"``).
        metric: ``"accuracy"``, ``"f1"`` (changes in points) or ``"loss"`` (relative change).
        tolerance: the largest change allowed.
        scores: ``{task: (adapted, artifact)}``.
    """

    name: str
    metric: str
    tolerance: float
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def deltas(self) -> dict[str, float]:
        """``artifact − adapted`` per task (``(artifact − adapted) / adapted`` for the loss)."""
        out = {}
        for task, (adapted, artifact) in self.scores.items():
            change = artifact - adapted
            out[task] = change / max(abs(adapted), 1e-12) if self.metric == "loss" else change
        return out

    @property
    def accepted(self) -> bool:
        """Does every score stay within ``tolerance``?"""
        return all(abs(d) <= self.tolerance for d in self.deltas.values())

    def message(self) -> str:
        """One line per task: the two scores and the change, and what happened."""
        unit = "relative change" if self.metric == "loss" else "change"
        lines = [
            f"{task} {self.metric} {a:.4f} -> {b:.4f} ({unit} {self.deltas[task]:+.3g}, tolerance {self.tolerance:g})"
            for task, (a, b) in self.scores.items()
        ]
        verdict = "accepted" if self.accepted else "refused"
        return f"{self.name} {verdict}: " + "; ".join(lines)

    def figures(self, prefix: str = "verify") -> dict[str, float]:
        """``{prefix}/{task}/adapted``, ``…/artifact``, ``…/delta`` and ``{prefix}/accepted``, for a logger."""
        out = {f"{prefix}/accepted": float(self.accepted)}
        for task, (adapted, artifact) in self.scores.items():
            out.update({f"{prefix}/{task}/adapted": adapted, f"{prefix}/{task}/artifact": artifact})
            out[f"{prefix}/{task}/delta"] = self.deltas[task]
        return out


def check_tolerance(tolerance: object) -> float:
    """Return ``tolerance`` as a float if it is a number in ``[0, 1]``; raise otherwise."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"`tolerance` must be a number in [0, 1], got {type(tolerance).__name__} {tolerance!r}.")
    if not 0.0 <= float(tolerance) <= 1.0:
        raise ValueError(
            f"`tolerance` must be in [0, 1] (accuracy/F1 points, or the relative change of the loss), got {tolerance}."
        )
    return float(tolerance)


def in_float32(module: nn.Module) -> nn.Module:
    """``module`` itself when all its floating tensors are ``float32`` or it holds quantized layers (a re-quantized
    merge runs as it is), else a copy with them cast to ``float32``."""
    if quantized.holds_quantized(module):
        return module
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()):
        return module
    return copy.deepcopy(module).float()


def check_artifact(
    adapted: nn.Module,
    artifact: nn.Module,
    tasks: Mapping[str, Iterable],
    *,
    metric: str = "accuracy",
    tolerance: float = 0.01,
    name: str = "artifact",
    forward_fns: Mapping[str, ForwardFn | None] | None = None,
    base_heads: Mapping[str, nn.Module | str | None] | None = None,
    module: str | None = None,
    limit_batches: int | None = None,
    shards: Mapping[str, tuple[int, int]] | None = None,
) -> ArtifactCheck:
    """Score ``adapted`` and ``artifact`` on each task's batches and compare (see the module docstring).

    Args:
        adapted: the model (or LightningModule) the artifact was made from, as trained.
        artifact: the artifact, a module of the same kind (a merged copy, a model loaded back from a file).
        tasks: ``{task name: loader}``, e.g. ``{"new_task": val_loader, "base_task": base_val_loader}``.
        metric: ``"accuracy"``, ``"f1"`` or ``"loss"``, on every task.
        tolerance: the largest change a score may show, in ``[0, 1]``: accuracy/F1 points, or the relative change
            of the loss.
        name: what the artifact is, for the message.
        forward_fns: per task, ``forward_fn(module, batch) -> logits`` (see
            :class:`~peft_callbacks.forgetting.scoring.BaseTaskScorer`); ``None`` reads the batch as ``(x, y)``.
        base_heads: per task, the original head to score through (a base task whose head was replaced).
        module: dotted path of the model inside both modules when they hold several.
        limit_batches: score only the first N batches of each task.
        shards: per task, ``(rank, world_size)``: this process scores batches ``rank::world_size`` and the metric
            adds the shares of all processes up; by default every process scores every batch.

    Raises:
        TypeError: a module that is not an ``nn.Module``, ``tasks`` that is not a dict of loaders.
        ValueError: no task, an unknown metric or a tolerance outside ``[0, 1]``, a task whose loader yields no batch.
    """
    check_module("adapted", adapted)
    check_module("artifact", artifact)
    _check_tasks(tasks)
    check_choice("metric", metric, VERIFY_METRICS)
    tolerance = check_tolerance(tolerance)
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a non-empty string, got {type(name).__name__} {name!r}.")
    forward_fns, base_heads, shards = (
        _check_mapping(n, v) for n, v in (("forward_fns", forward_fns), ("base_heads", base_heads), ("shards", shards))
    )
    check_optional_str("module", module)
    if limit_batches is not None:
        check_positive_int("limit_batches", limit_batches)
    scored = in_float32(artifact)
    scores = {}
    for task, loader in tasks.items():
        forward, head = forward_fns.get(task), base_heads.get(task)
        classes = None if metric == "loss" else _classes(adapted, loader, forward, head, module)
        pair = []
        for model in (adapted, scored):
            scorer = BaseTaskScorer(
                model,
                metric=metric,
                base_head=head,
                forward_fn=forward,
                module=module,
                num_classes=classes,
                limit_batches=limit_batches,
                drift=False,
            )
            rank, world_size = shards.get(task, (0, 1))
            pair.append(scorer.score(loader, rank=rank, world_size=world_size).value)
        scores[task] = (float(pair[0]), float(pair[1]))
    return ArtifactCheck(name=name, metric=metric, tolerance=tolerance, scores=scores)


def _check_tasks(tasks: object) -> None:
    if not isinstance(tasks, Mapping):
        raise TypeError(f"`tasks` must be a dict {{task name: loader}}, got {type(tasks).__name__} {tasks!r}.")
    if not tasks:
        raise ValueError("`tasks` is empty: give at least one {task name: loader} to score the artifact on.")
    for task, loader in tasks.items():
        if not isinstance(task, str) or not task:
            raise TypeError(f"`tasks` must be keyed by non-empty task names (str), got key {task!r}.")
        if isinstance(loader, (str, bytes, Mapping, torch.Tensor)) or not isinstance(loader, Iterable):
            raise TypeError(
                f"`tasks`[{task!r}] must be a DataLoader or another iterable of batches, got {type(loader).__name__}."
            )


def _check_mapping(name: str, value: object) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be None or a dict keyed by task name, got {type(value).__name__} {value!r}.")
    return dict(value)


def _classes(
    root: nn.Module, loader: Iterable, forward: ForwardFn | None, head: nn.Module | str | None, module: str | None
) -> int:
    """The number of class scores the model gives on the task's first batch."""
    batch = next(iter(loader), None)
    if batch is None:
        raise ValueError("A loader given to check the artifact on yielded no batches.")
    probe = BaseTaskScorer(root, metric=None, base_head=head, forward_fn=forward, module=module, drift=False)
    device = next((p.device for p in root.parameters()), torch.device("cpu"))
    with evaluation_mode(root):
        return int(probe.forward(move_to_device(batch, device))[0].shape[-1])
