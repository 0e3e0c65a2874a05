"""The learn-vs-forget plot: the base-task metric and the new task's validation metric per epoch (matplotlib Agg).

Example::

    >>> import os, tempfile
    >>> rows = [{"epoch": 0, "value": 0.9, "val_metric": 0.2}, {"epoch": 1, "value": 0.7, "val_metric": 0.6}]
    >>> path = write_forgetting_plot(rows, os.path.join(tempfile.mkdtemp(), "forgetting.png"), "accuracy", "val_acc")
    >>> os.path.getsize(path) > 0
    True
"""

from __future__ import annotations

import os
from typing import Any


def write_forgetting_plot(history: list[dict[str, Any]], path: str, metric_name: str, val_name: str | None) -> str:
    """Write a PNG of the base-task metric (left axis) and the new task's validation metric (right axis).

    Args:
        history: rows with ``epoch``, ``value`` and optionally ``val_metric`` (see ``ForgettingTracker``).
        path: the PNG file to write; its folder is created.
        metric_name: name of the base-task metric, for the axis label.
        val_name: name of the new task's validation metric, or ``None`` when there is none.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, touches no global backend state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    base = [(r["epoch"], r["value"]) for r in history if r.get("value") is not None]
    if base:
        ax.plot(*zip(*base), marker="o", color="tab:red", label=f"base task {metric_name}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"base task {metric_name}", color="tab:red")
    val = [(r["epoch"], r["val_metric"]) for r in history if r.get("val_metric") is not None]
    if val:
        twin = ax.twinx()
        twin.plot(*zip(*val), marker="s", color="tab:blue", label=f"new task {val_name}")
        twin.set_ylabel(f"new task {val_name}", color="tab:blue")
    ax.set_title("Learning vs. forgetting")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path
