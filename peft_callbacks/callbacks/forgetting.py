"""``ForgettingMonitor``: measure catastrophic forgetting on a held-out base-task set while fine-tuning."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import Metric

from peft_callbacks._validation import check_bool, check_choice, check_float, check_optional_str, check_positive_int
from peft_callbacks.forgetting.anchors import UpdateAnchor, update_scope
from peft_callbacks.forgetting.continual import TaskMatrix
from peft_callbacks.forgetting.metrics import check_metric, higher_is_better
from peft_callbacks.forgetting.plot import write_forgetting_plot, write_tasks_plot
from peft_callbacks.forgetting.scoring import BaseTaskScorer, weights_version
from peft_callbacks.forgetting.tracker import ForgettingTracker
from peft_callbacks.forgetting.updates import update_figures
from peft_callbacks.plumbing.base_task import BaseLoader, check_heads, check_sources, resolve_loader
from peft_callbacks.plumbing.base_task import named_source as _named_source  # noqa: F401 - kept importable here

log = logging.getLogger(__name__)

_NO_SHUFFLE = "drift and `limit_batches` compare the same batches at every evaluation"


def log_figures(trainer: pl.Trainer, prefix: str, figures: dict[str, float | None]) -> None:
    """Log ``figures`` (``None`` left out) as ``<prefix>/<name>`` at the current step: to every logger from rank
    zero, and into ``trainer.callback_metrics`` on every rank (for ``EarlyStopping``/``ModelCheckpoint``)."""
    figures = {f"{prefix}/{k}": float(v) for k, v in figures.items() if v is not None}
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in figures.items()})
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=trainer.global_step)


class ForgettingMonitor(Callback):
    """Measure how much of the base task a model forgets while it is fine-tuned on a new one.

    A baseline is taken at ``on_fit_start``, before any training step (LoRA's ``B`` starts at zero, so with
    ``LoRACallback`` the model is still the original), then the base task is scored every ``every_n_epochs`` epochs
    and/or ``every_n_steps`` steps, and at the end of training. Logged under ``forgetting/…`` (``base_<metric>``,
    ``baseline``, ``forgetting`` = baseline − now as in Avalanche (now − baseline for loss and perplexity, so
    positive always means worse), ``relative_drop_percent``, ``max_forgetting``, ``kl_to_baseline``,
    ``feature_cosine``, and, where the model holds adapted layers of any method, the size of the update:
    ``update_norm`` = ``√Σ‖ΔW‖²_F`` over them and ``relative_update`` = that over ``√Σ‖W‖²_F``, each adapter
    measuring its own, LoRA without forming ``ΔW``: :mod:`peft_callbacks.forgetting.updates`); a summary table is
    logged at the end and a learn-vs-forget PNG (``forgetting.png``) is written to the logger's directory. Baseline
    and history are saved in checkpoints, so a resumed run keeps its baseline. With several processes each scores a
    share of the base batches and torchmetrics sums the states.

    **Several base tasks, sequential fine-tunes.** ``dataloader`` may be a dict ``{task name: loader or method
    name}``, listing the tasks in the order they are learned. Every task is scored at each evaluation (logged under
    ``forgetting/<task>/…``), and at the end of each fit a row of the accuracy matrix is recorded, with the average
    accuracy and the backward transfer (BWT) as Avalanche defines them (:mod:`peft_callbacks.forgetting.continual`;
    ``forgetting/average_<metric>``, ``forgetting/bwt``). Reuse one monitor for fits one after the other and set
    ``monitor.task = "<name>"`` before the fit that trains task ``<name>`` (``None``, the default: a task outside
    the dict, so every task of the dict is a base task learned before). ``base_head`` may then be a dict too (task
    name → original head; tasks missing from it are scored through the current head). ``matrix`` holds the rows.

    **From YAML** (LightningCLI) the base set is named rather than built: ``dataloader: base_dataloader`` names a
    method or attribute of the LightningModule or of the trainer's DataModule that returns the loader, and
    ``base_head: path/to/head.pt`` a ``torch.save``'d or ``.safetensors`` state dict of the original head (or of
    the whole original model / a Lightning checkpoint)::

        trainer:
          callbacks:
            - class_path: peft_callbacks.callbacks.forgetting.ForgettingMonitor
              init_args: {dataloader: base_dataloader, base_head: original_head.pt, max_forgetting: 5.0,
                          relative: true, on_exceed: stop}

    Args:
        dataloader: the held-out base-task set: a ``DataLoader``, a ``LightningDataModule`` (its val, else test
            loader), a callable returning a loader, or the name of a LightningModule / DataModule method or
            attribute that returns one. It must not shuffle (drift compares batch by batch). A dict of them, keyed
            by task name, monitors several tasks (see above).
        metric: ``"accuracy"``, ``"f1"`` (macro), ``"loss"``, ``"perplexity"``, a ``torchmetrics.Metric`` (called as
            ``update(logits, labels)``, reset before each evaluation) or ``None`` for label-free drift only.
        base_head: the original head when fine-tuning replaced it: a module, the whole original model, or a path
            to a saved state dict. The base task is then scored through current backbone → frozen original head.
            With several tasks, a dict of them keyed by task name.
        forward_fn: ``forward_fn(pl_module, batch) -> logits`` for batches or models the defaults cannot read.
        module: dotted path of the model inside the LightningModule when it holds several.
        num_classes: base-task classes for accuracy/F1; read from the (base) head when ``None``.
        every_n_epochs: evaluate after every N training epochs (``None``: never by epoch).
        every_n_steps: evaluate every N optimizer steps (``None``: never by step).
        limit_batches: score only the first N base-task batches.
        drift: also measure label-free drift (KL to baseline outputs, cosine of pooled head inputs). The baseline
            outputs are kept in memory (and in checkpoints): for large-vocabulary LMs set ``limit_batches`` or
            ``drift=False``.
        max_forgetting: threshold on forgetting (metric units, or percent with ``relative=True``); ``None``: none.
        relative: compare ``max_forgetting`` with the relative drop in percent instead of the absolute forgetting.
        on_exceed: ``"warn"`` or ``"stop"`` (ends training cleanly, like ``EarlyStopping``) past ``max_forgetting``.
        val_metric: the new task's validation metric to plot (a ``trainer.callback_metrics`` key); by default the
            first key starting with ``val``.
        plot: write the PNG at the end of training.
        plot_dir: folder for the PNG; by default the logger's ``log_dir`` (``default_root_dir`` without logger).
        prefix: logging namespace, plot file name and checkpoint key; give each monitor its own when several
            watch different base sets.

    Example::

        >>> from peft_callbacks.demo import ImageClassifier, quiet_trainer, random_loader  # any LightningModule, data
        >>> data = random_loader(8, shape=(3, 32, 32), classes=3, batch_size=4)
        >>> monitor = ForgettingMonitor(dataloader=data, metric="accuracy", plot=False)
        >>> trainer = quiet_trainer(max_epochs=2, callbacks=[monitor])
        >>> trainer.fit(ImageClassifier("test_resnet", num_classes=3), data)
        >>> [row["epoch"] for row in monitor.history], monitor.latest["kl_to_baseline"] > 0
        ([0, 1, 2], True)
    """

    def __init__(
        self,
        dataloader: BaseLoader | dict[str, BaseLoader],
        metric: Literal["accuracy", "f1", "loss", "perplexity"] | Metric | None = "accuracy",
        base_head: nn.Module | str | dict[str, nn.Module | str] | None = None,
        forward_fn: Callable[[Any, Any], Any] | None = None,
        module: str | None = None,
        num_classes: int | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        limit_batches: int | None = None,
        drift: bool = True,
        max_forgetting: float | None = None,
        relative: bool = False,
        on_exceed: Literal["warn", "stop"] = "warn",
        val_metric: str | None = None,
        plot: bool = True,
        plot_dir: str | None = None,
        prefix: str = "forgetting",
    ) -> None:
        self.dataloader = check_sources(dataloader)
        self.metric = check_metric(metric)
        self.base_head = check_heads(base_head, self.tasks)
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"`forward_fn` must be a callable(pl_module, batch) or None, got {forward_fn!r}.")
        self.forward_fn = forward_fn
        self.module = check_optional_str("module", module)
        self.num_classes = None if num_classes is None else check_positive_int("num_classes", num_classes)
        self.every_n_epochs = None if every_n_epochs is None else check_positive_int("every_n_epochs", every_n_epochs)
        self.every_n_steps = None if every_n_steps is None else check_positive_int("every_n_steps", every_n_steps)
        self.limit_batches = None if limit_batches is None else check_positive_int("limit_batches", limit_batches)
        self.drift = check_bool("drift", drift)
        if self.metric is None and not self.drift:
            raise ValueError("`metric=None` with `drift=False` measures nothing; set a metric or drift=True.")
        self.max_forgetting = None if max_forgetting is None else check_float("max_forgetting", max_forgetting, low=0)
        self.relative = check_bool("relative", relative)
        self.on_exceed = check_choice("on_exceed", on_exceed, ("warn", "stop"))
        self.val_metric = check_optional_str("val_metric", val_metric)
        self.plot = check_bool("plot", plot)
        self.plot_dir = check_optional_str("plot_dir", plot_dir)
        self.prefix = check_optional_str("prefix", prefix) or "forgetting"
        self.tracker = ForgettingTracker()
        self.matrix: TaskMatrix | None = None if self.tasks is None else TaskMatrix(self.tasks)
        self.task: str | None = None
        self.stop_reason: str | None = None
        self.plot_path: str | None = None
        self._rows: list[dict[str, Any]] = []  # evaluations of several tasks
        self._fit_index = 0
        self._version: int | None = None
        self._references: dict[str | None, dict | None] = {}
        self._scorers: dict[str | None, BaseTaskScorer] = {}
        self._loaders: dict[str | None, Iterable] = {}
        self._world_size = 1
        self._update_scope: list[str] = [""]  # the models whose adapted layers the update figures cover

    # -- results ------------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str] | None:
        """The monitored task names (``None`` for a single base set)."""
        return list(self.dataloader) if isinstance(self.dataloader, dict) else None

    @property
    def metric_name(self) -> str:
        if isinstance(self.metric, Metric):
            return type(self.metric).__name__
        return self.metric or "drift"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def baseline(self) -> float | None:
        """The base-task metric before any training step (with several tasks: their average then)."""
        if self.tasks is not None:
            return self._rows[0]["value"] if self._rows else None
        return self.tracker.baseline

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every evaluation: ``epoch``, ``step``, ``value``, ``forgetting``, ``relative_drop_percent``, …

        With several tasks each row holds ``tasks`` (per task ``value``, ``forgetting``, drift), ``value`` (their
        average over the tasks learned so far) and ``forgetting`` (the largest)."""
        return self._rows if self.tasks is not None else self.tracker.history

    @property
    def latest(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None

    def summary_table(self) -> str | None:
        """The plain-text table of every evaluation so far (what training end logs), or ``None`` before the first."""
        if not self.history:
            return None
        if self.tasks is not None:
            return self.matrix.summary_table(self.metric_name)
        return self.tracker.summary_table(self.metric_name)

    def model_card_section(self) -> str | None:
        """A Markdown section with :meth:`summary_table`, for the ``README.md`` model card of a saved adapter
        (``LoRACallback(save_adapter_to=...)`` adds it; pass it to ``save_adapter(..., card_sections=[...])``
        yourself otherwise), or ``None`` before the first evaluation."""
        table = self.summary_table()
        if table is None:
            return None
        return (
            f"## Forgetting of the base task ({self.metric_name}, ForgettingMonitor {self.prefix!r})\n\n"
            f"Measured on held-out base-task data during training (epoch 0, step 0: before it).\n\n```\n{table}\n```"
        )

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.restore_checkpoint_after_setup:
            return  # FSDP, DeepSpeed and FSDP2 restore a checkpoint after on_fit_start: start once it is loaded
        self._start(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._scorers:
            self._start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._world_size = trainer.world_size
        sources = self.dataloader if self.tasks is not None else {None: self.dataloader}
        heads = self.base_head if isinstance(self.base_head, dict) else {name: self.base_head for name in sources}
        self._loaders = {name: self._resolve_loader(trainer, pl_module, src, name) for name, src in sources.items()}
        self._update_scope = update_scope(pl_module, self.module, exclude_head=False)[0]
        self._scorers = {
            name: BaseTaskScorer(
                pl_module,
                metric=self.metric,
                base_head=heads.get(name),
                forward_fn=self.forward_fn,
                module=self.module,
                num_classes=self.num_classes,
                limit_batches=self.limit_batches,
                drift=self.drift,
            )
            for name in sources
        }
        if self.metric is not None:
            spec = self.metric if isinstance(self.metric, Metric) else None
            self.tracker.higher_is_better = self.metric in ("accuracy", "f1") or (
                spec is not None and higher_is_better(spec)
            )
            if self.matrix is not None:
                self.matrix.higher_is_better = self.tracker.higher_is_better
        if self.tasks is not None:
            self._fit_start_tasks(trainer, pl_module)
        elif self.tracker.history:
            self._restore_reference(trainer)
            rank_zero_info(f"ForgettingMonitor: resumed; keeping the baseline {self.metric_name}={self.baseline}.")
        else:
            if trainer.ckpt_path:
                rank_zero_warn(
                    "ForgettingMonitor: resuming from a checkpoint without a forgetting baseline; the baseline is "
                    "taken on the restored model, not on the original one."
                )
            self._evaluate(trainer, pl_module, epoch=0)

    def _fit_start_tasks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.task is not None and self.task not in self.tasks:
            raise ValueError(f"`task`={self.task!r} is not one of the monitored tasks {self.tasks}.")
        self._restore_reference(trainer)
        if trainer.ckpt_path and self._rows:
            rank_zero_info(f"ForgettingMonitor: resumed; keeping the accuracy matrix ({len(self.matrix.rows)} rows).")
            return
        self._fit_index = len(self.matrix.rows) - 1 if self.matrix.rows else 0
        self._evaluate(trainer, pl_module, epoch=0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not self._evaluated_now(trainer):
            self._evaluate(trainer, pl_module, epoch=trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # epochs are counted as completed epochs: the baseline is epoch 0, the check after the first epoch epoch 1
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            if self._evaluated_now(trainer):
                self.latest["epoch"] = trainer.current_epoch + 1
            else:
                self._evaluate(trainer, pl_module, epoch=trainer.current_epoch + 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._evaluated_now(trainer):
            self._evaluate(trainer, pl_module, epoch=trainer.current_epoch)
        elif weights_version(pl_module) != self._version:  # changed since, at the same step: a merge, the finish
            self.history.pop()
            self._evaluate(trainer, pl_module, epoch=trainer.current_epoch)
        if self.tasks is not None:
            self._end_of_fit_row(trainer)
        table = self.summary_table()
        rank_zero_info(f"ForgettingMonitor {self.prefix!r} ({self.metric_name}):\n{table}")
        if self.plot:
            folder = self.plot_dir or trainer.log_dir or "."  # log_dir broadcasts: every rank asks
            if trainer.is_global_zero:
                path = os.path.join(folder, f"{self.prefix}.png")
                if self.tasks is not None:
                    self.plot_path = write_tasks_plot(self._rows, path, self.metric_name, self.val_metric, self.tasks)
                else:
                    self.plot_path = write_forgetting_plot(self.history, path, self.metric_name, self.val_metric)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._scorers:
            self._references = {name: scorer.reference for name, scorer in self._scorers.items()}
        self._scorers, self._loaders = {}, {}  # do not keep the model alive through the callback

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _evaluated_now(self, trainer: pl.Trainer) -> bool:
        latest = self.latest
        return bool(latest) and latest["step"] == trainer.global_step and latest.get("fit", 0) == self._fit_index

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        self._version = weights_version(pl_module)
        scores = {
            name: scorer.score(self._loaders[name], rank=trainer.global_rank, world_size=trainer.world_size)
            for name, scorer in self._scorers.items()
        }
        self._references = {name: scorer.reference for name, scorer in self._scorers.items()}
        updates = update_figures(UpdateAnchor(pl_module, include=self._update_scope).layers)
        if self.tasks is not None:
            self._evaluate_tasks(trainer, scores, epoch, updates)
            return
        score = scores[None]
        row = self.tracker.record(
            score.value,
            epoch=epoch,
            step=trainer.global_step,
            kl_to_baseline=score.kl_to_baseline,
            feature_cosine=score.feature_cosine,
            val_metric=self._val_metric(trainer),
            **updates,
        )
        self._log(trainer, row)
        self._check_threshold(trainer, row)

    def _evaluate_tasks(self, trainer: pl.Trainer, scores: dict, epoch: int, updates: dict[str, float]) -> None:
        if not self.matrix.rows:
            self.matrix.record({n: s.value for n, s in scores.items()}, trained=None)  # the start row
        row = self.matrix.evaluation({n: s.value for n, s in scores.items()}, training=self.task)
        for name, score in scores.items():
            row["tasks"][name].update(kl_to_baseline=score.kl_to_baseline, feature_cosine=score.feature_cosine)
        row.update(fit=self._fit_index, epoch=epoch, step=trainer.global_step, val_metric=self._val_metric(trainer))
        row.update(updates)
        self._rows.append(row)
        figures = {"average_" + self.metric_name: row["value"], "max_forgetting": row["forgetting"], **updates}
        for name, task in row["tasks"].items():
            figures[f"{name}/base_{self.metric_name}"] = task["value"]
            figures.update({f"{name}/{k}": task[k] for k in ("forgetting", "kl_to_baseline", "feature_cosine")})
        self._log_figures(trainer, figures)
        measured = {name: self._measured(task) for name, task in row["tasks"].items()}
        worst = max(measured, key=lambda name: -1.0 if measured[name] is None else measured[name])
        self._check_threshold(trainer, {**row["tasks"][worst], "task": worst})

    def _end_of_fit_row(self, trainer: pl.Trainer) -> None:
        values = {name: task["value"] for name, task in self.latest["tasks"].items()}
        self.matrix.record(values, trained=self.task)
        self._log_figures(trainer, {"average_" + self.metric_name: self.matrix.average(), "bwt": self.matrix.bwt()})

    def _val_metric(self, trainer: pl.Trainer) -> float | None:
        metrics = trainer.callback_metrics
        if self.val_metric is None:
            self.val_metric = next((k for k in sorted(metrics) if k.startswith("val")), None)
        value = metrics.get(self.val_metric) if self.val_metric else None
        return None if value is None else float(value)

    def _log(self, trainer: pl.Trainer, row: dict[str, Any]) -> None:
        figures = {
            f"base_{self.metric_name}": row["value"],
            "baseline": self.baseline,
            "forgetting": row["forgetting"],
            "relative_drop_percent": row["relative_drop_percent"],
            "max_forgetting": row["max_forgetting"],
            "kl_to_baseline": row["kl_to_baseline"],
            "feature_cosine": row["feature_cosine"],
            "update_norm": row.get("update_norm"),
            "relative_update": row.get("relative_update"),
        }
        self._log_figures(trainer, figures)

    def _log_figures(self, trainer: pl.Trainer, figures: dict[str, float | None]) -> None:
        log_figures(trainer, self.prefix, figures)

    def _measured(self, row: dict[str, Any]) -> float | None:
        return row["relative_drop_percent"] if self.relative else row["forgetting"]

    def _check_threshold(self, trainer: pl.Trainer, row: dict[str, Any]) -> None:
        measured = self._measured(row)
        if self.max_forgetting is None or measured is None or measured <= self.max_forgetting:
            return
        unit = "%" if self.relative else ""
        task = f" {row['task']!r}" if row.get("task") is not None else ""
        if row.get("task") is not None:
            reference = self.matrix.rows[self.matrix.reference_row(row["task"], training=self.task)]
            start = f"{reference['values'][row['task']]:.4f} ({reference['label']})"
        else:
            start = f"{self.baseline:.4f} (baseline)"
        message = (
            f"ForgettingMonitor: base-task{task} {self.metric_name} went from {start} to "
            f"{row['value']:.4f} at epoch {trainer.current_epoch}, step {trainer.global_step}: "
            f"{'relative drop' if self.relative else 'forgetting'} {measured:.4f}{unit} > "
            f"max_forgetting={self.max_forgetting}{unit}."
        )
        if self.on_exceed == "stop":
            trainer.should_stop = True
            self.stop_reason = message
            rank_zero_info(message + " Stopping training.")
        else:
            rank_zero_warn(message)

    # -- the base-task loader -----------------------------------------------------------------------------------
    def _resolve_loader(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: Any, name: str | None
    ) -> Iterable:
        return resolve_loader(
            source,
            trainer,
            pl_module,
            owner="ForgettingMonitor",
            argument="dataloader" if name is None else f"dataloader[{name!r}]",
            no_shuffle_reason=_NO_SHUFFLE if self.drift or self.limit_batches else None,
        )

    # -- state --------------------------------------------------------------------------------------------------
    def _restore_reference(self, trainer: pl.Trainer) -> None:
        saved = {name: ref for name, ref in self._references.items() if ref is not None}
        if self.drift and saved and trainer.world_size == 1:
            for name, scorer in self._scorers.items():
                if saved.get(name) is not None:
                    scorer.reference = saved[name]
        elif self.drift and (self.tracker.history or self._rows):
            rank_zero_info("ForgettingMonitor: drift reference not restorable here; it is re-taken at the next check.")

    def state_dict(self) -> dict[str, Any]:
        # each process caches the outputs of its own batches: only a single-process reference can be restored
        references = (
            {name: s.reference for name, s in self._scorers.items()} if self._scorers else dict(self._references)
        )
        state = {
            "tracker": self.tracker.state_dict(),
            "metric_name": self.metric_name,
            "val_metric": self.val_metric,
            "stop_reason": self.stop_reason,
            "drift_reference": references.get(None) if self._world_size == 1 else None,
        }
        if self.tasks is not None:
            state["tasks"] = {
                "matrix": self.matrix.state_dict(),
                "history": [dict(r) for r in self._rows],
                "task": self.task,
                "fit_index": self._fit_index,
                "drift_references": references if self._world_size == 1 else {},
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict.get("tracker", {}))
        self.val_metric = self.val_metric or state_dict.get("val_metric")
        self.stop_reason = state_dict.get("stop_reason")
        self._references = {None: state_dict.get("drift_reference")}
        tasks = state_dict.get("tasks")
        if tasks and self.matrix is not None:
            self.matrix.load_state_dict(tasks.get("matrix", {}))
            self._rows = [dict(r) for r in tasks.get("history", [])]
            self.task = tasks.get("task", self.task)
            self._fit_index = tasks.get("fit_index", 0)
            self._references = dict(tasks.get("drift_references") or {})

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_scorers"], state["_loaders"] = {}, {}
        return state
