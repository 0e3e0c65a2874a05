"""Files as untrusted input, and writes that are never half done (hardening issue, items 1-5).

A killed save leaves the previous adapter intact; every malformed recipe is refused with ``AdapterFileError`` naming
the file and the field, before anything is allocated or evaluated; non-finite or wrongly typed tensors are refused by
name; and a refused load leaves the model exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from zoo import HF_MODELS

from peft_callbacks import inject_lora, lora_layers
from peft_callbacks.io import AdapterFileError, export_peft, import_peft, load_adapter, save_adapter
from peft_callbacks.io.recipe_file import RECIPE_FILE, WEIGHTS_FILE
from peft_callbacks.io.slim import SlimCheckpointError, fill_slim_state_dict, slim_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _snapshot(model: nn.Module) -> tuple:
    """Everything a refused load must leave as it was: keys, module types, trainable flags and values."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: type(m) for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_unchanged(model: nn.Module, snapshot: tuple) -> None:
    state, types, grads = snapshot
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.fixture
def saved(tmp_path):
    model = inject_lora(_net(), rank=2)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_recipe(folder, edit) -> None:
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    edit(recipe)
    (folder / RECIPE_FILE).write_text(json.dumps(recipe))


def _rewrite_tensors(folder, tensors: dict) -> None:
    """Replace the tensor file and record its new hash, as a hand edit that keeps the checksum right would."""
    save_file(tensors, str(folder / WEIGHTS_FILE))
    digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    _edit_recipe(folder, lambda r: r.update(weights_sha256=digest))


# -- 1. a killed save never loses the previous adapter --------------------------------------------------------------
_WRITER = textwrap.dedent(
    """
    import sys, torch, torch.nn as nn
    from peft_callbacks import inject_lora, save_adapter
    torch.manual_seed(0)
    model = inject_lora(nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 2)), rank=256)
    version = 0
    while True:
        version += 1
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.fill_(float(version))
        save_adapter(model, sys.argv[1])
        print(version, flush=True)
    """
)


def test_a_killed_save_leaves_the_old_or_the_new_adapter_and_no_leftover(tmp_path):
    target = tmp_path / "adapter"
    env = {**os.environ, "PYTHONPATH": ROOT}
    outcomes = []
    for delay in (0.0, 0.03, 0.07, 0.12):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], env=env, stdout=subprocess.PIPE)
        assert child.stdout.readline()  # one save has completed: from now on there is something to lose
        time.sleep(delay)  # then kill it at some point of the following saves
        child.send_signal(signal.SIGKILL)
        child.wait()
        torch.manual_seed(0)
        fresh = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 2))
        loaded = load_adapter(fresh, target)  # the pair always belongs together
        values = {float(p.flatten()[0]) for p in loaded.parameters() if p.requires_grad}
        assert len(values) == 1, "tensors from two different saves"
        outcomes.append(values.pop())
    assert outcomes, "the writer never completed a save"
    save_adapter(inject_lora(_net(), rank=2), target)  # the next save cleans up whatever a kill left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_save_that_fails_midway_keeps_the_previous_adapter(saved, monkeypatch):
    import peft_callbacks.io.adapter_file as adapter_file

    before = (saved / WEIGHTS_FILE).read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_file, "write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(inject_lora(_net(), rank=3), saved)
    assert (saved / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
    assert lora_layers(load_adapter(_net(), saved))


# -- 2. everything read from the recipe is checked before use ------------------------------------------------------
@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r["models"][0]["recipe"][0]["config"].update(target_modules="(.*.*.*)*Z"), "target_modules"),
        (lambda r: r["models"][0].pop("fingerprint"), "fingerprint"),
        (lambda r: r.update(models="model"), "'models'"),
        (lambda r: r.update(models=[None]), r"models\[0\]"),
        (lambda r: r["models"][0]["recipe"][0]["config"].update(rank="8"), "rank"),
        (lambda r: r["models"][0]["recipe"][0]["config"].update(targets=["no.such.layer"]), "no.such.layer"),
        (lambda r: r["models"][0]["recipe"][0].update(method="nothing"), "nothing"),
    ],
    ids=["regex", "no-fingerprint", "models-str", "models-null", "rank-str", "unknown-target", "unknown-method"],
)
def test_a_malformed_recipe_is_refused_naming_the_field(saved, edit, field):
    _edit_recipe(saved, edit)
    model = _net()
    snapshot = _snapshot(model)
    started = time.perf_counter()
    with pytest.raises(AdapterFileError, match=field) as error:
        load_adapter(model, saved)
    assert RECIPE_FILE in str(error.value) or field in str(error.value)
    assert time.perf_counter() - started < 5  # no pattern from the file is evaluated
    _assert_unchanged(model, snapshot)


def test_a_huge_rank_is_refused_against_the_stored_shapes_before_any_allocation(saved):
    _edit_recipe(saved, lambda r: r["models"][0]["recipe"][0]["config"].update(rank=2**31))
    with pytest.raises(AdapterFileError, match=r"lora_A\.weight .*2147483648"):
        load_adapter(_net(), saved)


def test_a_deeply_nested_recipe_is_refused(saved):
    (saved / RECIPE_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        load_adapter(_net(), saved)


# -- 3. non-finite or wrongly typed tensors are refused by name ------------------------------------------------------
@pytest.mark.parametrize("bad", ["nan", "inf", "int32", "bool"])
def test_bad_tensors_in_an_adapter_file_are_refused_by_name(saved, bad):
    tensors = load_file(str(saved / WEIGHTS_FILE))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensor = tensors[key].clone()
    if bad in ("nan", "inf"):
        tensor[0, 0] = float(bad)
    else:
        tensor = tensor.to(getattr(torch, bad))
    _rewrite_tensors(saved, {**tensors, key: tensor})
    model = _net()
    snapshot = _snapshot(model)
    with pytest.raises(AdapterFileError, match=key.replace(".", r"\.")):
        load_adapter(model, saved)
    _assert_unchanged(model, snapshot)


def test_bad_tensors_in_a_peft_directory_are_refused_by_name(tmp_path):
    export_peft(inject_lora(_net(), rank=2), tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = _net()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="lora_B.weight.*NaN or Inf"):
        import_peft(model, tmp_path)
    _assert_unchanged(model, snapshot)


# -- 4. a refused load leaves the model as it was ------------------------------------------------------------------
def test_a_strict_load_with_an_unknown_tensor_changes_nothing(saved):
    tensors = load_file(str(saved / WEIGHTS_FILE))
    _rewrite_tensors(saved, {**tensors, "2.extra": torch.zeros(3)})
    model = _net()
    snapshot = _snapshot(model)
    with pytest.raises(AdapterFileError, match=r"unknown: 2\.extra"):
        load_adapter(model, saved)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("damage", ["rank", "missing-B"])
def test_a_refused_peft_import_changes_nothing(tmp_path, damage):
    export_peft(inject_lora(_net(), rank=2), tmp_path)
    if damage == "rank":
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    else:
        tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
        save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, str(tmp_path / "adapter_model.safetensors"))
    model = _net()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="shapes differ|missing"):
        import_peft(model, tmp_path)
    _assert_unchanged(model, snapshot)


# -- 5. damaged PEFT files and slim records ------------------------------------------------------------------------
def test_damaged_peft_files_name_the_file(tmp_path):
    export_peft(inject_lora(_net(), rank=2), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="adapter_model.safetensors cannot be read"):
        import_peft(_net(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="adapter_config.json must hold a JSON object"):
        import_peft(_net(), tmp_path)


@pytest.mark.parametrize(
    "record, match",
    [
        ([1, 2], "must be an object"),
        ({"format_version": 1, "omitted": {"0.weight": "0.nothing"}, "fingerprint": None}, "fingerprint"),
        ({"format_version": 1, "omitted": ["0.weight"], "fingerprint": {}}, "omitted"),
        ("missing-key", "does not have: \\['0.nothing'\\]"),
    ],
)
def test_malformed_slim_records_are_refused(record, match):
    model = inject_lora(_net(), rank=2)
    state = model.state_dict()
    good = slim_state_dict(model, state)
    if record == "missing-key":
        record = {**good, "omitted": {**good["omitted"], "0.base_layer.weight": "0.nothing"}}
    with pytest.raises(SlimCheckpointError, match=match):
        fill_slim_state_dict(model, state, record)


def test_version_one_adapter_files_still_load(tmp_path):
    """Files written by peft_callbacks 0.1 kept LoRA tensors right under the layer; they load as before."""
    model, inputs = HF_MODELS["bert"]()
    tuned = inject_lora(model, rank=2, target_modules=["query"])
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.1)
    save_adapter(tuned, tmp_path)
    tensors = {k.replace(".adapters.default.", "."): v for k, v in load_file(str(tmp_path / WEIGHTS_FILE)).items()}
    _rewrite_tensors(tmp_path, tensors)
    _edit_recipe(tmp_path, lambda r: r.update(format_version=1))
    for entry in json.loads((tmp_path / RECIPE_FILE).read_text())["models"]:
        for record in entry["recipe"]:
            record.pop("adapter_name", None)
    loaded = load_adapter(HF_MODELS["bert"]()[0], tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, tuned(**inputs).logits)
