"""``ForgettingBudget``: keep base-task forgetting under a budget by adjusting a penalty's strength while training."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric

from peft_callbacks._validation import check_bool, check_choice, check_float, check_int, check_positive_int
from peft_callbacks.callbacks.base import run_before_surgery
from peft_callbacks.callbacks.forgetting import log_figures
from peft_callbacks.callbacks.regularization import _AnchoredTerm
from peft_callbacks.engine.arguments import takes_settings
from peft_callbacks.forgetting.batches import move_to_device
from peft_callbacks.forgetting.budget import (
    ForgettingBudgetState,
    noise_margin,
    replay_share,
    restore_trained,
    snapshot_trained,
)
from peft_callbacks.forgetting.metrics import check_metric, higher_is_better
from peft_callbacks.forgetting.penalties import l2sp_penalty, normalizing_scale
from peft_callbacks.forgetting.replay import ReplayStream, batch_size_of
from peft_callbacks.forgetting.scoring import BaseTaskScorer, evaluation_mode
from peft_callbacks.plumbing.base_task import BaseLoader, BaseTaskOptions, check_dataloader, resolve_loader

log = logging.getLogger(__name__)

_NO_SHUFFLE = "the proxy KL compares the same batches at every reading"


@takes_settings(BaseTaskOptions)
class ForgettingBudget(_AnchoredTerm):
    """Hold base-task forgetting under ``max_forgetting`` while learning as much of the new task as it allows.

    The callback owns a normalised L2-SP penalty, ``λ/2 · Σ‖update‖² / Σ‖θ₀‖²`` (the squared relative update of
    every adapted layer of any method, and of every other trained tensor, full fine-tuning included:
    :mod:`peft_callbacks.forgetting.penalties`), and sets its strength ``λ`` as a Lagrange multiplier, by a PI
    controller in log space (:mod:`peft_callbacks.forgetting.budget`): raised while the forgetting it reads is over
    the target ``(1 − margin) · max_forgetting``, lowered while it is under, ``0`` until the base task is at risk.
    No weight to pick.

    With ``replay`` (the base task's *training* data, labelled) it controls the replay share instead of the
    penalty: each step mixes base examples, a share ``odds/(1 + odds)`` of the joint batch (at most ``max_replay``),
    into the loss as :class:`~peft_callbacks.callbacks.mitigation.ReplayCallback` does, and the controller sets the
    odds. Replay starts at odds 1 (as many base as new examples, experience replay's usual batch) and is lowered
    while the forgetting stays under the target and is not rising: forgetting that an optimizer's momentum has set
    going shows a few steps late, and a controller that starts at zero then overshoots on a short run.

    Every ``every_n_steps`` optimizer steps it reads a cheap proxy, the KL divergence from the starting model's
    outputs on the first ``proxy_batches`` base batches, turned into forgetting by a line fitted on full scores (the
    base metric on the whole base set, or its first ``limit_batches`` batches), taken every ``full_every`` readings,
    and at each of the first ``full_every`` readings until one has seen some forgetting. During the first
    ``dense_steps`` steps (default ``every_n_steps · full_every``), where forgetting rises fastest, it reads at every
    step. Logged at each reading under ``budget/``: ``multiplier``, ``forgetting`` (what the controller acted on),
    ``kl``, ``measured_forgetting`` (full scores), ``calibration``, ``lr_scale`` (and ``replay_share``); every step
    ``budget/penalty`` (or ``budget/replay_loss``); at the end ``budget/final_forgetting`` (and
    ``budget/restored_step`` after a restore).
    ``history`` holds the readings. The state (multiplier, integral, calibration, baseline, starting weights, the
    proxy's reference outputs) is saved in checkpoints as plain tensors and numbers, so a resumed run continues the
    same trajectory.
    With several processes each reads a share of the base batches and the readings are summed over ranks, so every
    process sets the same ``λ``.

    Forgetting is measured as ``ForgettingMonitor`` measures it: the drop of accuracy/F1 (absolute, so
    ``max_forgetting=0.05`` is five points), and for ``"loss"``/``"perplexity"`` (or a ``Metric`` where lower is
    better) the relative rise, ``(now − baseline)/baseline``. Give it base *validation* data, not the split you
    report: the budget selects on what it measures.

    **Margin.** The controller aims at ``(1 − margin) · max_forgetting``. By default (``margin=None``) the margin
    covers the split-to-split noise of the base score: for accuracy/F1 read on ``n`` examples, the target ``t``
    with ``t + sqrt(2·t·(1 − t)/n) = max_forgetting`` (:func:`~peft_callbacks.forgetting.budget.noise_margin`: a
    third of the budget on 112 examples, 4 % on 10,000); for other metrics 0.2.

    **Guarantee at the end** (``restore=True``). The trained tensors at the latest full score that met the target
    are kept in memory (and in checkpoints); if the final full score breaks ``max_forgetting``, they are put back
    before other callbacks save or merge (the callback moves itself before them in ``trainer.callbacks``), and
    ``restored_step`` says from which step. The choice is made on the base data given here: report on another split.

    Args:
        dataloader: the base-task set (``DataLoader``, ``LightningDataModule``, callable returning a loader, or the
            name of a LightningModule / DataModule method or attribute). It must not shuffle.
        max_forgetting: the budget, in ``[0, 1]`` (see above for its unit).
        metric: ``"accuracy"``, ``"f1"``, ``"loss"``, ``"perplexity"``, a ``torchmetrics.Metric``, or ``None`` (no
            base labels): forgetting is then the label-free drift ``1 − cos`` of the pooled ``features`` from the
            starting model's, and the proxy is that drift on the first ``proxy_batches`` batches.
        base_head: the original head (module, whole original model, or state-dict path) when fine-tuning replaced
            it; the current head is then the new task's own and is not pulled back.
        num_classes: base-task classes for accuracy/F1; read from the (base) head when ``None``.
        every_n_steps: a reading every N optimizer steps.
        proxy_batches: base batches of a proxy reading.
        full_every: a full score every N readings.
        limit_batches: score only the first N base batches in a full score (``None``: all).
        margin: aim at ``(1 − margin) · max_forgetting``, in ``[0, 1)``; ``None``: from the noise (see above).
        replay: the base task's training data to replay, which makes the replay share the strength controlled
            (same forms as ``dataloader``; shuffle it); ``None``: the penalty.
        max_replay: the largest replay share, in ``(0, 1)``.
        dense_steps: read at every step during the first this many steps (``None``: ``every_n_steps ·
            full_every``; ``0``: never).
        restore: at the end, put back the latest state that met the target if the final one breaks the budget.
        prefix: logging namespace and checkpoint key.
        features: with ``metric=None``: ``"head_input"`` (the pooled input of the head) or ``"output"`` (the pooled
            output of ``forward_fn``, e.g. a sentence embedding).

    Raises:
        ValueError: ``max_forgetting`` outside ``[0, 1]``, a metric the base data cannot give, a base set (or
            ``replay`` set) that yields no batch, or a ``base_head`` that does not fit the model (at fit start).

    Example::

        >>> from peft_callbacks.demo import MLPClassifier, quiet_trainer, random_loader  # any LightningModule, data
        >>> new, old = random_loader(16, batch_size=4), random_loader(8, batch_size=4, seed=1)
        >>> budget = ForgettingBudget(old, max_forgetting=0.05, every_n_steps=2, dense_steps=4)
        >>> trainer = quiet_trainer(max_steps=8, callbacks=[budget])
        >>> trainer.fit(MLPClassifier(lr=0.5), new)
        >>> [row["step"] for row in budget.history], budget.multiplier >= 0  # every step, then every 2
        ([1, 2, 3, 4, 6, 8], True)
    """

    def __init__(
        self,
        dataloader: BaseLoader,
        max_forgetting: float,
        metric: Literal["accuracy", "f1", "loss", "perplexity"] | Metric | None = "accuracy",
        *,
        base_task: BaseTaskOptions,
        num_classes: int | None = None,
        every_n_steps: int = 10,
        proxy_batches: int = 2,
        full_every: int = 5,
        limit_batches: int | None = None,
        margin: float | None = None,
        replay: BaseLoader | None = None,
        max_replay: float = 0.8,
        dense_steps: int | None = None,
        restore: bool = True,
        prefix: str = "budget",
        features: Literal["head_input", "output"] = "head_input",
    ) -> None:
        super().__init__(base_task, prefix=prefix)
        if dataloader is None:
            raise ValueError(
                "`dataloader` is None: ForgettingBudget needs base-task data (a DataLoader, a LightningDataModule, a "
                "callable returning a loader, or the name of a method returning one) to measure forgetting on."
            )
        self.dataloader = check_dataloader(dataloader)
        self.max_forgetting = check_float("max_forgetting", max_forgetting, low=0.0, high=1.0)
        self.metric = check_metric(metric)
        self.features = check_choice("features", features, ("head_input", "output"))
        self.num_classes = None if num_classes is None else check_positive_int("num_classes", num_classes)
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.proxy_batches = check_positive_int("proxy_batches", proxy_batches)
        self.full_every = check_positive_int("full_every", full_every)
        self.limit_batches = None if limit_batches is None else check_positive_int("limit_batches", limit_batches)
        self.margin = None if margin is None else check_float("margin", margin, low=0.0, high=1.0, high_inclusive=False)
        self.replay = None if replay is None else check_dataloader(replay, "replay")
        self.max_replay = check_float(
            "max_replay", max_replay, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
        )
        self.dense_steps = None if dense_steps is None else check_int("dense_steps", dense_steps, minimum=0)
        self.restore = check_bool("restore", restore)
        self.budget = self._new_state()
        self.restored_step: int | None = None
        self._best: dict[str, Any] | None = None  # the latest state whose full score met the budget
        self._stream: ReplayStream | None = None
        self._stream_state: dict[str, Any] = {}
        self._replay_scorer: BaseTaskScorer | None = None
        self.baseline: float | None = None
        self.final_forgetting: float | None = None
        self._reference: dict | None = None
        self._scale: float | None = None
        self._loader: Iterable | None = None
        self._full: BaseTaskScorer | None = None
        self._proxy: BaseTaskScorer | None = None
        self._last_step = -1
        self._world_size = 1
        self._rates: list[tuple[dict, Any]] = []  # (param group, its own lr) while the step runs at a lower one

    @property
    def multiplier(self) -> float:
        """The penalty's strength ``λ`` now."""
        return self.budget.multiplier

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every reading: ``step``, ``kl``, ``forgetting``, ``measured_forgetting``, ``calibration``, ``multiplier``."""
        return self.budget.history

    # -- fit start ----------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.restore:  # restore before they save adapters and merge at on_train_end
            run_before_surgery(trainer, self, self.name)

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().prepare(trainer, pl_module)
        self._world_size = trainer.world_size
        self._loader = resolve_loader(
            self.dataloader, trainer, pl_module, owner=self.name, no_shuffle_reason=_NO_SHUFFLE
        )
        options = {"base_head": self.base_head, "forward_fn": self.forward_fn, "module": self.module}
        options["features"] = self.features
        self._full = BaseTaskScorer(
            pl_module, metric=self.metric, num_classes=self.num_classes, limit_batches=self.limit_batches,
            drift=self._drift, **options,
        )  # fmt: skip
        self._proxy = BaseTaskScorer(pl_module, metric=None, limit_batches=self.proxy_batches, **options)
        self._scale = None
        self._last_step = trainer.global_step
        if self.replay is not None:
            self._prepare_replay(trainer, pl_module)
        if self.baseline is not None:  # resumed
            self._restore_reference()
            rank_zero_info(f"{self.name}: resumed at λ={self.multiplier:.4g}; keeping the baseline {self.baseline}.")
            return
        if self.margin is None:
            examples = self._examples()
            margin = noise_margin(self.max_forgetting, examples) if self._binomial else 0.2
            self.budget.controller.margin = margin
            rank_zero_info(
                f"{self.name}: margin {margin:.3f} "
                + (f"(split-to-split noise of {examples} base examples)" if self._binomial else "(default)")
            )
        self.baseline = self._score_full(trainer)
        self._read_proxy(trainer)  # takes the reference outputs: KL 0
        if self.restore:  # the start is the state that meets any budget
            self._best = {"step": trainer.global_step, "forgetting": 0.0, "tensors": snapshot_trained(pl_module)}
        rank_zero_info(f"{self.name}: baseline {self._metric_name}={self.baseline:.4f}, budget {self.max_forgetting}.")

    def _prepare_replay(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = resolve_loader(self.replay, trainer, pl_module, owner=self.name)
        self._replay_scorer = self.scorer(pl_module)
        first = next(iter(loader), None)
        if first is None:
            raise ValueError(f"The `replay` dataloader of {self.name} yielded no batches; replay needs at least one.")
        with evaluation_mode(pl_module):
            self._replay_scorer.loss(move_to_device(first, pl_module.device))  # labels present and inside the head
        self._stream = ReplayStream(lambda: loader, 0.0, trainer.global_rank, trainer.world_size)
        if self._stream_state:
            self._stream.skip(int(self._stream_state.get("position", 0)))
            self._stream.drawn = int(self._stream_state.get("drawn", 0))
            self._stream.seen = int(self._stream_state.get("seen", 0))
            self._stream.carry = float(self._stream_state.get("carry", 0.0))

    @property
    def _binomial(self) -> bool:
        """Is forgetting a difference of per-example scores (accuracy, F1), whose split-to-split noise is known?"""
        return isinstance(self.metric, str) and self.metric in ("accuracy", "f1")

    def _examples(self) -> int:
        """Base examples a full score reads (over all processes)."""
        loader = self._loader
        dataset, size = getattr(loader, "dataset", None), getattr(loader, "batch_size", None)
        try:
            count = len(dataset)
        except TypeError:
            count = None
        if count is None or not size:
            batches = loader if self.limit_batches is None else itertools.islice(loader, self.limit_batches)
            return sum(batch_size_of(batch) for batch in batches)
        return count if self.limit_batches is None else min(count, self.limit_batches * size)

    def reset(self) -> None:
        super().reset()
        self.budget = self._new_state()
        self.baseline, self.final_forgetting, self._reference = None, None, None
        self.restored_step, self._best, self._stream_state = None, None, {}

    def _new_state(self) -> ForgettingBudgetState:
        budget = ForgettingBudgetState(self.max_forgetting, full_every=self.full_every, margin=self.margin or 0.0)
        if self.replay is not None:
            # the strength is the replay odds (base examples per new one), from 0.1 (or a tenth of the cap) to the
            # cap; replay starts at odds 1, as many base as new examples (Chaudhry et al. 2019's experience replay),
            # since forgetting that an optimizer's momentum carries cannot be caught once it shows; the controller
            # lowers it from there
            budget.controller.max_multiplier = self.max_replay / (1.0 - self.max_replay)
            budget.controller.min_multiplier = min(0.1, budget.controller.max_multiplier / 10)
            budget.controller.start_active(1.0)
        return budget

    @property
    def replay_share(self) -> float:
        """The share of base-task examples in each training step now (``0`` without ``replay``)."""
        return 0.0 if self.replay is None else replay_share(self.multiplier, self.max_replay)

    @property
    def _dense(self) -> int:
        """Steps read at every step at the start, where forgetting rises fastest."""
        return self.every_n_steps * self.full_every if self.dense_steps is None else self.dense_steps

    def _restore_reference(self) -> None:
        if self._drift:  # the full score's baseline features too: re-taken at the starting weights
            with self._anchor.at_start():
                self._full.reference = None
                self._full.score(self._loader)
        if self._reference is not None and self._world_size == 1:
            self._proxy.reference = self._reference
            return
        rank_zero_info(f"{self.name}: re-taking the proxy's reference outputs at the starting weights.")
        with self._anchor.at_start():
            self._proxy.reference = None
            self._read_proxy(None)

    @property
    def _drift(self) -> bool:
        """``metric=None``: forgetting is the label-free feature drift ``1 − cos``."""
        return self.metric is None

    @property
    def _metric_name(self) -> str:
        if self._drift:
            return "feature cosine"
        return self.metric if isinstance(self.metric, str) else type(self.metric).__name__

    # -- readings -----------------------------------------------------------------------------------------------
    def _where(self, trainer: pl.Trainer | None) -> dict[str, int]:
        return {"rank": 0, "world_size": 1} if trainer is None else {
            "rank": trainer.global_rank, "world_size": trainer.world_size
        }  # fmt: skip

    def _read_proxy(self, trainer: pl.Trainer | None) -> float:
        score = self._proxy.score(self._loader, **self._where(trainer))
        if self._drift:  # the drift of the proxy batches themselves
            return 1.0 - float(score.feature_cosine)
        return float(score.kl_to_baseline)

    def _score_full(self, trainer: pl.Trainer) -> float:
        try:
            score = self._full.score(self._loader, **self._where(trainer))
            value = score.feature_cosine if self._drift else score.value
        except RuntimeError as error:
            shapes = any(word in str(error) for word in ("shape", "size", "channels", "dimension"))
            if self.base_head is None or isinstance(error, NotImplementedError) or not shapes:
                raise
            raise ValueError(
                f"`base_head`={type(self.base_head).__name__} does not fit the model: scoring the base task through "
                f"it failed ({error}). Pass the original head of the base task, one that takes this model's features."
            ) from error
        if value is None or value != value:
            raise ValueError(f"`metric`={self._metric_name!r} could not be computed on the base-task `dataloader`.")
        return float(value)

    def _forgetting(self, value: float) -> float:
        named = self._drift or (isinstance(self.metric, str) and self.metric in ("accuracy", "f1"))
        if named or (isinstance(self.metric, Metric) and higher_is_better(self.metric)):
            return self.baseline - value
        return (value - self.baseline) / abs(self.baseline) if self.baseline else value - self.baseline

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        factor = self.budget.lr_scale
        if factor < 1.0:  # restored at the end of the batch, before a scheduler steps
            for group in optimizer.param_groups:
                self._rates.append((group, group["lr"]))
                group["lr"] = group["lr"] * factor

    def _restore_rates(self) -> None:
        for group, rate in self._rates:
            group["lr"] = rate
        self._rates = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._restore_rates()
        step = trainer.global_step
        due = step <= self._dense or step % self.every_n_steps == 0
        if self._proxy is None or step == self._last_step or not due:
            return
        self._last_step = step
        kl = self._read_proxy(trainer)
        full = self._forgetting(self._score_full(trainer)) if self.budget.needs_full(kl) else None
        if full is not None and self.restore and full <= self.target:
            self._best = {"step": step, "forgetting": full, "tensors": snapshot_trained(pl_module)}
        ceiling = None if self.replay is not None else self._ceiling(trainer)
        if self.replay is None and not self.budget.controller.active:
            # an activation starts where the penalty is 1 (a task loss's size), at most as strong as plain SGD
            # takes without scaling its learning rate
            start = 1.0 / max(self._unit_penalty(), 1e-30)
            self.budget.controller.start_at(start if ceiling is None else min(start, ceiling))
        row = self.budget.observe(step, kl, full, ceiling=ceiling)
        if self.replay is not None:
            row["replay_share"] = self.replay_share
        self._log(trainer, {k: v for k, v in row.items() if k != "step"})

    @property
    def target(self) -> float:
        """The forgetting the controller aims at: ``(1 − margin) · max_forgetting``."""
        return self.budget.controller.target

    def _unit_penalty(self) -> float:
        """The penalty at ``λ = 1``: half the squared relative update."""
        if self._scale is None:
            self._scale = normalizing_scale(self._anchor)
        with torch.no_grad():
            return float(l2sp_penalty(self._anchor, 1.0, self._scale)) if self._scale > 0 else 0.0

    def _ceiling(self, trainer: pl.Trainer) -> float | None:
        """``1/(2·η·scale)``: past it plain SGD would diverge on the penalty alone, so the learning rate is scaled
        down (η: the largest learning rate of the optimizers)."""
        rates = [group.get("lr", 0.0) for opt in trainer.optimizers for group in opt.param_groups]
        rate = max((float(r) for r in rates), default=0.0)
        if self._scale is None:
            self._scale = normalizing_scale(self._anchor)
        return 0.5 / (rate * self._scale) if rate > 0 and self._scale > 0 else None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._full is None:
            return
        self.final_forgetting = self._forgetting(self._score_full(trainer))
        over = self.final_forgetting > self.max_forgetting
        if over and self.restore and self._best is not None:
            rank_zero_info(
                f"{self.name}: the final state forgets {self.final_forgetting:.4f} > {self.max_forgetting}; restoring "
                f"the state of step {self._best['step']} (it read {self._best['forgetting']:.4f})."
            )
            restore_trained(pl_module, self._best["tensors"])
            self.restored_step = self._best["step"]
            self.final_forgetting = self._forgetting(self._score_full(trainer))
        figures = {"final_forgetting": self.final_forgetting, "multiplier": self.multiplier}
        if self.restored_step is not None:
            figures["restored_step"] = float(self.restored_step)
        self._log(trainer, figures)
        strength = f"replay share {self.replay_share:.3g}" if self.replay is not None else f"λ={self.multiplier:.4g}"
        rank_zero_info(
            f"{self.name}: final forgetting {self.final_forgetting:.4f} (budget {self.max_forgetting}, target "
            f"{self.target:.4f}), {strength} after {len(self.history)} readings."
        )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_rates()
        super().on_exception(trainer, pl_module, exception)

    def _log(self, trainer: pl.Trainer, figures: dict[str, float | None]) -> None:
        log_figures(trainer, self.prefix, figures)

    # -- the penalty --------------------------------------------------------------------------------------------
    def on_new_tensors(self, names: list[str]) -> None:
        self._scale = None  # S₀ covers the tensors unfrozen since

    def term(self, pl_module: pl.LightningModule, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        if self._stream is not None:
            return self._replay_term(pl_module, loss, batch)
        multiplier = self.multiplier
        if multiplier <= 0:
            self.log_term(pl_module, "penalty", loss.new_zeros(()), batch_size=batch_size_of(batch))
            return loss
        if self._scale is None:
            self._scale = normalizing_scale(self._anchor)
        value = l2sp_penalty(self._anchor, multiplier, self._scale)
        self.log_term(pl_module, "penalty", value, batch_size=batch_size_of(batch))
        return loss + value.to(loss.device, loss.dtype)

    def _replay_term(self, pl_module: pl.LightningModule, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        """``(B·L_new + n·L_base)/(B + n)`` with ``n`` base examples for a share :attr:`replay_share` (as
        :class:`~peft_callbacks.callbacks.mitigation.ReplayCallback`, at the share the controller sets)."""
        size = batch_size_of(batch)
        self._stream.fraction = self.replay_share
        replayed = self._stream.draw(size)
        if replayed is None:
            self.log_term(pl_module, "replay_loss", loss.new_zeros(()), batch_size=size)
            return loss
        n = batch_size_of(replayed)
        base_loss = self._replay_scorer.loss(move_to_device(replayed, loss.device))
        self.log_term(pl_module, "replay_loss", base_loss, batch_size=n)
        share = n / (size + n)
        return (1.0 - share) * loss + share * base_loss.to(loss.dtype)

    # -- state --------------------------------------------------------------------------------------------------
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._proxy is not None:
            self._reference = self._proxy.reference
        if self._stream is not None:
            self._stream_state = self._stream_dict()
        super().teardown(trainer, pl_module, stage)
        self._full, self._proxy, self._loader = None, None, None
        self._stream, self._replay_scorer = None, None
        self._restore_rates()

    def _stream_dict(self) -> dict[str, Any]:
        if self._stream is None:
            return dict(self._stream_state)
        stream = self._stream
        return {"position": stream.position, "drawn": stream.drawn, "seen": stream.seen, "carry": stream.carry}

    def state_dict(self) -> dict[str, Any]:
        reference = self._proxy.reference if self._proxy is not None else self._reference
        state = {**super().state_dict(), "budget": self.budget.state_dict(), "baseline": self.baseline}
        if self.replay is not None:
            state["replay"] = self._stream_dict()
        if self._best is not None:
            state["best"] = {k: (dict(v) if k == "tensors" else v) for k, v in self._best.items()}
        if reference is not None and self._world_size == 1:  # each process holds the outputs of its own batches
            indices = sorted(reference)
            state["reference"] = {
                "indices": indices,
                "log_p": [reference[i][0] for i in indices],
                "features": [reference[i][1] for i in indices],
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.budget.load_state_dict(state_dict.get("budget", {}))
        self.baseline = state_dict.get("baseline")
        self._stream_state = dict(state_dict.get("replay") or {})
        best = state_dict.get("best")
        self._best = None if not best else {"step": int(best["step"]), "forgetting": float(best["forgetting"]),
                                            "tensors": dict(best["tensors"])}  # fmt: skip
        saved = state_dict.get("reference")
        self._reference = (
            None if not saved else {i: (p, f) for i, p, f in zip(saved["indices"], saved["log_p"], saved["features"])}
        )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_full"], state["_proxy"], state["_loader"], state["_rates"] = None, None, None, []
        state["_stream"], state["_replay_scorer"] = None, None
        return state
