"""Every example runs (briefly, with ``--quick``) so none of them rots; the main job writes its table and plot."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_job_quick(tmp_path, capsys):
    job = load_example("main_job")
    out = job.main(["--quick", "--methods", "full,LoRA", "--out", str(tmp_path / "job")])
    printed = capsys.readouterr().out
    assert f"Output directory: {out}" in printed
    assert os.path.getsize(os.path.join(out, "results.png")) > 10_000
    results = json.load(open(os.path.join(out, "results.json")))
    vision = {r["method"]: r for r in results["vision"]}
    assert set(vision) == {"full fine-tuning", "LoRA r=4"}
    assert {r["method"] for r in results["text"]} == {"full fine-tuning", "LoRA r=8 (q,v)"}
    full, lora = vision["full fine-tuning"], vision["LoRA r=4"]
    assert full["trainable_params"] == full["total_params"]
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 5
    assert lora["stored_bytes"] < full["stored_bytes"] / 5  # what a task must store follows what trains
    for r in results["vision"] + results["text"]:
        assert r["forgetting"] is not None and r["seconds"] > 0
        assert 0.0 <= r["new_task_score"] <= 1.0
        assert r["method"] in printed
        assert os.path.exists(os.path.join(out, "vision" if r in results["vision"] else "text"))


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
