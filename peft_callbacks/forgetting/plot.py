"""Plots (matplotlib, Agg, no pyplot state): learn-vs-forget per epoch, several tasks, and the finish's ``s`` curve.

* :func:`write_forgetting_plot`: the base-task metric and the new task's validation metric per epoch.
* :func:`write_tasks_plot`: every monitored task's metric per evaluation, fits one after the other.
* :func:`write_finish_plot`: the learn-vs-forget panel beside the forgetting-aware finish's curve (new-task score and
  forgetting against the scale ``s`` of the update, the budget and the chosen ``s``).

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


def _figure(columns: int = 1):
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, touches no global backend state

    fig = Figure(figsize=(6 * columns, 4), dpi=100)
    return fig, [fig.add_subplot(1, columns, i + 1) for i in range(columns)]


def _save(fig, path: str) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def draw_learn_vs_forget(ax, history: list[dict[str, Any]], metric_name: str, val_name: str | None) -> None:
    """Draw the base-task metric (left axis, red) and the new task's validation metric (right axis, blue)."""
    from matplotlib.ticker import MaxNLocator

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
    fig, (ax,) = _figure()
    draw_learn_vs_forget(ax, history, metric_name, val_name)
    return _save(fig, path)


def write_tasks_plot(
    history: list[dict[str, Any]], path: str, metric_name: str, val_name: str | None, tasks: list[str]
) -> str:
    """Write a PNG of every task's metric per evaluation (fits one after the other, dotted lines between fits).

    Args:
        history: rows with ``fit`` and ``tasks`` (``{name: {"value": ...}}``), as ``ForgettingMonitor`` records them
            for several tasks.
        path: the PNG file to write.
        metric_name: the metric's name, for the axis label.
        val_name: the new task's validation metric name (drawn on a second axis when present).
        tasks: the task names, in order.

    Example::

        >>> import os, tempfile
        >>> rows = [{"fit": 0, "tasks": {"a": {"value": 0.9}}}, {"fit": 0, "tasks": {"a": {"value": 0.5}}}]
        >>> os.path.getsize(write_tasks_plot(rows, os.path.join(tempfile.mkdtemp(), "t.png"), "acc", None, ["a"])) > 0
        True
    """
    fig, (ax,) = _figure()
    for name in tasks:
        points = [
            (i, r["tasks"][name]["value"]) for i, r in enumerate(history) if r["tasks"][name]["value"] is not None
        ]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    for i in range(1, len(history)):
        if history[i].get("fit") != history[i - 1].get("fit"):
            ax.axvline(i - 0.5, color="grey", linestyle=":")
    val = [(i, r["val_metric"]) for i, r in enumerate(history) if r.get("val_metric") is not None]
    if val:
        twin = ax.twinx()
        twin.plot(*zip(*val), marker="s", linestyle="--", color="black", label=f"new task {val_name}")
        twin.set_ylabel(f"new task {val_name}")
    ax.set_xlabel("evaluation (dotted: a new fit)")
    ax.set_ylabel(metric_name)
    ax.legend(fontsize=8)
    ax.set_title("Every task, fit after fit")
    return _save(fig, path)


def draw_finish_curve(ax, curve: list[dict[str, Any]], chosen: float, budget: float, new_name: str) -> None:
    """Draw the finish's curve: new-task score (left axis) and forgetting (right axis) against ``s``."""
    s = [p["s"] for p in curve]
    new = [(p["s"], p["new_task"]) for p in curve if p["new_task"] is not None]
    if new:
        ax.plot(*zip(*new), marker="s", color="tab:blue", label=f"new task {new_name}")
    ax.set_xlabel("scale s of the update (0: before fine-tuning, 1: trained)")
    ax.set_ylabel(f"new task {new_name}", color="tab:blue")
    ax.axvline(chosen, color="tab:green", linestyle="--", label=f"chosen s={chosen:g}")
    twin = ax.twinx()
    forgetting = [(p["s"], p["forgetting"]) for p in curve if p["forgetting"] is not None]
    if forgetting:
        twin.plot(*zip(*forgetting), marker="o", color="tab:red", label="forgetting")
    twin.axhline(budget, color="tab:red", linestyle=":", label=f"max_forgetting={budget:g}")
    twin.set_ylabel("base-task forgetting", color="tab:red")
    ax.set_xlim(min(s) - 0.03, max(s) + 0.03)
    ax.set_title("Forgetting-aware finish")
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = twin.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, fontsize=8, loc="center right")


def write_finish_plot(
    curve: list[dict[str, Any]],
    chosen: float,
    budget: float,
    path: str,
    new_name: str,
    history: list[dict[str, Any]] | None = None,
    metric_name: str = "accuracy",
    val_name: str | None = None,
) -> str:
    """Write the finish's curve as a PNG, beside the learn-vs-forget plot of ``history`` when one is given.

    Args:
        curve: points ``{"s", "new_task", "forgetting"}``.
        chosen: the ``s`` the finish chose.
        budget: ``max_forgetting``.
        path: the PNG file to write.
        new_name: the new-task metric's name.
        history: a ``ForgettingMonitor``'s history (one base task), drawn on the left.
        metric_name: the base-task metric's name, for that panel.
        val_name: the new task's validation metric, for that panel.

    Example::

        >>> import os, tempfile
        >>> curve = [{"s": 0.0, "new_task": 0.1, "forgetting": 0.0}, {"s": 1.0, "new_task": 0.9, "forgetting": 0.4}]
        >>> os.path.getsize(write_finish_plot(curve, 0.0, 0.1, os.path.join(tempfile.mkdtemp(), "f.png"), "acc")) > 0
        True
    """
    fig, axes = _figure(2 if history else 1)
    if history:
        draw_learn_vs_forget(axes[0], history, metric_name, val_name)
    draw_finish_curve(axes[-1], curve, chosen, budget, new_name)
    return _save(fig, path)
