"""Callbacks that keep the base task while fine-tuning, by adding a loss term: replay and distillation (LwF).

The user's ``training_step`` stays as written. At ``on_fit_start`` each term callback wraps ``pl_module.training_step``
through the :mod:`~peft_callbacks.plumbing.seam` (taken away again at ``teardown`` or on an exception): the module's
own step runs, then each installed term is added to the loss it returns (a tensor, or the ``"loss"`` entry of a
dict). Lightning's DDP wrapper calls
``pl_module.training_step`` inside the DDP forward, so the extra forward passes of a term are part of the same
distributed step: no unused-parameter error, gradients averaged as usual. Several term callbacks stack.

* :class:`ReplayCallback`: base-task examples, a set share of each step, scored through the original head
  (:mod:`peft_callbacks.forgetting.replay`).
* :class:`DistillationCallback`: LwF's KL between the original model's and the current model's base-head outputs on
  the new inputs (:func:`peft_callbacks.forgetting.penalties.distillation_loss`).

L2-SP and EWC are in :mod:`peft_callbacks.callbacks.regularization`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from peft_callbacks._validation import check_float, check_optional_str, check_positive_float
from peft_callbacks.engine.arguments import takes_settings
from peft_callbacks.forgetting.anchors import UpdateAnchor, update_scope
from peft_callbacks.forgetting.batches import move_to_device
from peft_callbacks.forgetting.penalties import distillation_loss
from peft_callbacks.forgetting.replay import ReplayStream, batch_size_of
from peft_callbacks.forgetting.scoring import BaseTaskScorer, evaluation_mode
from peft_callbacks.plumbing import seam
from peft_callbacks.plumbing.base_task import BaseLoader, BaseTaskOptions, check_dataloader, resolve_loader

log = logging.getLogger(__name__)

_STEP = "training_step"
LossTerm = Callable[[torch.Tensor, Any], torch.Tensor]


def _apply(output: Any, term: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(output, torch.Tensor):
        return term(output)
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return {**output, "loss": term(output["loss"])}
    return output  # None skips the step; anything else Lightning itself refuses


def _batch(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("batch")


def install_loss_term(
    pl_module: pl.LightningModule,
    key: str,
    term: LossTerm,
    before: Callable | None = None,
    *,
    owner: Any = None,
) -> None:
    """Add ``term(loss, batch) -> new loss`` to what ``pl_module.training_step`` returns (see module docstring).

    ``before(batch)``, if given, runs before the module's own step (e.g. a teacher's no-grad forward, which must not
    change weights the step's graph saves). Terms run in the order they were installed; a term ``key`` is installed
    once. It stays until :func:`remove_loss_term` or ``owner``'s :func:`~peft_callbacks.plumbing.seam.undo`.

    Example::

        >>> import lightning as L, torch
        >>> class Module(L.LightningModule):
        ...     def training_step(self, batch, batch_idx):
        ...         return batch.sum()
        >>> module = Module()
        >>> install_loss_term(module, "double", lambda loss, batch: 2 * loss)
        >>> float(module.training_step(torch.ones(3), 0))
        6.0
        >>> remove_loss_term(module, "double")
        >>> float(module.training_step(torch.ones(3), 0))
        3.0
    """

    def prepare(*args: Any, **kwargs: Any) -> None:
        before(_batch(args, kwargs))

    def add(output: Any, *args: Any, **kwargs: Any) -> Any:
        batch = _batch(args, kwargs)
        return _apply(output, lambda loss: term(loss, batch))

    owner = pl_module if owner is None else owner
    seam.wrap_method(pl_module, _STEP, owner=owner, key=key, before=None if before is None else prepare, after=add)


def remove_loss_term(pl_module: pl.LightningModule, key: str) -> None:
    """Take the term ``key`` out again; the module's own ``training_step`` is back once no term is left."""
    seam.unwrap(pl_module, _STEP, key)


class ForgettingTerm(Callback):
    """Base class of the callbacks that add a forgetting-control term to the training loss.

    Subclasses implement :meth:`prepare` (at ``on_fit_start``, after checkpoint restore) and :meth:`term`; this class
    installs and removes the wrapper, refuses manual optimisation, logs ``<prefix>/loss`` and keeps the callback
    picklable.

    Args:
        base_task: how the base task is reached through the model (``base_head``, ``forward_fn``, ``module``);
            by default through the found model's current head.
        prefix: logging namespace and checkpoint key.
    """

    def __init__(self, base_task: BaseTaskOptions | None = None, prefix: str = "term") -> None:
        base_task = base_task or BaseTaskOptions()
        self.base_head, self.forward_fn, self.module = base_task.base_head, base_task.forward_fn, base_task.module
        self.prefix = check_optional_str("prefix", prefix) or "term"
        self.last_term: float | None = None
        self._pl_module: pl.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- to implement -------------------------------------------------------------------------------------------
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve data, build scorers and anchors (at ``on_fit_start``)."""

    def term(self, pl_module: pl.LightningModule, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        """Return the new loss, given the step's own ``loss`` and its ``batch``."""
        raise NotImplementedError

    def before_step(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Runs before the module's own ``training_step`` (no graph exists yet)."""

    def reset(self) -> None:
        """Forget the state of an earlier fit: a new fit (not a resume) starts from the model as it is now."""

    # -- shared pieces ------------------------------------------------------------------------------------------
    def scorer(self, pl_module: pl.LightningModule, metric: str | None = None) -> BaseTaskScorer:
        """A base-task scorer on ``pl_module`` through the original head (for its ``forward``/``loss``); refused for
        a model without a head that nothing puts class scores on (:mod:`peft_callbacks.forgetting.headless`)."""
        scorer = BaseTaskScorer(
            pl_module,
            metric=metric,
            base_head=self.base_head,
            forward_fn=self.forward_fn,
            module=self.module,
            drift=False,
        )
        scorer.check_class_scores()
        return scorer

    def anchor(self, pl_module: pl.LightningModule, buffers: bool = False) -> UpdateAnchor:
        """The update space of the fine-tune (the found models; their heads left out when ``base_head`` is given)."""
        include, exclude = update_scope(pl_module, self.module, exclude_head=self.base_head is not None)
        return UpdateAnchor(pl_module, exclude=exclude, include=include, buffers=buffers)

    def log_term(self, pl_module: pl.LightningModule, name: str, value: torch.Tensor, batch_size: int) -> None:
        self.last_term = float(value.detach())
        pl_module.log(
            f"{self.prefix}/{name}", value.detach(), on_step=True, on_epoch=True, sync_dist=True, batch_size=batch_size
        )

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{self.name} adds its term to the loss `training_step` returns, which manual optimisation "
                f"(`automatic_optimization = False`) does not use; add the term in your own step instead."
            )
        if not trainer.ckpt_path:
            self.reset()
        self.prepare(trainer, pl_module)
        self._pl_module = pl_module
        install_loss_term(
            pl_module,
            self.state_key,
            lambda loss, batch: self.term(pl_module, loss, batch),
            before=lambda batch: self.before_step(pl_module, batch),
            owner=self,
        )

    def _uninstall(self, pl_module: pl.LightningModule) -> None:
        seam.undo(self)
        self._pl_module = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall(pl_module)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pl_module"] = None
        return state


class _AnchoredTerm(ForgettingTerm):
    """A term on the update space: keeps the anchor, captures tensors unfrozen later, saves ``θ₀``
    (:attr:`anchor_buffers`: BatchNorm statistics too, for terms that run the starting model)."""

    anchor_buffers = False

    def __init__(self, base_task: BaseTaskOptions | None = None, prefix: str = "term") -> None:
        super().__init__(base_task, prefix=prefix)
        self._start: dict[str, torch.Tensor] = {}
        self._anchor: UpdateAnchor | None = None

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._anchor = self.anchor(pl_module, buffers=self.anchor_buffers)
        if self._start:
            self._anchor.load_state_dict(self._start)
        self._anchor.capture()
        if not self._anchor.layers and not self._anchor.start:
            rank_zero_warn(f"{self.name}: nothing trains inside the models it watches, so it adds nothing.")

    def reset(self) -> None:
        self._start = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._anchor is not None:
            new = self._anchor.capture()  # tensors a schedule unfroze: their start value, before their first step
            if new:
                self.on_new_tensors(new)

    def on_new_tensors(self, names: list[str]) -> None:
        """Tensors that started training after fit start (a freezing schedule unfroze them)."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._anchor is not None:
            self._start = self._anchor.state_dict()
        super().teardown(trainer, pl_module, stage)
        self._anchor = None

    def state_dict(self) -> dict[str, Any]:
        return {"start": self._anchor.state_dict() if self._anchor is not None else dict(self._start)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start = dict(state_dict.get("start") or {})

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_anchor"] = None
        return state


@takes_settings(BaseTaskOptions)
class ReplayCallback(ForgettingTerm):
    """Experience replay: mix base-task examples into every training step, scored through the original head.

    Each step on ``B`` new-task examples draws ``n ≈ B·fraction/(1 − fraction)`` base-task examples (the remainder
    carries over, so base examples are a share ``fraction`` of all examples seen) and the loss becomes the mean over
    the joint batch, ``(B·L_new + n·L_base)/(B + n)``, with ``L_new`` what your ``training_step`` returned and
    ``L_base`` the cross-entropy of the base examples through the current backbone and the original head. Logged:
    ``replay/loss`` (``L_base``) and ``replay/fraction`` (``n/(B + n)`` this step). With several processes each
    replays its own examples. The position in the base stream is saved in checkpoints, so a resumed run replays
    what it would have.

    Replay your base task's *training* data, and keep a held-out base set for ``ForgettingMonitor``: replaying the
    set you measure forgetting on would hide forgetting.

    Args:
        dataloader: the base-task examples to replay: a ``DataLoader`` (shuffle it for a random order), a
            ``LightningDataModule``, a callable returning a loader, or the name of a LightningModule / DataModule
            method or attribute that returns one (YAML).
        fraction: share of base-task examples in each step, in ``(0, 1)``; ``0.5`` replays as many as are new.
        prefix: logging namespace and checkpoint key.

    Example::

        >>> from peft_callbacks.demo import MLPClassifier, quiet_trainer, random_loader  # any LightningModule, data
        >>> new, old = random_loader(8, batch_size=4), random_loader(6, batch_size=3, seed=1)
        >>> replay = ReplayCallback(old, fraction=0.5)
        >>> trainer = quiet_trainer(max_steps=2, callbacks=[replay])
        >>> trainer.fit(MLPClassifier(lr=0.1), new)
        >>> replay.drawn, replay.seen
        (8, 8)
    """

    def __init__(
        self,
        dataloader: BaseLoader,
        fraction: float = 0.25,
        *,
        base_task: BaseTaskOptions,
        prefix: str = "replay",
    ) -> None:
        super().__init__(base_task, prefix=prefix)
        self.dataloader = check_dataloader(dataloader)
        self.fraction = check_float("fraction", fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self._state: dict[str, Any] = {}
        self._stream: ReplayStream | None = None
        self._scorer: BaseTaskScorer | None = None

    @property
    def drawn(self) -> int:
        """Base-task examples this process replayed so far."""
        return self._stream.drawn if self._stream is not None else self._state.get("drawn", 0)

    @property
    def seen(self) -> int:
        """New-task examples of the steps replay was mixed into."""
        return self._stream.seen if self._stream is not None else self._state.get("seen", 0)

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = resolve_loader(self.dataloader, trainer, pl_module, owner=self.name)
        self._scorer = self.scorer(pl_module)
        self._check_first_batch(pl_module, loader)
        self._stream = ReplayStream(lambda: loader, self.fraction, trainer.global_rank, trainer.world_size)
        if self._state:
            self._stream.skip(self._state.get("position", 0))
            self._stream.drawn, self._stream.seen = self._state.get("drawn", 0), self._state.get("seen", 0)
            self._stream.carry = self._state.get("carry", 0.0)

    def reset(self) -> None:
        self._state = {}

    def _check_first_batch(self, pl_module: pl.LightningModule, loader: Iterable) -> None:
        batch = next(iter(loader), None)
        if batch is None:
            raise ValueError(
                f"The base-task `dataloader` of {self.name} yielded no batches; replay needs at least one."
            )
        with evaluation_mode(pl_module):
            self._scorer.loss(move_to_device(batch, pl_module.device))  # labels present and inside the head

    def term(self, pl_module: pl.LightningModule, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        size = batch_size_of(batch)
        replayed = self._stream.draw(size)
        if replayed is None:
            return loss
        n = batch_size_of(replayed)
        base_loss = self._scorer.loss(move_to_device(replayed, loss.device))
        share = n / (size + n)
        self.log_term(pl_module, "loss", base_loss, batch_size=n)
        pl_module.log(f"{self.prefix}/fraction", share, on_step=True, on_epoch=True, sync_dist=True, batch_size=size)
        return (1.0 - share) * loss + share * base_loss.to(loss.dtype)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._state = self.state_dict()
        super().teardown(trainer, pl_module, stage)
        self._stream, self._scorer = None, None

    def state_dict(self) -> dict[str, Any]:
        if self._stream is None:
            return dict(self._state)
        stream = self._stream
        return {"position": stream.position, "drawn": stream.drawn, "seen": stream.seen, "carry": stream.carry}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = {k: state_dict.get(k, 0) for k in ("position", "drawn", "seen", "carry")}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_stream"], state["_scorer"] = None, None
        return state


@takes_settings(BaseTaskOptions)
class DistillationCallback(_AnchoredTerm):
    """Learning without Forgetting: keep the base-head outputs of the new inputs close to the original model's.

    Adds ``weight · T² · KL(softmax(z_old/T) ‖ softmax(z_new/T))``, averaged over the examples of each training batch
    (Li & Hoiem 2017, eq. 2; Hinton's temperature ``T``), with ``z_new`` the current model's and ``z_old`` the
    original model's outputs through the original head on the batch's inputs. The original model is the current
    one at its starting point — mergeable PEFT layers skipped, every other trained tensor (full fine-tuning,
    adapters, BatchNorm statistics) at its value at fit start, swapped in for a no-grad forward before the step's
    own forward — so no second model is held in memory beyond those starting values. Logged:
    ``distillation/loss`` (the term added). No base-task data is needed.

    Args:
        weight: ``λ`` of the term (> 0).
        temperature: ``T`` (> 0); LwF uses 2.
        base_head: the original head (module, whole original model, or state-dict path), when fine-tuning replaced
            it; ``None``: the current head, as it was at fit start for the original model.
        prefix: logging namespace and checkpoint key.

    Example::

        >>> from peft_callbacks.demo import MLPClassifier, quiet_trainer, random_loader  # any LightningModule, data
        >>> new = random_loader(8, batch_size=4)
        >>> lwf = DistillationCallback(weight=1.0)
        >>> trainer = quiet_trainer(max_steps=3, callbacks=[lwf])
        >>> trainer.fit(MLPClassifier(lr=0.5), new)
        >>> lwf.last_term > 0  # the model moved away from where it started
        True
    """

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 2.0,
        *,
        base_task: BaseTaskOptions,
        prefix: str = "distillation",
    ) -> None:
        super().__init__(base_task, prefix=prefix)
        self.weight = check_positive_float("weight", weight)
        self.temperature = check_positive_float("temperature", temperature)
        self._scorer: BaseTaskScorer | None = None
        self._teacher: torch.Tensor | None = None

    anchor_buffers = True  # the teacher is the starting model, BatchNorm statistics included

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._scorer = self.scorer(pl_module)
        super().prepare(trainer, pl_module)

    def before_step(self, pl_module: pl.LightningModule, batch: Any) -> None:
        inputs = move_to_device(batch, pl_module.device)
        with self._anchor.at_start(), evaluation_mode(pl_module):
            self._teacher = self._scorer.forward(inputs)[0].detach()

    def term(self, pl_module: pl.LightningModule, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        student = self._scorer.forward(move_to_device(batch, loss.device))[0]
        value = self.weight * distillation_loss(student, self._teacher, self.temperature)
        self._teacher = None
        self.log_term(pl_module, "loss", value, batch_size=batch_size_of(batch))
        return loss + value.to(loss.dtype)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._scorer, self._teacher = None, None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_scorer"], state["_teacher"] = None, None
        return state
