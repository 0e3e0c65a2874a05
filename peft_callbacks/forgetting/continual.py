r"""The accuracy matrix of sequential fine-tunes, with average accuracy and backward transfer (BWT).

Rows are evaluations of every task: row 0 before the first fine-tune (``"start"``), then one row at the end of each
fine-tune, which names the task it trained (``None``: a task outside the matrix). ``R[k][j]`` is the metric of task
``j`` at row ``k``. The definitions are Avalanche's (``ExperienceForgetting``, ``StreamBWT``), which for one pass
over the tasks are those of Lopez-Paz & Ranzato (2017, GEM, §5):

* a task's **reference** is its value at the end of the last fine-tune that trained it (Avalanche's "accuracy just
  after training on the experience"); a task that no fine-tune trained and that comes *before* the last trained task
  in the task order was learned before monitoring began (a base task): its reference is the start row. Tasks after
  it have not been learned yet;
* **forgetting** of task ``j`` = reference − ``R[last][j]`` (``R[last][j]`` − reference when lower is better), defined
  once a later row exists (the task just trained has none yet, as in Avalanche);
* **BWT** = − mean forgetting over the tasks where it is defined (``1/(T−1) Σ_{i<T} (R[T][i] − R[i][i])`` for tasks
  trained one after the other);
* **average accuracy** = mean of ``R[last][j]`` over the tasks learned so far (Chaudhry et al. 2018's ``A_k``; GEM's
  ``ACC`` once every task is learned). It weighs tasks equally; Avalanche's stream accuracy weighs examples.

Example::

    >>> matrix = TaskMatrix(["A", "B"])
    >>> _ = matrix.record({"A": 0.90, "B": 0.10}, trained=None)    # start: A was learned before
    >>> _ = matrix.record({"A": 0.70, "B": 0.80}, trained="B")     # after fine-tuning on B
    >>> round(matrix.forgetting("A"), 4), matrix.forgetting("B"), round(matrix.bwt(), 4)
    (0.2, None, -0.2)
    >>> round(matrix.average(), 4)
    0.75
"""

from __future__ import annotations

from typing import Any


class TaskMatrix:
    """Rows of per-task values after each fine-tune, and the figures derived from them (see module docstring).

    Args:
        tasks: task names, in the order they are learned.
        higher_is_better: whether a larger metric is better (accuracy) or worse (loss).
    """

    def __init__(self, tasks: list[str], higher_is_better: bool = True) -> None:
        self.tasks = list(tasks)
        self.higher_is_better = higher_is_better
        self.rows: list[dict[str, Any]] = []

    def record(self, values: dict[str, float | None], trained: str | None, label: str | None = None) -> dict:
        """Add a row: each task's value now, and the task the fine-tune that just ended trained (``None`` at start)."""
        if trained is not None and trained not in self.tasks:
            raise ValueError(f"`task`={trained!r} is not one of the monitored tasks {self.tasks}.")
        label = label or ("start" if not self.rows else f"after {trained or f'fit {len(self.rows)}'}")
        row = {"label": label, "trained": trained, "values": {t: values.get(t) for t in self.tasks}}
        self.rows.append(row)
        return row

    def matrix(self) -> list[list[float | None]]:
        """``R[k][j]``: one list per row, one entry per task (in task order)."""
        return [[row["values"][t] for t in self.tasks] for row in self.rows]

    def _last_trained_index(self, rows: list[dict[str, Any]], training: str | None) -> int:
        names = [r["trained"] for r in rows] + [training]
        trained = [self.tasks.index(name) for name in names if name is not None]
        return max(trained) if trained else len(self.tasks)

    def reference_row(
        self, task: str, rows: list[dict[str, Any]] | None = None, training: str | None = None
    ) -> int | None:
        """Index of the row ``task`` is measured against after ``rows`` (default: all) while ``training`` is being
        trained, or ``None`` when ``task`` is not learned yet (or is the one being trained for the first time)."""
        rows = self.rows if rows is None else rows
        if not rows:
            return None
        trained = [k for k, r in enumerate(rows) if r["trained"] == task]
        if trained:
            return trained[-1]
        if task == training:
            return None
        return 0 if self.tasks.index(task) < self._last_trained_index(rows, training) else None

    def learned(self) -> list[str]:
        """Tasks learned by the last row (base tasks and every task trained so far)."""
        return [t for t in self.tasks if self.reference_row(t) is not None]

    def forgetting_of(self, task: str, value: float | None, training: str | None = None) -> float | None:
        """Forgetting of ``task`` if its value were ``value`` now, while ``training`` is being trained."""
        if task == training:
            return None
        ref = self.reference_row(task, training=training)
        if ref is None or value is None or self.rows[ref]["values"][task] is None:
            return None
        reference = self.rows[ref]["values"][task]
        return reference - value if self.higher_is_better else value - reference

    def forgetting(self, task: str) -> float | None:
        """Forgetting of ``task`` at the last row (``None`` while not defined)."""
        ref = self.reference_row(task)
        if ref is None or ref == len(self.rows) - 1:
            return None
        return self.forgetting_of(task, self.rows[-1]["values"][task])

    def evaluation(self, values: dict[str, float | None], training: str | None = None) -> dict[str, Any]:
        """Figures of an evaluation while ``training`` is trained: per task ``value``, ``forgetting`` and
        ``relative_drop_percent`` (against the task's reference row), their ``forgetting`` maximum, and ``value``,
        the average over the tasks learned so far and the one being trained."""
        tasks = {}
        for name in self.tasks:
            forgetting = self.forgetting_of(name, values.get(name), training=training)
            ref = self.reference_row(name, training=training)
            start = None if ref is None else self.rows[ref]["values"][name]
            drop = None if forgetting is None or not start else 100.0 * forgetting / abs(start)
            tasks[name] = {"value": values.get(name), "forgetting": forgetting, "relative_drop_percent": drop}
        seen = [n for n in self.tasks if n == training or self.reference_row(n, training=training) is not None]
        seen_values = [values[n] for n in seen if values.get(n) is not None]
        measured = [t["forgetting"] for t in tasks.values() if t["forgetting"] is not None]
        return {
            "value": sum(seen_values) / len(seen_values) if seen_values else None,
            "forgetting": max(measured) if measured else None,
            "tasks": tasks,
        }

    def bwt(self) -> float | None:
        """Backward transfer: − mean forgetting over the tasks where it is defined (``None`` if none is)."""
        values = [f for f in (self.forgetting(t) for t in self.tasks) if f is not None]
        return -sum(values) / len(values) if values else None

    def average(self) -> float | None:
        """Mean of the last row over the tasks learned so far (``None`` before any row)."""
        if not self.rows:
            return None
        values = [self.rows[-1]["values"][t] for t in self.learned() if self.rows[-1]["values"][t] is not None]
        return sum(values) / len(values) if values else None

    def summary_table(self, metric_name: str) -> str:
        """A plain-text matrix: one line per row, one column per task, then average and BWT."""
        width = max(8, *(len(t) for t in self.tasks))
        label_width = max(5, *(len(r["label"]) for r in self.rows)) if self.rows else 5
        lines = [" " * label_width + "  " + "  ".join(t.rjust(width) for t in self.tasks)]
        for row in self.rows:
            cells = ["-" if row["values"][t] is None else f"{row['values'][t]:.4f}" for t in self.tasks]
            lines.append(row["label"].rjust(label_width) + "  " + "  ".join(c.rjust(width) for c in cells))
        average, bwt = self.average(), self.bwt()
        lines.append(f"average {metric_name}: {'-' if average is None else f'{average:.4f}'}")
        lines.append(f"backward transfer (BWT): {'-' if bwt is None else f'{bwt:+.4f}'}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "higher_is_better": self.higher_is_better,
            "rows": [dict(r) for r in self.rows],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.higher_is_better = state.get("higher_is_better", self.higher_is_better)
        self.rows = [dict(r, values=dict(r["values"])) for r in state.get("rows", [])]
