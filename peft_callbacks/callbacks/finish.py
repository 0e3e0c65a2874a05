"""``ForgettingAwareFinish``: when training ends, keep as much of the update as the forgetting budget allows."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from peft_callbacks._validation import check_bool, check_choice, check_float, check_optional_str, check_positive_int
from peft_callbacks.callbacks.base import run_before_surgery
from peft_callbacks.engine.arguments import takes_settings
from peft_callbacks.forgetting.anchors import UpdateAnchor, update_scope
from peft_callbacks.forgetting.batches import call_model, move_to_device, split_batch
from peft_callbacks.forgetting.plot import write_finish_plot
from peft_callbacks.forgetting.scaling import UpdateScaler, check_grid, choose_scale
from peft_callbacks.forgetting.scoring import BaseTaskScorer, evaluation_mode
from peft_callbacks.plumbing.base_task import BaseLoader, BaseTaskOptions, check_dataloader, resolve_loader

log = logging.getLogger(__name__)

DEFAULT_GRID = [i / 10 for i in range(11)]


def module_forward(pl_module: nn.Module, batch: Any) -> torch.Tensor:
    """The LightningModule's own ``forward`` on a batch's inputs (``module(x)`` or ``module(**inputs)``)."""
    inputs, _ = split_batch(batch)
    return call_model(pl_module, inputs)


@takes_settings(BaseTaskOptions)
class ForgettingAwareFinish(Callback):
    """Scale the learned update at the end of training to the ``s`` that learns most within a forgetting budget.

    At ``on_train_end`` the model is set to ``θ(s) = θ₀ + s·(θ₁ − θ₀)`` for every ``s`` of ``grid``
    (:mod:`peft_callbacks.forgetting.scaling`): for the adapted layers of every method the adapters' own ``scale``
    (``W₀ + s·ΔW`` for most, exactly ``s·B·A`` added for LoRA; DoRA's effective weight interpolated; OFT's rotation
    generator scaled), for bottleneck adapters their output times ``s``, and for every other trained tensor — full
    fine-tuning — WiSE-FT's interpolation between start and end weights (BatchNorm statistics included). Each ``s``
    is scored on the new task's validation data and on the base-task set; the model is left at the ``s`` with the
    best new-task score among those that forget at most ``max_forgetting`` (ties: less forgetting, then larger
    ``s``). Adapters that can hold the scale in their own tensors keep their form with it written in (LoRA's ``B``
    times ``s``, IA3's vector, OFT's generator, …) — so the adapter file ``LoRACallback`` writes afterwards, and its
    merge, hold the scaled update — while the layers of methods that cannot (DoRA, PiSSA/OLoRA) are merged at
    ``s``. The finish runs before the surgery callbacks' own end of training (it moves itself before them in
    ``trainer.callbacks``), and before a ``ForgettingMonitor`` listed after it, which then reports the final model.

    Forgetting is ``base(s=0) − base(s)`` for ``metric="accuracy"``/``"f1"`` (through ``base_head`` when the head was
    replaced), or, with ``metric=None`` (no base labels), the label-free feature drift ``1 − cos(f(s), f(0))`` of the
    pooled features (``features``). The curve is logged (``finish/scale``, ``finish/new_task``,
    ``finish/forgetting`` at the chosen ``s``; ``finish/new_task/s=…`` and ``finish/forgetting/s=…`` for each point),
    kept in ``curve`` and drawn beside the learn-vs-forget plot of a ``ForgettingMonitor`` of the same trainer
    (``finish.png`` in the logger's folder). Use base-task data other than the held-out set you report forgetting
    on, or the choice is made on the test set.

    Args:
        dataloader: the base-task set to score each ``s`` on: a ``DataLoader``, a ``LightningDataModule``, a
            callable returning a loader, or the name of a LightningModule / DataModule method or attribute (YAML).
        max_forgetting: the budget, in ``[0, 1]`` (accuracy points, or feature drift with ``metric=None``).
        grid: the values of ``s`` to try, in ``[0, 1]``, holding ``0`` and ``1`` (default ``0, 0.1, …, 1``).
        metric: the base-task metric, ``"accuracy"``, ``"f1"`` (macro), or ``None`` for feature drift.
        val_dataloader: the new task's validation data; by default the trainer's validation loader.
        val_metric: the new-task metric, ``"accuracy"`` or ``"f1"``.
        base_head: the original head (module, whole original model, or state-dict path) when fine-tuning replaced
            it; the current head is then the new task's own and is kept as trained.
        val_forward_fn: ``forward_fn`` for the validation batches; by default the LightningModule's own ``forward``
            when it has one, else the found model.
        features: with ``metric=None``: ``"head_input"`` (the pooled input of the head) or ``"output"`` (the pooled
            output of ``forward_fn``, e.g. a sentence embedding).
        limit_batches: score at most this many batches of each set per ``s``.
        plot: write ``<prefix>.png``.
        plot_dir: folder of the PNG; by default the logger's ``log_dir``.
        prefix: logging namespace, file name and checkpoint key.

    Example::

        >>> from peft_callbacks.demo import MLPClassifier, quiet_trainer, random_loader  # any LightningModule, data
        >>> new, old = random_loader(8, batch_size=4), random_loader(6, batch_size=3, seed=1)
        >>> finish = ForgettingAwareFinish(old, max_forgetting=0.0, grid=[0, 0.5, 1], val_dataloader=new, plot=False)
        >>> trainer = quiet_trainer(max_steps=4, callbacks=[finish])
        >>> trainer.fit(MLPClassifier(lr=0.5), new)
        >>> [p["s"] for p in finish.curve], finish.chosen["forgetting"] <= 0.0
        ([0.0, 0.5, 1.0], True)
    """

    def __init__(
        self,
        dataloader: BaseLoader,
        max_forgetting: float = 0.05,
        grid: list[float] | None = None,
        metric: Literal["accuracy", "f1"] | None = "accuracy",
        val_dataloader: BaseLoader | None = None,
        val_metric: Literal["accuracy", "f1"] = "accuracy",
        *,
        base_task: BaseTaskOptions,
        val_forward_fn: Callable[[Any, Any], Any] | None = None,
        features: Literal["head_input", "output"] = "head_input",
        limit_batches: int | None = None,
        plot: bool = True,
        plot_dir: str | None = None,
        prefix: str = "finish",
    ) -> None:
        self.dataloader = check_dataloader(dataloader)
        self.max_forgetting = check_float("max_forgetting", max_forgetting, low=0.0, high=1.0)
        self.grid = DEFAULT_GRID if grid is None else check_grid(grid)
        self.metric = None if metric is None else check_choice("metric", metric, ("accuracy", "f1"))
        self.val_dataloader = None if val_dataloader is None else check_dataloader(val_dataloader, "val_dataloader")
        self.val_metric = check_choice("val_metric", val_metric, ("accuracy", "f1"))
        self.base_head, self.forward_fn, self.module = base_task.base_head, base_task.forward_fn, base_task.module
        if val_forward_fn is not None and not callable(val_forward_fn):
            raise TypeError(f"`val_forward_fn` must be a callable(pl_module, batch) or None, got {val_forward_fn!r}.")
        self.val_forward_fn = val_forward_fn
        self.features = check_choice("features", features, ("head_input", "output"))
        self.limit_batches = None if limit_batches is None else check_positive_int("limit_batches", limit_batches)
        self.plot = check_bool("plot", plot)
        self.plot_dir = check_optional_str("plot_dir", plot_dir)
        self.prefix = check_optional_str("prefix", prefix) or "finish"
        self.curve: list[dict[str, Any]] = []
        self.chosen: dict[str, Any] | None = None
        self.merged_layers: list[str] = []
        self.plot_path: str | None = None
        self._start: dict[str, torch.Tensor] = {}
        self._anchor: UpdateAnchor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def scale(self) -> float | None:
        """The chosen ``s`` (``None`` before the end of training)."""
        return None if self.chosen is None else self.chosen["s"]

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            run_before_surgery(trainer, self, "ForgettingAwareFinish")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.ckpt_path:
            self._start, self.curve, self.chosen, self.merged_layers = {}, [], None, []
        include, exclude = update_scope(pl_module, self.module, exclude_head=self.base_head is not None)
        self._anchor = UpdateAnchor(pl_module, exclude=exclude, include=include, buffers=True)
        if self._start:
            self._anchor.load_state_dict(self._start)
        self._anchor.capture()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._anchor is not None:
            self._anchor.capture()  # tensors a schedule unfroze: their start value, before their first step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        base_loader = resolve_loader(
            self.dataloader,
            trainer,
            pl_module,
            owner="ForgettingAwareFinish",
            no_shuffle_reason="feature drift compares the same batches at every s" if self.metric is None else None,
        )
        val_loader = self._val_loader(trainer, pl_module)
        base, new = self._scorers(pl_module, val_loader)
        scaler = UpdateScaler(self._anchor)
        rank, world = trainer.global_rank, trainer.world_size
        # the trainer's own validation loader is already split between processes (each scores its share, the
        # metric adds the shares up); a loader given here is split batch by batch, like the base-task set
        val_rank, val_world = (rank, world) if self.val_dataloader is not None else (0, 1)
        self.curve = []
        for s in self.grid:  # ascending: s = 0 first, the baseline of forgetting and drift
            with scaler.scaled(s):
                base_score = base.score(base_loader, rank=rank, world_size=world)
                new_score = new.score(val_loader, rank=val_rank, world_size=val_world)
            self.curve.append({"s": s, "new_task": new_score.value, **self._forgetting(base_score)})
        self.chosen = choose_scale(self.curve, self.max_forgetting)
        self.merged_layers = scaler.commit(pl_module, self.chosen["s"])
        self._report(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._anchor is not None:
            self._start = self._anchor.state_dict()
        self._anchor = None

    # -- pieces -------------------------------------------------------------------------------------------------
    def _val_loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable:
        source = self.val_dataloader if self.val_dataloader is not None else _trainer_val_loader(trainer)
        if source is None:
            raise ValueError(
                "ForgettingAwareFinish needs the new task's validation data: the trainer has no validation loader; "
                "pass `val_dataloader=`."
            )
        return resolve_loader(source, trainer, pl_module, owner="ForgettingAwareFinish", argument="val_dataloader")

    def _scorers(self, pl_module: pl.LightningModule, val_loader: Iterable) -> tuple[BaseTaskScorer, BaseTaskScorer]:
        base = BaseTaskScorer(
            pl_module,
            metric=self.metric,
            base_head=self.base_head,
            forward_fn=self.forward_fn,
            module=self.module,
            limit_batches=self.limit_batches,
            drift=self.metric is None,
            features=self.features,
        )
        forward = self.val_forward_fn
        if forward is None and is_overridden("forward", pl_module, pl.LightningModule):
            forward = module_forward
        new = BaseTaskScorer(
            pl_module,
            metric=self.val_metric,
            forward_fn=forward,
            module=self.module,
            num_classes=self._classes(pl_module, val_loader, forward),
            limit_batches=self.limit_batches,
            drift=False,
        )
        return base, new

    def _classes(self, pl_module: pl.LightningModule, loader: Iterable, forward: Callable | None) -> int:
        batch = next(iter(loader), None)
        if batch is None:
            raise ValueError("The `val_dataloader` of ForgettingAwareFinish yielded no batches.")
        probe = BaseTaskScorer(pl_module, metric=None, forward_fn=forward, module=self.module, drift=False)
        with evaluation_mode(pl_module):
            return int(probe.forward(move_to_device(batch, pl_module.device))[0].shape[-1])

    def _forgetting(self, score: Any) -> dict[str, float | None]:
        if self.metric is None:
            return {"base": score.feature_cosine, "forgetting": 1.0 - score.feature_cosine}
        baseline = score.value if not self.curve else self.curve[0]["base"]
        return {"base": score.value, "forgetting": baseline - score.value}

    def _report(self, trainer: pl.Trainer) -> None:
        s = self.chosen["s"]
        figures = {"scale": s, "new_task": self.chosen["new_task"], "forgetting": self.chosen["forgetting"]}
        for point in self.curve:
            figures[f"new_task/s={point['s']:.2f}"] = point["new_task"]
            figures[f"forgetting/s={point['s']:.2f}"] = point["forgetting"]
        figures = {f"{self.prefix}/{k}": float(v) for k, v in figures.items() if v is not None}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in figures.items()})
        lines = [f"{'s':>5}  {'new task':>8}  {'forgetting':>10}"]
        for p in self.curve:
            mark = "  <- chosen" if p is self.chosen else ""
            lines.append(f"{p['s']:>5.2f}  {_cell(p['new_task']):>8}  {_cell(p['forgetting']):>10}{mark}")
        merged = f"; merged at s: {len(self.merged_layers)} layer(s)" if self.merged_layers else ""
        rank_zero_info(
            f"ForgettingAwareFinish: s={s:g} (max_forgetting={self.max_forgetting:g}){merged}\n" + "\n".join(lines)
        )
        folder = self.plot_dir or trainer.log_dir or "."  # log_dir broadcasts: every rank asks
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(figures, step=trainer.global_step)
            if self.plot:
                self.plot_path = self._write_plot(trainer, os.path.join(folder, f"{self.prefix}.png"))

    def _write_plot(self, trainer: pl.Trainer, path: str) -> str:
        from peft_callbacks.callbacks.forgetting import ForgettingMonitor

        monitor = next((c for c in trainer.callbacks if isinstance(c, ForgettingMonitor) and c.tasks is None), None)
        history = monitor.history if monitor is not None else None
        names = {"metric_name": monitor.metric_name, "val_name": monitor.val_metric} if monitor is not None else {}
        return write_finish_plot(
            self.curve, self.chosen["s"], self.max_forgetting, path, self.val_metric, history=history, **names
        )

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        start = self._anchor.state_dict() if self._anchor is not None else dict(self._start)
        return {"start": start, "curve": [dict(p) for p in self.curve], "chosen": self.chosen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start = dict(state_dict.get("start") or {})
        self.curve = [dict(p) for p in state_dict.get("curve", [])]
        self.chosen = state_dict.get("chosen")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_anchor"] = None
        return state


def _trainer_val_loader(trainer: pl.Trainer) -> Any:
    """The trainer's (first) validation loader, set up now if validation has not run yet."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        try:  # the fit loop sets its validation data up lazily, at the first validation
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        except Exception:  # noqa: BLE001 - no validation data attached, or another Lightning layout
            return None
        loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
