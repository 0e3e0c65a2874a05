"""Catastrophic-forgetting measurement, in plain PyTorch: score a held-out base-task set through the current
backbone (and the frozen original head), track forgetting against the baseline, and plot it.

``ForgettingMonitor`` (in :mod:`peft_callbacks.callbacks.forgetting`) calls these at the right Lightning hooks.
"""

from peft_callbacks.forgetting.batches import split_batch
from peft_callbacks.forgetting.heads import base_heads_from, base_heads_from_file, swapped_heads
from peft_callbacks.forgetting.metrics import MeanCrossEntropy, build_metric
from peft_callbacks.forgetting.plot import write_forgetting_plot
from peft_callbacks.forgetting.scoring import BaseTaskScore, BaseTaskScorer, evaluation_mode
from peft_callbacks.forgetting.tracker import ForgettingTracker

__all__ = [
    "BaseTaskScore",
    "BaseTaskScorer",
    "ForgettingTracker",
    "MeanCrossEntropy",
    "base_heads_from",
    "base_heads_from_file",
    "build_metric",
    "evaluation_mode",
    "split_batch",
    "swapped_heads",
    "write_forgetting_plot",
]
