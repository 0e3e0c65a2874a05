"""Forgetting bookkeeping: the baseline, each later evaluation, and the figures derived from them.

Forgetting follows Avalanche: ``forgetting = baseline − now`` for metrics where higher is better (accuracy, F1),
and ``now − baseline`` for loss and perplexity, so a positive number always means the base task got worse. The
relative drop is ``100 · forgetting / |baseline|`` and ``max_forgetting`` the largest forgetting seen so far.

Example::

    >>> tracker = ForgettingTracker(higher_is_better=True)
    >>> tracker.record(value=0.80, epoch=0, step=0)["forgetting"]
    0.0
    >>> row = tracker.record(value=0.60, epoch=1, step=10)
    >>> round(row["forgetting"], 4), round(row["relative_drop_percent"], 2)
    (0.2, 25.0)
    >>> round(tracker.record(value=0.70, epoch=2, step=20)["max_forgetting"], 4)
    0.2
"""

from __future__ import annotations

from typing import Any


class ForgettingTracker:
    """Keeps the baseline and the history of base-task evaluations (plain data, so it goes into checkpoints).

    Args:
        higher_is_better: whether a larger metric is better (accuracy) or worse (loss, perplexity).

    Example::

        >>> tracker = ForgettingTracker(higher_is_better=False)  # a loss: rising means forgetting
        >>> _ = tracker.record(value=2.0, epoch=0, step=0)
        >>> tracker.record(value=2.5, epoch=1, step=5)["forgetting"]
        0.5
    """

    def __init__(self, higher_is_better: bool = True) -> None:
        self.higher_is_better = higher_is_better
        self.history: list[dict[str, Any]] = []

    @property
    def baseline(self) -> float | None:
        """The metric at the first evaluation (before any training step), or ``None`` before it."""
        return self.history[0]["value"] if self.history else None

    @property
    def latest(self) -> dict[str, Any] | None:
        """The last recorded evaluation."""
        return self.history[-1] if self.history else None

    def forgetting_of(self, value: float | None) -> float | None:
        """Forgetting of ``value`` relative to the baseline (positive = worse)."""
        if value is None or self.baseline is None:
            return None
        return self.baseline - value if self.higher_is_better else value - self.baseline

    def record(self, value: float | None, epoch: int, step: int, **extra: Any) -> dict[str, Any]:
        """Add one evaluation (the first one is the baseline) and return its row with the derived figures."""
        row: dict[str, Any] = {"epoch": epoch, "step": step, "value": value, **extra}
        self.history.append(row)
        forgetting = self.forgetting_of(value)
        row["forgetting"] = forgetting
        base = self.baseline
        row["relative_drop_percent"] = (
            100.0 * forgetting / abs(base) if forgetting is not None and base not in (None, 0) else None
        )
        seen = [r["forgetting"] for r in self.history if r.get("forgetting") is not None]
        row["max_forgetting"] = max(seen) if seen else None
        return row

    def summary_table(self, metric_name: str) -> str:
        """A plain-text table of every evaluation, for a rank-zero log line."""
        columns = ["epoch", "step", "value", "forgetting", "relative_drop_percent", "kl_to_baseline"]
        columns += ["feature_cosine", "val_metric"]
        titles = ["epoch", "step", f"base {metric_name}", "forgetting", "drop %", "KL", "feat cos", "new-task val"]
        if any(r.get("update_norm") is not None for r in self.history):
            columns.append("update_norm")
            titles.append("|dW|")
        rows = [[_cell(r.get(c)) for c in columns] for r in self.history]
        widths = [max(len(t), *(len(r[i]) for r in rows)) for i, t in enumerate(titles)]
        lines = ["  ".join(t.rjust(w) for t, w in zip(titles, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"higher_is_better": self.higher_is_better, "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.higher_is_better = state.get("higher_is_better", self.higher_is_better)
        self.history = [dict(r) for r in state.get("history", [])]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
