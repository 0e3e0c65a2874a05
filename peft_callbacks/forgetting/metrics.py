"""Base-task metrics, built on torchmetrics so that every figure is summed over DDP ranks before it is computed.

``"accuracy"`` and ``"f1"`` (macro) are multiclass metrics over the head's outputs (token-level for language
models, ignoring label ``-100``); ``"loss"`` is the mean cross-entropy and ``"perplexity"`` its exponential. Any
``torchmetrics.Metric`` works too: it gets ``update(logits, labels)`` and is reset before every evaluation.

Example::

    >>> import torch
    >>> metric = build_metric("perplexity", num_classes=None)
    >>> metric.update(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))  # uniform over 3 classes
    >>> round(float(metric.compute()), 4)
    3.0
    >>> higher_is_better(metric)
    False
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from peft_callbacks.forgetting.batches import IGNORE_INDEX

MetricName = Literal["accuracy", "f1", "loss", "perplexity"]
METRIC_NAMES: tuple[str, ...] = ("accuracy", "f1", "loss", "perplexity")


class MeanCrossEntropy(Metric):
    """Mean cross-entropy of logits ``(N, C)`` against labels ``(N,)`` (``-100`` ignored); ``exp=True`` gives
    perplexity.

    Example::

        >>> m = MeanCrossEntropy()
        >>> m.update(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
        >>> round(float(m.compute()), 4)  # log 2
        0.6931
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, exp: bool = False) -> None:
        super().__init__()
        self.exp = exp
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        keep = labels != IGNORE_INDEX
        self.total += F.cross_entropy(logits[keep].double(), labels[keep], reduction="sum")
        self.count += keep.sum()

    def compute(self) -> torch.Tensor:
        mean = self.total / self.count.clamp(min=1)
        return mean.exp() if self.exp else mean


def build_metric(metric: str | Metric, num_classes: int | None) -> Metric:
    """A fresh metric for ``metric`` (a name from :data:`METRIC_NAMES`) or ``metric`` itself, reset.

    Raises:
        ValueError: ``"accuracy"``/``"f1"`` without a known number of classes.

    Example::

        >>> type(build_metric("f1", num_classes=4)).__name__
        'MulticlassF1Score'
    """
    if isinstance(metric, Metric):
        metric.reset()
        return metric
    if metric in ("loss", "perplexity"):
        return MeanCrossEntropy(exp=metric == "perplexity")
    if num_classes is None:
        raise ValueError(
            f"metric={metric!r} needs the number of base-task classes, which could not be read from the base head; "
            f"pass `num_classes=`."
        )
    if metric == "accuracy":
        return MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=IGNORE_INDEX)
    return MulticlassF1Score(num_classes=num_classes, average="macro", ignore_index=IGNORE_INDEX)


def higher_is_better(metric: Metric) -> bool:
    """Whether larger values of ``metric`` are better (torchmetrics' ``higher_is_better``; unknown counts as yes)."""
    value = getattr(metric, "higher_is_better", None)
    return True if value is None else bool(value)


def check_metric(metric: object) -> str | Metric | None:
    """Return ``metric`` if it is ``None``, a name from :data:`METRIC_NAMES` or a ``torchmetrics.Metric``.

    Example::

        >>> check_metric("accuracy")
        'accuracy'
        >>> check_metric("acc")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `metric` must be one of 'accuracy', 'f1', 'loss', 'perplexity', None or a ... got 'acc'.
    """
    if metric is None or isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in METRIC_NAMES:
            allowed = ", ".join(map(repr, METRIC_NAMES))
            raise ValueError(f"`metric` must be one of {allowed}, None or a torchmetrics.Metric; got {metric!r}.")
        return metric
    raise TypeError(
        f"`metric` must be a name ({', '.join(METRIC_NAMES)}), None or a torchmetrics.Metric instance, got "
        f"{type(metric).__name__} {metric!r}."
    )
