"""Run one fine-tuning method and measure it: the machinery behind ``examples/main_job.py``.

A method is one :class:`Method` row (a name, the callbacks that implement it, a learning rate). :func:`run_method`
fine-tunes a fresh LightningModule with those callbacks plus the caller's monitors, and returns a :class:`Result`:
new-task score, base-task forgetting, trainable parameters, the size of what must be stored for the task, and wall
time. :func:`format_table` and :func:`plot_results` turn results into the table and the figure (new-task score
against forgetting, one marker per method, the Pareto front drawn). :func:`quiet_repeated_tips` lets each of
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

from peft_callbacks.callbacks.finish import ForgettingAwareFinish
from peft_callbacks.core.params import count_parameters, unique_parameters

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
    score_key: str = "val/acc",
) -> tuple[Result, pl.Trainer]:
    """Fine-tune ``make_module(method.lr)`` on ``datamodule`` with the method's callbacks and ``monitors``.

    Args:
        method: the row to run.
        make_module: builds a fresh LightningModule for a learning rate (same starting weights every time).
        datamodule: the new task.
        out_dir: where this run's logs and files go (the CSV logger writes ``metrics.csv`` there).
        monitors: callbacks that measure forgetting; they run after the method's callbacks.
        trainer_kwargs: extra ``Trainer`` arguments (``max_epochs``, ``limit_train_batches``, …).
        score_key: the validation metric reported as the new-task score.

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
    if any(isinstance(c, ForgettingAwareFinish) for c in trainer.callbacks):  # weights changed after validation
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


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_table(results: list[Result], score_name: str, forgetting_name: str) -> str:
    """A Markdown table of results: one row per method."""
    header = f"| method | {score_name} | {forgetting_name} | trainable params | stored per task | time |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        forgetting = "n/a" if r.forgetting is None else f"{r.forgetting:+.3f}"
        share = 100.0 * r.trainable_params / r.total_params if r.total_params else 0.0
        lines.append(
            f"| {r.method} | {r.new_task_score:.3f} | {forgetting} | {r.trainable_params:,} ({share:.1f}%) "
            f"| {_size(r.stored_bytes)} | {r.seconds:.0f} s |"
        )
    return "\n".join(lines)


MARKERS = "osD^vP*XhpH<>d8"
COLOURS = ["tab:grey", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]


def row_styles(names: list[str]) -> dict[str, tuple[str, str]]:
    """``{method name: (marker, colour)}``: one marker per base method (the name before ``" + "``), one colour per
    forgetting control (after it; grey for none), the same in every panel, so no two rows share a style.

    Example::

        >>> styles = row_styles(["full fine-tuning", "LoRA r=4", "LoRA r=4 + replay 40%"])
        >>> styles["LoRA r=4"][0] == styles["LoRA r=4 + replay 40%"][0], styles["full fine-tuning"][0]
        (True, 'o')
    """
    bases, controls, styles = [], [""], {}
    for name in names:
        base, _, control = name.partition(" + ")
        control = control.split(" ")[0] if control else ""
        bases += [base] if base not in bases else []
        controls += [control] if control not in controls else []
        styles[name] = (MARKERS[bases.index(base) % len(MARKERS)], COLOURS[controls.index(control) % len(COLOURS)])
    return styles


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both counts (less forgetting ``x``, higher score ``y``), by ``x``.

    Example::

        >>> pareto_front([(0.6, 0.9), (0.1, 0.8), (0.3, 0.7), (0.0, 0.5)])
        [(0.0, 0.5), (0.1, 0.8), (0.6, 0.9)]
    """
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_results(panels: list[tuple[str, list[Result], str, str]], path: str) -> str:
    """One scatter panel per experiment: forgetting (x) against new-task score (y), with the Pareto front (the rows
    no other row beats on both) as a dashed line. Markers follow :func:`row_styles`; the legend gives each row's
    trainable parameters and what it stores per task.

    Args:
        panels: ``(title, results, score label, forgetting label)`` per panel.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = row_styles([r.method for _, results, *_ in panels for r in results])
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 6), squeeze=False)
    for ax, (title, results, score_name, forgetting_name) in zip(axes[0], panels):
        for r in results:
            x = r.forgetting if r.forgetting is not None else float("nan")
            marker, colour = styles[r.method]
            label = f"{r.method}: {r.trainable_params:,} trainable, {_size(r.stored_bytes)}"
            ax.scatter(x, r.new_task_score, s=90, marker=marker, color=colour, alpha=0.85, label=label)
        front = pareto_front([(r.forgetting, r.new_task_score) for r in results if r.forgetting is not None])
        if len(front) > 1:
            ax.plot(*zip(*front), linestyle="--", color="black", alpha=0.4, linewidth=1, label="Pareto front")
        ax.set_xlabel(f"{forgetting_name} (lower is better)")
        ax.set_ylabel(f"{score_name} (higher is better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.12), frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


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
