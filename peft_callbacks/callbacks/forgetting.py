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
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, RandomSampler
from torchmetrics import Metric

from peft_callbacks._validation import check_bool, check_choice, check_float, check_optional_str, check_positive_int
from peft_callbacks.forgetting.metrics import check_metric, higher_is_better
from peft_callbacks.forgetting.plot import write_forgetting_plot
from peft_callbacks.forgetting.scoring import BaseTaskScorer
from peft_callbacks.forgetting.tracker import ForgettingTracker

log = logging.getLogger(__name__)

BaseLoader = DataLoader | pl.LightningDataModule | Callable[[], Iterable] | str


class ForgettingMonitor(Callback):
    """Measure how much of the base task a model forgets while it is fine-tuned on a new one.

    A baseline is taken at ``on_fit_start``, before any training step (LoRA's ``B`` starts at zero, so with
    ``LoRACallback`` the model is still the original), then the base task is scored every ``every_n_epochs`` epochs
    and/or ``every_n_steps`` steps, and at the end of training. Logged under ``forgetting/…`` (``base_<metric>``,
    ``baseline``, ``forgetting`` = baseline − now as in Avalanche (now − baseline for loss and perplexity, so
    positive always means worse), ``relative_drop_percent``, ``max_forgetting``, ``kl_to_baseline``,
    ``feature_cosine``); a summary table is logged at the end and a learn-vs-forget PNG (``forgetting.png``) is
    written to the logger's directory. Baseline and history are saved in checkpoints, so a resumed run keeps its
    baseline. With several processes each scores a share of the base batches and torchmetrics sums the states.

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
            attribute that returns one. It must not shuffle (drift compares batch by batch).
        metric: ``"accuracy"``, ``"f1"`` (macro), ``"loss"``, ``"perplexity"``, a ``torchmetrics.Metric`` (called as
            ``update(logits, labels)``, reset before each evaluation) or ``None`` for label-free drift only.
        base_head: the original head when fine-tuning replaced it: a module, the whole original model, or a path
            to a saved state dict. The base task is then scored through current backbone → frozen original head.
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

        >>> import lightning as L, timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Classifier(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
        ...     def training_step(self, batch, batch_idx):
        ...         return torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
        >>> monitor = ForgettingMonitor(dataloader=data, metric="accuracy", plot=False)
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(), data)
        >>> [row["epoch"] for row in monitor.history], monitor.latest["kl_to_baseline"] > 0
        ([0, 1, 2], True)
    """

    def __init__(
        self,
        dataloader: BaseLoader,
        metric: Literal["accuracy", "f1", "loss", "perplexity"] | Metric | None = "accuracy",
        base_head: nn.Module | str | None = None,
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
        self.dataloader = _check_dataloader(dataloader)
        self.metric = check_metric(metric)
        self.base_head = _check_base_head(base_head)
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
        self.stop_reason: str | None = None
        self.plot_path: str | None = None
        self._reference: dict | None = None
        self._scorer: BaseTaskScorer | None = None
        self._loader: Iterable | None = None
        self._world_size = 1

    # -- results ------------------------------------------------------------------------------------------------
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
        """The base-task metric before any training step."""
        return self.tracker.baseline

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every evaluation: ``epoch``, ``step``, ``value``, ``forgetting``, ``relative_drop_percent``, …"""
        return self.tracker.history

    @property
    def latest(self) -> dict[str, Any] | None:
        return self.tracker.latest

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.restore_checkpoint_after_setup:
            return  # FSDP, DeepSpeed and FSDP2 restore a checkpoint after on_fit_start: start once it is loaded
        self._start(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._scorer is None:
            self._start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loader = self._resolve_loader(trainer, pl_module)
        self._world_size = trainer.world_size
        self._scorer = BaseTaskScorer(
            pl_module,
            metric=self.metric,
            base_head=self.base_head,
            forward_fn=self.forward_fn,
            module=self.module,
            num_classes=self.num_classes,
            limit_batches=self.limit_batches,
            drift=self.drift,
        )
        if self.metric is not None:
            spec = self.metric if isinstance(self.metric, Metric) else None
            self.tracker.higher_is_better = self.metric in ("accuracy", "f1") or (
                spec is not None and higher_is_better(spec)
            )
        if self.tracker.history:
            self._restore_reference(trainer)
            rank_zero_info(f"ForgettingMonitor: resumed; keeping the baseline {self.metric_name}={self.baseline}.")
        else:
            if trainer.ckpt_path:
                rank_zero_warn(
                    "ForgettingMonitor: resuming from a checkpoint without a forgetting baseline; the baseline is "
                    "taken on the restored model, not on the original one."
                )
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
        table = self.tracker.summary_table(self.metric_name)
        rank_zero_info(f"ForgettingMonitor {self.prefix!r} ({self.metric_name}):\n{table}")
        if self.plot:
            folder = self.plot_dir or trainer.log_dir or "."  # log_dir broadcasts: every rank asks
            if trainer.is_global_zero:
                self.plot_path = write_forgetting_plot(
                    self.history, os.path.join(folder, f"{self.prefix}.png"), self.metric_name, self.val_metric
                )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._scorer is not None:
            self._reference = self._scorer.reference
        self._scorer, self._loader = None, None  # do not keep the model alive through the callback

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _evaluated_now(self, trainer: pl.Trainer) -> bool:
        return bool(self.history) and self.latest["step"] == trainer.global_step

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        score = self._scorer.score(self._loader, rank=trainer.global_rank, world_size=trainer.world_size)
        self._reference = self._scorer.reference
        row = self.tracker.record(
            score.value,
            epoch=epoch,
            step=trainer.global_step,
            kl_to_baseline=score.kl_to_baseline,
            feature_cosine=score.feature_cosine,
            val_metric=self._val_metric(trainer),
        )
        self._log(trainer, row)
        self._check_threshold(trainer, row)

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
        }
        figures = {f"{self.prefix}/{k}": float(v) for k, v in figures.items() if v is not None}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in figures.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(figures, step=trainer.global_step)

    def _check_threshold(self, trainer: pl.Trainer, row: dict[str, Any]) -> None:
        measured = row["relative_drop_percent"] if self.relative else row["forgetting"]
        if self.max_forgetting is None or measured is None or measured <= self.max_forgetting:
            return
        unit = "%" if self.relative else ""
        message = (
            f"ForgettingMonitor: base-task {self.metric_name} went from {self.baseline:.4f} (baseline) to "
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
    def _resolve_loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable:
        source = self.dataloader
        if isinstance(source, str):
            source = _named_source(source, pl_module, trainer.datamodule)
        if isinstance(source, pl.LightningDataModule):
            source = _datamodule_loader(source, trainer)
        elif callable(source) and not isinstance(source, Iterable):
            source = source()
        if not isinstance(source, Iterable) or isinstance(source, (str, torch.Tensor)):
            raise TypeError(
                f"`dataloader` of ForgettingMonitor resolved to {type(source).__name__}, not an iterable of batches "
                f"(a DataLoader)."
            )
        if isinstance(getattr(source, "sampler", None), RandomSampler) and (self.drift or self.limit_batches):
            raise ValueError(
                "The base-task `dataloader` of ForgettingMonitor shuffles; drift and `limit_batches` compare the same "
                "batches at every evaluation, so build it with shuffle=False."
            )
        return source

    # -- state --------------------------------------------------------------------------------------------------
    def _restore_reference(self, trainer: pl.Trainer) -> None:
        if self.drift and self._reference is not None and trainer.world_size == 1:
            self._scorer.reference = self._reference
        elif self.drift:
            rank_zero_info("ForgettingMonitor: drift reference not restorable here; it is re-taken at the next check.")

    def state_dict(self) -> dict[str, Any]:
        # each process caches the outputs of its own batches: only a single-process reference can be restored
        reference = self._scorer.reference if self._scorer is not None else self._reference
        return {
            "tracker": self.tracker.state_dict(),
            "metric_name": self.metric_name,
            "val_metric": self.val_metric,
            "stop_reason": self.stop_reason,
            "drift_reference": reference if self._world_size == 1 else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict.get("tracker", {}))
        self.val_metric = self.val_metric or state_dict.get("val_metric")
        self.stop_reason = state_dict.get("stop_reason")
        self._reference = state_dict.get("drift_reference")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_scorer"], state["_loader"] = None, None
        return state


def _check_dataloader(value: Any) -> Any:
    if isinstance(value, str):
        return check_optional_str("dataloader", value)
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError("`dataloader` is an empty list: the base-task set needs at least one batch.")
    is_loader = isinstance(value, (Iterable, pl.LightningDataModule)) and not isinstance(
        value, (dict, set, torch.Tensor)
    )
    if is_loader or callable(value):
        return value
    raise TypeError(
        f"`dataloader` must be a DataLoader, a LightningDataModule, a callable returning a loader, or the name of a "
        f"LightningModule/DataModule method or attribute; got {type(value).__name__} {value!r}."
    )


def _check_base_head(value: Any) -> nn.Module | str | None:
    if value is None or isinstance(value, nn.Module):
        return value
    if isinstance(value, str):
        if not os.path.isfile(value):
            raise ValueError(f"`base_head`={value!r} is not a file; pass a saved state dict (.pt/.ckpt/.safetensors).")
        return value
    raise TypeError(f"`base_head` must be an nn.Module, a path to a state dict or None, got {type(value).__name__}.")


def _named_source(name: str, pl_module: pl.LightningModule, datamodule: Any) -> Any:
    for owner in (pl_module, datamodule):
        if owner is not None and hasattr(owner, name):
            value = getattr(owner, name)
            return value() if callable(value) and not isinstance(value, Iterable) else value
    owners = type(pl_module).__name__ + (f" or {type(datamodule).__name__}" if datamodule is not None else "")
    raise ValueError(f"`dataloader`={name!r} names no method or attribute of {owners}.")


def _datamodule_loader(datamodule: pl.LightningDataModule, trainer: pl.Trainer) -> Iterable:
    for stage, hook in (("validate", "val_dataloader"), ("test", "test_dataloader")):
        if is_overridden(hook, datamodule):
            if datamodule is not trainer.datamodule:
                datamodule.setup(stage)
            return getattr(datamodule, hook)()
    raise ValueError(
        f"`dataloader` is a {type(datamodule).__name__} with neither `val_dataloader` nor `test_dataloader`."
    )
