"""Every example runs (briefly, with ``--quick``) so none of them rots; the main job writes its table and plot."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os

import lightning as L
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_job_quick(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    job = load_example("main_job")
    out = job.main(["--quick", "--methods", "full,LoRA", "--out", str(tmp_path / "job")])
    printed = capsys.readouterr().out
    assert f"Output directory: {out}" in printed
    assert os.path.getsize(os.path.join(out, "results.png")) > 10_000
    results = json.load(open(os.path.join(out, "results.json")))
    vision = {r["method"]: r for r in results["vision"]}
    wanted = [m.name for m in job.VISION_METHODS if "full" in m.name or "lora" in m.name.lower()]
    assert list(vision) == wanted and len(wanted) == 14  # every forgetting control, on full fine-tuning and LoRA
    assert [r["method"] for r in results["text"]] == [
        "full fine-tuning",
        "LoRA r=8 (q,v)",
        "full fine-tuning + L2-SP α=1",
        "LoRA r=8 (q,v) + L2-SP α=0.2",
        "full fine-tuning + finish ≤0.075",
        "LoRA r=8 (q,v) + finish ≤0.075",
        "full fine-tuning + budget ≤0.075",
        "LoRA r=8 (q,v) + budget ≤0.075",
    ]
    full, lora = vision["full fine-tuning"], vision["LoRA r=4"]
    assert full["trainable_params"] == full["total_params"]
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 5
    assert lora["stored_bytes"] < full["stored_bytes"] / 5  # what a task must store follows what trains
    for r in results["vision"] + results["text"]:
        assert r["forgetting"] is not None and r["seconds"] > 0
        assert 0.0 <= r["new_task_score"] <= 1.0
        assert r["method"] in printed
        assert os.path.exists(os.path.join(out, "vision" if r in results["vision"] else "text", job.slug(r["method"])))
    assert vision["LoRA r=4 + replay 40%"]["trainable_params"] == lora["trainable_params"]  # replay adds no weights

    # every row is named as it starts, with its place in the job; a CSV beside the JSON holds the same rows
    rows = len(results["vision"]) + len(results["text"])
    assert f"row 1/{rows}: full fine-tuning (vision)" in caplog.text
    assert f"row {rows}/{rows}: LoRA r=8 (q,v) + budget ≤0.075 (text)" in caplog.text
    with open(os.path.join(out, "results.csv")) as f:
        assert [r["method"] for r in csv.DictReader(f)] == [r["method"] for r in results["vision"] + results["text"]]

    # Lightning logs its tips once per Trainer (19 Trainers here); the job lets each through once
    tips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("💡 Tip")]
    assert tips and len(tips) == len(set(tips))


def test_main_job_plot_gives_each_method_one_style_in_every_panel():
    from peft_callbacks.demo.report import method_family, row_styles

    job = load_example("main_job")
    vision, text = [m.name for m in job.VISION_METHODS], [m.name for m in job.TEXT_METHODS]
    styles = row_styles(vision + text)
    for a in vision + text:  # the same marker and colour exactly when it is the same method, settings aside
        for b in vision + text:
            assert (styles[a] == styles[b]) == (method_family(a) == method_family(b)), (a, b)
    # LoRA r=4 (vision) and LoRA r=8 (q,v) (text) are one method: one marker in both panels; so are VeRA and freezing
    same = [("LoRA r=4", "LoRA r=8 (q,v)"), ("VeRA r=64", "VeRA r=256 (q,v)"), ("IA3", "IA3")]
    same += [("freeze=8", "freeze=6 (last layer + head)"), ("LoRA r=4 + L2-SP α=1", "LoRA r=8 (q,v) + L2-SP α=0.2")]
    for v, t in same:
        assert styles[v] == styles[t], (v, t)
    assert styles["freeze=6 (last layer + head)"][1] == styles["full fine-tuning"][1]  # "+ head)" is no control
    for panel in (vision, text):  # within a panel no two rows look alike
        assert len({styles[n] for n in panel}) == len(panel)


def test_pareto_front_keeps_the_rows_no_other_row_beats():
    from peft_callbacks.demo.report import pareto_front

    assert pareto_front([(0.5, 0.9), (0.1, 0.9), (0.2, 0.95), (0.3, 0.8)]) == [(0.1, 0.9), (0.2, 0.95)]
    # the vision rows as docs/results.md records them: VeRA beats IA3 (less forgetting, higher accuracy) and head only
    vera, ia3, head, full, replay = (-0.009, 0.911), (0.018, 0.884), (0.0, 0.679), (0.596, 0.920), (0.067, 0.902)
    assert pareto_front([full, head, ia3, vera, replay]) == [vera, full]
    assert pareto_front([ia3, vera, head]) == [vera]  # one row beats all: it is the front on its own
    assert pareto_front([vera, (float("nan"), 0.99), (0.5, float("nan"))]) == [vera]
    assert pareto_front([]) == []

    from matplotlib.figure import Figure

    from peft_callbacks.demo.report import _draw_front

    ax = Figure().add_subplot()
    _draw_front(ax, pareto_front([ia3, vera, head]))  # a front of one row is drawn too: ringed, and in the legend
    assert [c.get_label() for c in ax.collections] == ["Pareto front: beats every other row"]


def test_the_job_writes_its_files_as_each_row_finishes(tmp_path, caplog):
    """A job stopped in its second row keeps the complete files of the first: rows are named as they start, and
    the tables, CSV, JSON and plot are rewritten (atomically) as each row finishes."""
    import logging

    from peft_callbacks import LoRACallback
    from peft_callbacks.demo import MLPClassifier, random_loader
    from peft_callbacks.demo.job import Method, Row, run_method, run_rows
    from peft_callbacks.demo.report import FILES, JobReport, Panel

    out = str(tmp_path / "job")
    report = JobReport(out, [Panel("toy", "Toy", "acc", "forgetting")])
    quick = dict(max_steps=1, limit_val_batches=0, enable_progress_bar=False)

    data = L.LightningDataModule.from_datasets(random_loader().dataset, batch_size=4)

    def train(method):  # a real row: one step of LoRA on the toy model
        result, _ = run_method(method, lambda lr: MLPClassifier(lr=lr), data, str(tmp_path / "run"), [], quick)
        result.forgetting = 0.25
        return result

    def stopped(method):  # the job is stopped while the second row runs: the first row's files are all there
        assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == sorted(FILES)
        assert os.path.getsize(os.path.join(out, "results.png")) > 1000
        raise KeyboardInterrupt

    lora = Method("LoRA r=2", lambda out: [LoRACallback(rank=2, module="net")], lr=0.1)
    rows = [Row("toy", lora, train), Row("toy", Method("full fine-tuning", lambda out: []), stopped)]
    with caplog.at_level(logging.INFO), pytest.raises(KeyboardInterrupt):
        run_rows(rows, report)

    assert "row 1/2: LoRA r=2 (toy)" in caplog.text and "row 2/2: full fine-tuning (toy)" in caplog.text
    (first,) = json.load(open(os.path.join(out, "results.json")))["toy"]
    assert first["method"] == "LoRA r=2" and first["forgetting"] == 0.25 and 0 < first["trainable_params"] < 100
    with open(os.path.join(out, "results.csv")) as f:
        rows_written = list(csv.DictReader(f))
    assert [(r["panel"], r["method"], float(r["forgetting"])) for r in rows_written] == [("toy", "LoRA r=2", 0.25)]
    table = open(os.path.join(out, "results.md")).read()
    assert "| LoRA r=2 |" in table and "full fine-tuning" not in table and "Rows done: 1/2" in table
    assert sorted(os.listdir(out)) == sorted(FILES)  # no half-written leftovers beside them


def test_vision_lora_example(tmp_path):
    summary = load_example("vision_lora").main(["--quick", "--out", str(tmp_path)])
    assert summary["LoRA layers left"] == 0  # merged: a plain timm model again
    assert summary["trained"] != summary["after merge"]


def test_text_example(tmp_path):
    summary = load_example("text_lora").main(["--quick", "--out", str(tmp_path)])
    assert summary["embedding drift"] is not None and summary["embedding drift"] >= 0.0
    assert 0 < summary["trainable %"] < 1  # LoRA r=8 on query/value + a 5-class head of a 22.7M encoder


def test_add_forgetting_monitor_example(tmp_path):
    monitor = load_example("add_forgetting_monitor").main(["--quick", "--out", str(tmp_path)])
    assert [row["epoch"] for row in monitor.history] == [0, 1]  # baseline before training, then after the epoch
    assert monitor.latest["forgetting"] == monitor.baseline - monitor.latest["value"]
    assert os.path.exists(monitor.plot_path)


def test_forgetting_budget_example(tmp_path):
    budget, monitor = load_example("forgetting_budget").main(["--quick", "--out", str(tmp_path)])
    # a reading at every step over the first 2 · 5 (every_n_steps · full_every): all 4 steps
    assert budget.baseline is not None and [r["step"] for r in budget.history] == [1, 2, 3, 4]
    assert all("replay_share" in r for r in budget.history)  # replay is what it controls
    assert budget.final_forgetting is not None and monitor.latest["forgetting"] is not None
