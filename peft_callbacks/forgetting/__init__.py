"""Catastrophic-forgetting measurement and control, in plain PyTorch: score a held-out base-task set through the
current backbone (and the frozen original head), track forgetting against the baseline (one task, or the accuracy
matrix of several), and act on the update a fine-tune made: replay, distillation, L2-SP / EWC penalties, and scaling
the update back (the forgetting-aware finish).

The callbacks in :mod:`peft_callbacks.callbacks.forgetting`, :mod:`peft_callbacks.callbacks.mitigation`,
:mod:`peft_callbacks.callbacks.regularization` and :mod:`peft_callbacks.callbacks.finish` call these at the right
Lightning hooks.
"""

from peft_callbacks.forgetting.anchors import UpdateAnchor, update_scope
from peft_callbacks.forgetting.batches import split_batch
from peft_callbacks.forgetting.continual import TaskMatrix
from peft_callbacks.forgetting.metrics import MeanCrossEntropy, build_metric
from peft_callbacks.forgetting.original_heads import base_heads_from, base_heads_from_file, swapped_heads
from peft_callbacks.forgetting.penalties import diagonal_fisher, distillation_loss, ewc_penalty, l2sp_penalty
from peft_callbacks.forgetting.plot import write_finish_plot, write_forgetting_plot, write_tasks_plot
from peft_callbacks.forgetting.replay import ReplayStream
from peft_callbacks.forgetting.scaling import UpdateScaler, check_grid, choose_scale
from peft_callbacks.forgetting.scoring import BaseTaskScore, BaseTaskScorer, evaluation_mode, weights_version
from peft_callbacks.forgetting.tracker import ForgettingTracker
from peft_callbacks.forgetting.updates import mergeable_layers, weight_update
from peft_callbacks.forgetting.verify import ArtifactCheck, check_artifact

__all__ = [
    "ArtifactCheck",
    "BaseTaskScore",
    "BaseTaskScorer",
    "ForgettingTracker",
    "MeanCrossEntropy",
    "ReplayStream",
    "TaskMatrix",
    "UpdateAnchor",
    "UpdateScaler",
    "base_heads_from",
    "base_heads_from_file",
    "build_metric",
    "check_artifact",
    "check_grid",
    "choose_scale",
    "diagonal_fisher",
    "distillation_loss",
    "evaluation_mode",
    "ewc_penalty",
    "l2sp_penalty",
    "mergeable_layers",
    "split_batch",
    "swapped_heads",
    "update_scope",
    "weight_update",
    "weights_version",
    "write_finish_plot",
    "write_forgetting_plot",
    "write_tasks_plot",
]
