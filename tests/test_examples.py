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


def test_main_job_quick(tmp_path, capsys, caplog):
    job = load_example("main_job")
    out = job.main(["--quick", "--methods", "full,LoRA", "--out", str(tmp_path / "job")])
    printed = capsys.readouterr().out
    assert f"Output directory: {out}" in printed
    assert os.path.getsize(os.path.join(out, "results.png")) > 10_000
    results = json.load(open(os.path.join(out, "results.json")))
    vision = {r["method"]: r for r in results["vision"]}
    wanted = [m.name for m in job.VISION_METHODS if "full" in m.name or "lora" in m.name.lower()]
    assert list(vision) == wanted and len(wanted) == 12  # every forgetting control, on full fine-tuning and LoRA
    assert [r["method"] for r in results["text"]] == [
        "full fine-tuning",
        "LoRA r=8 (q,v)",
        "full fine-tuning + L2-SP α=1",
        "LoRA r=8 (q,v) + L2-SP α=0.2",
        "full fine-tuning + finish ≤0.075",
        "LoRA r=8 (q,v) + finish ≤0.075",
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

    # Lightning logs its tips once per Trainer (19 Trainers here); the job lets each through once
    tips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("💡 Tip")]
    assert tips and len(tips) == len(set(tips))


def test_main_job_plot_gives_every_row_its_own_style_in_every_panel():
    from peft_callbacks.demo.job import pareto_front, row_styles

    job = load_example("main_job")
    names = [m.name for m in job.VISION_METHODS] + [m.name for m in job.TEXT_METHODS]
    styles = row_styles(names)

    def method(name: str) -> tuple[str, str]:  # "LoRA r=4 + EWC λ=0.1" -> ("LoRA r=4", "EWC"): settings aside
        base, _, control = name.partition(" + ")
        return base, control.split(" ")[0]

    for a in names:  # the same marker and colour exactly when it is the same method, whichever panel it is in
        for b in names:
            assert (styles[a] == styles[b]) == (method(a) == method(b)), (a, b)
    plain = {n for n in names if " + " not in n}
    assert len({styles[n][0] for n in plain}) == len(plain)  # one marker per base method
    assert pareto_front([(0.5, 0.9), (0.1, 0.9), (0.2, 0.95), (0.3, 0.8)]) == [(0.1, 0.9), (0.2, 0.95)]


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
