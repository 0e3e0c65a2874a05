"""The main job's tables and figure, rewritten after every row so a stopped job leaves what it measured.

A :class:`JobReport` holds one :class:`Panel` per experiment (vision, text). :meth:`JobReport.add` records one row's
:class:`~peft_callbacks.demo.job.Result` and rewrites ``results.md``, ``results.csv``, ``results.json`` and
``results.png``, each atomically: a job killed at any moment leaves the complete files of the rows finished before.

The figure (:func:`plot_results`) puts forgetting (lower is better) against the new-task score (higher is better),
one marker per method and one colour per forgetting control, the same in every panel (:func:`row_styles`), and marks
the Pareto front (:func:`pareto_front`): the rows no other row beats on both counts.

Example::

    >>> import json, os, tempfile
    >>> from peft_callbacks.demo.job import Result
    >>> report = JobReport(tempfile.mkdtemp(), [Panel("vision", "Vision", "acc", "forgetting")])
    >>> report.add("vision", Result("LoRA r=4", 0.84, 0.36, 19_173, 226_626, 90_600, 1.0))
    >>> json.load(open(os.path.join(report.out, "results.json")))["vision"][0]["method"]
    'LoRA r=4'
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field

from peft_callbacks.io.atomic import atomic_file

MARKERS = "osD^vP*XhpH<>d8"
COLOURS = ["tab:grey", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
FILES = ("results.md", "results.csv", "results.json", "results.png")


@dataclass
class Panel:
    """One experiment of the job: a table in ``results.md`` and a panel of the figure.

    Attributes:
        key: the experiment's key in ``results.json`` (``"vision"``).
        title: the table's heading and the panel's title.
        score_name: the new-task score's name (higher is better).
        forgetting_name: the forgetting measure's name (lower is better).
        results: the rows finished so far, in order.
    """

    key: str
    title: str
    score_name: str
    forgetting_name: str
    results: list = field(default_factory=list)


class JobReport:
    """The job's tables and figure in ``out``, rewritten whole after every row (see the module docstring).

    Args:
        out: the job's output directory.
        panels: the experiments, in the order of the tables.
        total_rows: the rows the job will run, for the "rows done" line of ``results.md`` while it runs.
    """

    def __init__(self, out: str, panels: list[Panel], total_rows: int | None = None) -> None:
        self.out = out
        self.panels = {p.key: p for p in panels}
        self.total_rows = total_rows
        self.start = time.perf_counter()

    def add(self, key: str, result) -> None:
        """Record one row's result in panel ``key`` and rewrite every file."""
        self.panels[key].results.append(result)
        self.write()

    @property
    def rows(self) -> int:
        return sum(len(p.results) for p in self.panels.values())

    def markdown(self) -> str:
        """Every panel's table, then the time taken (and the rows done, while rows remain)."""
        sections = [
            f"## {p.title}\n\n{format_table(p.results, p.score_name, p.forgetting_name)}"
            for p in self.panels.values()
            if p.results
        ]
        seconds = time.perf_counter() - self.start
        running = self.total_rows is not None and self.rows < self.total_rows
        footer = f"Rows done: {self.rows}/{self.total_rows}; time so far" if running else "Total time"
        return "\n\n".join(sections) + f"\n\n{footer}: {seconds:.0f} s\n"

    def write(self) -> None:
        """Write ``results.md``/``.csv``/``.json``/``.png`` in ``out``, each replaced in one step."""
        os.makedirs(self.out, exist_ok=True)
        _write_text(os.path.join(self.out, "results.md"), self.markdown())
        _write_text(os.path.join(self.out, "results.csv"), self.csv())
        dump = {key: [r.as_dict() for r in p.results] for key, p in self.panels.items()}
        _write_text(os.path.join(self.out, "results.json"), json.dumps(dump, indent=2))
        drawn = [(p.title, p.results, p.score_name, p.forgetting_name) for p in self.panels.values() if p.results]
        if drawn:
            plot_results(drawn, os.path.join(self.out, "results.png"))

    def csv(self) -> str:
        """One line per row: its panel, then every field of its result (``extra`` figures as their own columns)."""
        rows = [
            {"panel": key, **{k: v for k, v in r.as_dict().items() if k != "extra"}, **r.extra}
            for key, p in self.panels.items()
            for r in p.results
        ]
        columns = list(dict.fromkeys(k for row in rows for k in row)) or ["panel", "method"]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return text.getvalue()


def _write_text(path: str, text: str) -> None:
    with atomic_file(path) as staging:
        staging.write_text(text, encoding="utf-8")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_table(results: list, score_name: str, forgetting_name: str) -> str:
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


def method_family(name: str) -> tuple[str, str]:
    """``(method, forgetting control)`` of a row's name, settings left out: the row's style in every panel.

    Parenthesised notes, ``key=value`` settings and figures are dropped; a leading ``name=value`` keeps its name.

    Example::

        >>> method_family("LoRA r=4 + replay 40%"), method_family("LoRA r=8 (q,v)")
        (('LoRA', 'replay'), ('LoRA', ''))
        >>> method_family("freeze=6 (last layer + head)"), method_family("full fine-tuning + L2-SP α=3")
        (('freeze', ''), ('full fine-tuning', 'L2-SP'))
    """
    base, _, control = re.sub(r"\s*\([^)]*\)", "", name).partition(" + ")
    return _without_settings(base), _without_settings(control)


def _without_settings(part: str) -> str:
    words = part.split()
    if not words:
        return ""
    kept = [w for w in words[1:] if not re.search(r"[=≤≥<>%\d]", w)]
    return " ".join([words[0].split("=")[0], *kept])


def row_styles(names: list[str]) -> dict[str, tuple[str, str]]:
    """``{row name: (marker, colour)}``: one marker per method (``"LoRA"`` whether ``r=4`` or ``r=8 (q,v)``), one
    colour per forgetting control (grey for none), the same in every panel (see :func:`method_family`).

    Example::

        >>> styles = row_styles(["full fine-tuning", "LoRA r=4", "LoRA r=8 (q,v)", "LoRA r=4 + replay 40%"])
        >>> styles["LoRA r=4"] == styles["LoRA r=8 (q,v)"], styles["LoRA r=4"][0] == styles["LoRA r=4 + replay 40%"][0]
        (True, True)
    """
    methods, controls, styles = [], [""], {}
    for name in names:
        method, control = method_family(name)
        methods += [method] if method not in methods else []
        controls += [control] if control not in controls else []
        styles[name] = (MARKERS[methods.index(method) % len(MARKERS)], COLOURS[controls.index(control) % len(COLOURS)])
    return styles


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both counts, by ``x``: less forgetting (``x``, lower is better) and a
    higher new-task score (``y``). A point beats another when it is at least as good on both and better on one; a
    point that beats all others is the whole front. Points with a NaN are left out.

    Example::

        >>> pareto_front([(0.6, 0.9), (0.1, 0.8), (0.3, 0.7), (0.0, 0.5)])
        [(0.0, 0.5), (0.1, 0.8), (0.6, 0.9)]
        >>> pareto_front([(-0.01, 0.91), (0.02, 0.88), (0.6, 0.9)])  # the first beats both others
        [(-0.01, 0.91)]
    """
    front, best = [], -math.inf
    finite = [(x, y) for x, y in points if not (math.isnan(x) or math.isnan(y))]
    for x, y in sorted(finite, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_results(panels: list[tuple[str, list, str, str]], path: str) -> str:
    """One scatter panel per experiment: forgetting (x) against new-task score (y), with the Pareto front ringed and
    joined by a dashed line (the rows no other row beats on both). Markers follow :func:`row_styles`; the legend gives
    each row's trainable parameters and what it stores per task. The PNG is replaced in one step.

    Args:
        panels: ``(title, results, score label, forgetting label)`` per panel.
        path: the PNG to write.
    """
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, touches no global backend state

    styles = row_styles([r.method for _, results, *_ in panels for r in results])
    fig = Figure(figsize=(7.5 * len(panels), 6), dpi=110)
    for i, (title, results, score_name, forgetting_name) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for r in results:
            x = r.forgetting if r.forgetting is not None else float("nan")
            marker, colour = styles[r.method]
            label = f"{r.method}: {r.trainable_params:,} trainable, {_size(r.stored_bytes)}"
            ax.scatter(x, r.new_task_score, s=90, marker=marker, color=colour, alpha=0.85, label=label)
        _draw_front(ax, pareto_front([(r.forgetting, r.new_task_score) for r in results if r.forgetting is not None]))
        ax.set_xlabel(f"{forgetting_name} (lower is better)")
        ax.set_ylabel(f"{score_name} (higher is better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False)
    fig.tight_layout()
    with atomic_file(path) as staging:
        fig.savefig(staging, format="png", bbox_inches="tight")
    return path


def _draw_front(ax, front: list[tuple[float, float]]) -> None:
    """Ring the front's points (one point, when it beats every other row) and join them with a dashed line."""
    if not front:
        return
    xs, ys = zip(*front)
    label = "Pareto front" if len(front) > 1 else "Pareto front: beats every other row"
    ax.scatter(xs, ys, s=260, facecolors="none", edgecolors="black", linewidths=1, alpha=0.6, label=label)
    if len(front) > 1:
        ax.plot(xs, ys, linestyle="--", color="black", alpha=0.6, linewidth=1.2)


def seeds_table(folders: list[str]) -> str:
    """A markdown table per panel of the mean ± half-range (over the runs in ``folders``, e.g. one per ``--seed``) of
    each row's new-task score and forgetting, from their ``results.json``; rows missing from a run are left out.

    Example::

        >>> import json, os, tempfile
        >>> folders = [tempfile.mkdtemp() for _ in range(2)]
        >>> for folder, (score, forgot) in zip(folders, [(0.8, 0.1), (0.9, 0.3)]):
        ...     row = {"method": "LoRA", "new_task_score": score, "forgetting": forgot}
        ...     json.dump({"vision": [row]}, open(os.path.join(folder, "results.json"), "w"))
        >>> print(seeds_table(folders))
        | vision (2 runs) | new-task score | forgetting |
        |---|---:|---:|
        | LoRA | 0.850 ± 0.050 | +0.200 ± 0.100 |
    """
    runs = []
    for folder in folders:
        with open(os.path.join(folder, "results.json")) as f:
            runs.append(json.load(f))
    lines: list[str] = []
    for key in runs[0]:
        if lines:
            lines.append("")
        lines += [f"| {key} ({len(runs)} runs) | new-task score | forgetting |", "|---|---:|---:|"]
        for row in runs[0][key]:
            rows = [next((r for r in run.get(key, []) if r["method"] == row["method"]), None) for run in runs]
            if any(r is None for r in rows):
                continue
            score = _mean_spread([r["new_task_score"] for r in rows], "{:.3f}")
            forgetting = _mean_spread([r["forgetting"] for r in rows], "{:+.3f}")
            lines.append(f"| {row['method']} | {score} | {forgetting} |")
    return "\n".join(lines)


def _mean_spread(values: list[float | None], form: str) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    mean, spread = sum(values) / len(values), (max(values) - min(values)) / 2
    return f"{form.format(mean)} ± {spread:.3f}"


if __name__ == "__main__":  # python -m peft_callbacks.demo.report outputs/seed0 outputs/seed1 outputs/seed2
    import sys

    print(seeds_table(sys.argv[1:]))
