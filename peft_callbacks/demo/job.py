"""Run one fine-tuning method and measure it: the machinery behind ``examples/main_job.py``.

A method is one :class:`Method` row (a name, the callbacks that implement it, a learning rate). :func:`run_method`
fine-tunes a fresh LightningModule with those callbacks plus the caller's monitors, and returns a :class:`Result`:
new-task score, base-task forgetting, trainable parameters, the size of what must be stored for the task, and wall
time. :func:`run_rows` runs a job's rows one after the other, naming each as it starts and rewriting the tables and
the figure (:mod:`peft_callbacks.demo.report`) as each finishes. :func:`quiet_repeated_tips` lets each of
Lightning's tips through once per job instead of once per ``Trainer``.

Example::

    >>> from peft_callbacks import LoRACallback
    >>> row = Method("LoRA r=4", lambda out: [LoRACallback(rank=4, save_adapter_to=out)], lr=3e-3)
    >>> [type(c).__name__ for c in row.make_callbacks("runs/lora/adapter")]
    ['LoRACallback']
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from peft_callbacks.callbacks.finish import ForgettingAwareFinish
from peft_callbacks.core.params import count_parameters, unique_parameters
from peft_callbacks.demo.report import JobReport, format_table, pareto_front, plot_results, row_styles

__all__ = [
    "Method",
    "Result",
    "Row",
    "RunStats",
    "format_table",
    "pareto_front",
    "plot_results",
    "quiet_repeated_tips",
    "row_styles",
    "run_method",
    "run_rows",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One fine-tuning method of the comparison: one row of the main job's table.

    Attributes:
        name: the name shown in the table and the plot.
        make_callbacks: builds fresh callbacks for one run from the folder where an adapter file may be written
            (``lambda out: [LoRACallback(rank=8, save_adapter_to=out)]``; ``lambda out: []`` is full fine-tuning).
        lr: learning rate of this method's run.
        note: a few words for the table's reader.
    """

    name: str
    make_callbacks: Callable[[str], list[Callback]]
    lr: float = 1e-3
    note: str = ""


@dataclass
class Result:
    """What one run measured (``None`` where a figure does not apply)."""

    method: str
    new_task_score: float
    forgetting: float | None
    trainable_params: int
    total_params: int
    stored_bytes: int
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class RunStats(Callback):
    """Measures a run: trainable parameters after surgery, wall time of ``fit``, and what the task must store.

    At ``on_train_start`` (surgery done, optimizer built) it counts parameters; at ``on_train_end`` — before
    callbacks listed after it merge anything — it writes the tensors that trained to ``trainable.safetensors`` in
    ``out_dir``. What a task must store is the adapter file when the method wrote one into ``adapter/`` (its
    ``save_adapter_to``), else that file of trained tensors (the whole model for full fine-tuning).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.trainable_params = 0
        self.total_params = 0
        self.stored_bytes = 0
        self.seconds = 0.0
        self._start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        count = count_parameters(pl_module)
        self.trainable_params, self.total_params = count.trainable, count.total

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from safetensors.torch import save_file

        trainable = {id(p) for p in unique_parameters(pl_module) if p.requires_grad}
        tensors = {n: p.detach().contiguous() for n, p in pl_module.named_parameters() if id(p) in trainable}
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, "trainable.safetensors")
        save_file(tensors, path)
        self.stored_bytes = os.path.getsize(path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self._start
        adapter = os.path.join(self.out_dir, "adapter")
        if os.path.isdir(adapter):
            self.stored_bytes = sum(os.path.getsize(os.path.join(adapter, f)) for f in os.listdir(adapter))


def run_method(
    method: Method,
    make_module: Callable[[float], pl.LightningModule],
    datamodule: pl.LightningDataModule,
    out_dir: str,
    monitors: list[Callback],
    trainer_kwargs: dict,
    score_key: str = "test/acc",
) -> tuple[Result, pl.Trainer]:
    """Fine-tune ``make_module(method.lr)`` on ``datamodule`` with the method's callbacks and ``monitors``.

    Args:
        method: the row to run.
        make_module: builds a fresh LightningModule for a learning rate (same starting weights every time).
        datamodule: the new task.
        out_dir: where this run's logs and files go (the CSV logger writes ``metrics.csv`` there).
        monitors: callbacks that measure forgetting; they run after the method's callbacks.
        trainer_kwargs: extra ``Trainer`` arguments (``max_epochs``, ``limit_train_batches``, …).
        score_key: the metric reported as the new-task score: ``"test/…"`` runs ``trainer.test`` after ``fit`` (on
            the DataModule's test split, which nothing selects on) when the module has a ``test_step``; ``"val/…"``
            reads the last validation (again after a finish that changed the weights).

    Returns:
        The :class:`Result` (``forgetting`` left ``None``: the caller reads it from its monitor) and the trainer.
    """
    from lightning.pytorch.loggers import CSVLogger

    stats = RunStats(out_dir)
    trainer = pl.Trainer(
        callbacks=[stats, *method.make_callbacks(os.path.join(out_dir, "adapter")), *monitors],
        logger=CSVLogger(out_dir, name="", version=""),
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
        **trainer_kwargs,
    )
    module = make_module(method.lr)
    trainer.fit(module, datamodule=datamodule)
    if score_key.startswith("test/") and is_overridden("test_step", module, pl.LightningModule):
        trainer.test(module, datamodule=datamodule, verbose=False)
    elif any(isinstance(c, ForgettingAwareFinish) for c in trainer.callbacks):  # weights changed after validation
        trainer.validate(module, datamodule=datamodule, verbose=False)
    score = float(trainer.callback_metrics.get(score_key, torch.tensor(float("nan"))))
    result = Result(
        method=method.name,
        new_task_score=score,
        forgetting=None,
        trainable_params=stats.trainable_params,
        total_params=stats.total_params,
        stored_bytes=stats.stored_bytes,
        seconds=stats.seconds,
    )
    return result, trainer


@dataclass(frozen=True)
class Row:
    """One row of a job: a method, the panel its result goes to, and how to run it.

    Attributes:
        panel: the :class:`~peft_callbacks.demo.report.Panel` key (``"vision"``).
        method: the row's method.
        run: fine-tunes and measures the method, returning its :class:`Result`.
    """

    panel: str
    method: Method
    run: Callable[[Method], Result]


def run_rows(rows: list[Row], report: JobReport) -> JobReport:
    """Run ``rows`` in order, naming each as it starts (``row 3/28: LoRA r=4 (vision)``) and rewriting the report's
    files (``results.md``/``.csv``/``.json``/``.png``, each atomically) as each finishes: a job stopped at any row
    keeps the complete results of the rows before it.

    Example::

        >>> import os, tempfile
        >>> from peft_callbacks.demo.report import JobReport, Panel
        >>> report = JobReport(tempfile.mkdtemp(), [Panel("toy", "Toy", "acc", "forgetting")])
        >>> measured = lambda m: Result(m.name, 0.9, 0.1, 10, 100, 400, 1.0)
        >>> rows = [Row("toy", Method(name, lambda out: []), measured) for name in ("a", "b")]
        >>> [r.method for r in run_rows(rows, report).panels["toy"].results]
        ['a', 'b']
        >>> sorted(os.listdir(report.out))
        ['results.csv', 'results.json', 'results.md', 'results.png']
    """
    report.total_rows = len(rows)
    for i, row in enumerate(rows, 1):
        rank_zero_info(f"row {i}/{len(rows)}: {row.method.name} ({row.panel})")
        result = row.run(row.method)
        report.add(row.panel, result)
        forgetting = "n/a" if result.forgetting is None else f"{result.forgetting:+.3f}"
        rank_zero_info(
            f"row {i}/{len(rows)} done: {row.method.name}: new task {result.new_task_score:.3f}, forgetting "
            f"{forgetting}, {result.seconds:.0f} s; results so far in {report.out}"
        )
    return report


class _OncePerJob(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefix):
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextlib.contextmanager
def quiet_repeated_tips(prefix: str = "💡 Tip") -> Iterator[None]:
    """Inside the block, each of Lightning's tip lines (``💡 Tip: …``, logged by every new ``Trainer``) is shown once.

    Example::

        >>> logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        >>> with quiet_repeated_tips():
        ...     [logger.filters[-1].filter(logging.makeLogRecord({"msg": "💡 Tip: x"})) for _ in range(2)]
        [True, False]
    """
    loggers = [
        logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    ]
    once = _OncePerJob(prefix)
    for logger in loggers:
        logger.addFilter(once)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(once)
