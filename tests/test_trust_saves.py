"""A save writes only its own files, inside its folder (issue 25, item 2).

Every save (``save_adapter``, ``export_peft``, ``save_weights``, the callbacks' ``save_adapter_to`` /
``save_merged_to``) leaves the user's files in the folder alone, removes only stale files of its own (known by exact
name), and a save that fails or is killed half-way leaves the old complete version or the new one. Adapter names are
one plain path component at every entry point, and nothing is ever written outside the target folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset
from zoo import HF_MODELS

import peft_callbacks
from peft_callbacks import LoRACallback, inject_lora
from peft_callbacks.engine.surgery import adapt_layer
from peft_callbacks.io import AdapterFileError, export_peft, import_peft, load_adapter, save_adapter, save_weights
from peft_callbacks.io.atomic import MANIFEST, file_set, finish_interrupted_save, path_inside
from peft_callbacks.io.recipe_file import RECIPE_FILE
from peft_callbacks.io.state import trained_state


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _tuned(value: float, names: tuple[str, ...] = ("default",)) -> nn.Module:
    """A LoRA model (adapters ``names``) whose every trained tensor holds ``value``: which save a folder holds reads
    off one number."""
    model = _net()
    for name in names:
        model = inject_lora(model, rank=2, adapter_name=name, train_head=name == "default")
    with torch.no_grad():
        for tensor in trained_state(model).values():
            tensor.fill_(value)
    return model


def _trained_value(model: nn.Module) -> float:
    values = {float(v) for t in trained_state(model).values() for v in t.detach().flatten()}
    assert len(values) == 1, f"tensors from two different saves: {values}"
    return values.pop()


def _user_files(folder: Path) -> dict[str, bytes]:
    """A user's checkpoint, a sub-folder of theirs with a file, and a hidden file of theirs, in ``folder``."""
    files = {"epoch=1.ckpt": b"a checkpoint", "logs/notes.txt": b"my notes", ".keep": b"", "model-00003.bin": b"x"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def _assert_kept(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, f"{name} was changed or deleted"


# -- the cases: the user's files survive every save ---------------------------------------------------------
def test_save_adapter_keeps_the_users_files(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    mine = _user_files(runs)
    save_adapter(_tuned(1.0), runs)
    save_adapter(_tuned(2.0), runs)  # a second save replaces only its own two files
    _assert_kept(runs, mine)
    assert _trained_value(load_adapter(_net(), runs)) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written beside the folder


@pytest.mark.parametrize("names", [None, "default"], ids=["all-adapters", "one-adapter"])
def test_export_peft_keeps_the_users_files(tmp_path, names):
    mine = _user_files(tmp_path)
    export_peft(_tuned(1.0), tmp_path, adapter_name=names)
    export_peft(_tuned(2.0), tmp_path, adapter_name=names)
    _assert_kept(tmp_path, mine)
    assert _trained_value(import_peft(_net(), tmp_path)) == 2.0


def test_export_peft_removes_its_own_stale_adapter_folder_and_nothing_else(tmp_path):
    export_peft(_tuned(1.0, ("default", "b")), tmp_path)  # default at the top, b/ beside it
    assert (tmp_path / "b" / "adapter_config.json").is_file()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapter_config.json").write_text("{}")  # the user's own PEFT-looking folder
    export_peft(_tuned(2.0), tmp_path)  # b is no longer exported: its files were ours, they go
    assert not (tmp_path / "b").exists()
    assert (tmp_path / "c" / "adapter_config.json").read_text() == "{}"
    export_peft(_tuned(1.0, ("default", "b")), tmp_path)
    (tmp_path / "b" / "README.md").write_text("the user's")  # a file of theirs inside our sub-folder
    export_peft(_tuned(2.0), tmp_path)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["README.md"]


def test_save_weights_keeps_the_users_files(tmp_path):
    mine = _user_files(tmp_path)
    save_weights(nn.Linear(2, 2), tmp_path)
    model, _ = HF_MODELS["bert"]()
    save_weights(model, tmp_path / "hf")
    save_weights(model, tmp_path / "hf")
    _assert_kept(tmp_path, mine)
    assert set(load_file(str(tmp_path / "model.safetensors"))) == {"weight", "bias"}
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "hf").iterdir()}


def test_stale_files_are_known_by_exact_name_never_by_pattern(tmp_path):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    with file_set(tmp_path, "weights") as staging:
        for name in shards:
            (staging / name).write_text("shard")
    (tmp_path / "model-00001-of-00003.safetensors").write_text("the user's")  # looks like a shard, is not ours
    with file_set(tmp_path, "adapter") as staging:  # another kind of save in the same folder: both sets stay
        (staging / "adapter_model.safetensors").write_text("adapter")
    with file_set(tmp_path, "weights") as staging:
        (staging / "model.safetensors").write_text("one file")
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != MANIFEST)
    assert names == ["adapter_model.safetensors", "model-00001-of-00003.safetensors", "model.safetensors"]


def test_a_folder_of_the_users_under_one_of_our_names_is_refused_not_replaced(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    (tmp_path / "model.safetensors" / "mine.txt").write_text("the user's")
    with pytest.raises(ValueError, match="is a folder; the save would replace it"):
        save_weights(nn.Linear(2, 2), tmp_path)
    assert (tmp_path / "model.safetensors" / "mine.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_save_of_another_kind_that_overwrites_part_of_a_set_removes_the_rest_of_it(tmp_path):
    save_adapter(_tuned(1.0), tmp_path)
    export_peft(_tuned(2.0), tmp_path)  # same adapter_model.safetensors name: the recipe no longer describes it
    assert not (tmp_path / RECIPE_FILE).exists()
    assert _trained_value(import_peft(_net(), tmp_path)) == 2.0


class _Task(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:Checkpoint directory")
def test_callback_saves_into_the_checkpoint_folder_keep_every_checkpoint(tmp_path):
    folder = str(tmp_path / "run")
    checkpoints = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_train_steps=1, filename="{step}")
    lora = LoRACallback(rank=2, save_adapter_to=folder, save_merged_to=folder)
    data = DataLoader(TensorDataset(torch.randn(12, 8), torch.randint(0, 3, (12,))), batch_size=4)
    trainer = L.Trainer(
        max_steps=3,
        callbacks=[lora, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_Task(), data)
    names = sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))
    assert names == [
        "README.md",  # the adapter's model card
        "adapter_model.safetensors",
        "adapter_recipe.json",
        "model.safetensors",
        "step=1.ckpt",
        "step=2.ckpt",
        "step=3.ckpt",
    ]
    assert load_adapter(_Task(), folder)  # the adapter written before the merge, beside the merged weights


# -- a save that fails half-way leaves the old complete version or the new one -------------------------------------
def _failing_replace(monkeypatch, at: int) -> None:
    """``os.replace`` raises on its ``at``-th call (1-based), as a disk error or a kill at that moment would stop it."""
    real, calls = os.replace, []

    def replace(*args, **kwargs):
        calls.append(args)
        if len(calls) == at:
            raise OSError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _replace_calls(monkeypatch, save) -> int:
    calls = []
    real = os.replace
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", lambda *a, **k: calls.append(a) or real(*a, **k))
        save()
    return len(calls)


_SAVES = {
    "save_adapter": (lambda m, d: save_adapter(m, d), lambda d: load_adapter(_net(), d)),
    "export_peft": (lambda m, d: export_peft(m, d), lambda d: import_peft(_net(), d)),
    "export_peft-layout": (lambda m, d: export_peft(m, d, adapter_name=None), lambda d: import_peft(_net(), d)),
}


@pytest.mark.parametrize("kind", list(_SAVES))
def test_a_save_that_stops_at_any_replace_loads_as_the_old_or_the_new_version(tmp_path, monkeypatch, kind):
    save, load = _SAVES[kind]
    names = ("default", "b") if kind.endswith("layout") else ("default",)
    steps = _replace_calls(monkeypatch, lambda: save(_tuned(1.0, names), tmp_path / "probe"))
    assert steps >= 4  # commit, one move per file, the manifest again
    seen = set()
    for at in range(1, steps + 1):
        folder = tmp_path / f"stop{at}"
        folder.mkdir()
        mine = _user_files(folder)
        save(_tuned(1.0, names), folder)
        with monkeypatch.context() as patch:
            _failing_replace(patch, at)
            with pytest.raises(OSError, match="simulated crash"):
                save(_tuned(2.0, names), folder)
        _assert_kept(folder, mine)
        loaded = load(folder)  # completes a save stopped after its commit point first
        value = _trained_value(loaded)
        assert value in (1.0, 2.0)
        seen.add(value)
        _assert_kept(folder, mine)
        save(_tuned(3.0, names), folder)  # and the folder takes further saves normally
        assert _trained_value(load(folder)) == 3.0
        assert not (folder / ".peft_callbacks-staging").exists()
    assert seen == {1.0, 2.0}  # stopped before the commit: old; after it: new


def test_full_weights_stopped_half_way_are_the_old_or_the_new_ones(tmp_path, monkeypatch):
    model = HF_MODELS["bert"]()[0]
    steps = _replace_calls(monkeypatch, lambda: save_weights(model, tmp_path / "probe"))
    for at in range(1, steps + 1):
        folder = tmp_path / f"stop{at}"
        save_weights(model, folder)
        old = model.classifier.weight.detach().clone()
        with torch.no_grad():
            model.classifier.weight.add_(1.0)
        with monkeypatch.context() as patch:
            _failing_replace(patch, at)
            with pytest.raises(OSError, match="simulated crash"):
                save_weights(model, folder)
        finish_interrupted_save(folder)  # what the next save or load through peft_callbacks does first
        saved = load_file(str(folder / "model.safetensors"))["classifier.weight"]
        assert torch.equal(saved, model.classifier.weight) or torch.equal(saved, old)
        assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"


# -- adapter names are one plain path component, at every entry point ------------------------------------------------
BAD_NAMES = ["/some/dir", "../x", "a/b", "\x00", "a\\b", "x" * 101, ".."]


def _entry_points(tmp_path):
    """Every public entry point that takes an adapter name, as ``name -> call``."""
    two = _tuned(1.0, ("default", "b"))
    export_peft(_tuned(1.0), tmp_path / "peft")
    save_adapter(_tuned(1.0), tmp_path / "ours")
    return {
        "inject_lora": lambda n: inject_lora(_net(), rank=2, adapter_name=n),
        "adapt_layer": lambda n: adapt_layer(nn.Linear(2, 2), peft_callbacks.LoRAConfig(), n),
        "LoRACallback": lambda n: LoRACallback(adapter_name=n),
        "PEFTCallback": lambda n: peft_callbacks.PEFTCallback(peft_callbacks.IA3Config(), adapter_name=n),
        "save_adapter": lambda n: save_adapter(two, tmp_path / "out", adapter_name=n),
        "load_adapter": lambda n: load_adapter(_net(), tmp_path / "ours", adapter_name=n),
        "export_peft": lambda n: export_peft(two, tmp_path / "out", adapter_name=n),
        "export_peft-list": lambda n: export_peft(two, tmp_path / "out", adapter_name=["b", n]),
        "import_peft": lambda n: import_peft(_net(), tmp_path / "peft", adapter_name=n),
        "set_adapter": lambda n: peft_callbacks.set_adapter(two, n),
        "delete_adapter": lambda n: peft_callbacks.delete_adapter(two, n),
        "unload": lambda n: peft_callbacks.unload(two, adapter_name=n),
        "add_weighted_adapter": lambda n: peft_callbacks.add_weighted_adapter(two, ["default", "b"], [1, 1], n),
    }


def test_every_entry_point_refuses_a_name_that_is_not_one_plain_component(tmp_path):
    calls = _entry_points(tmp_path)
    victim = tmp_path / "victim"
    for entry, call in calls.items():
        for name in [*BAD_NAMES, str(victim)]:
            with pytest.raises((TypeError, ValueError), match="adapter_name") as error:
                call(name)
            assert not isinstance(error.value, AdapterFileError), entry  # refused as an argument, before any file
    assert not victim.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../evil", "/evil", "a/b"])
def test_a_hostile_recipe_name_is_refused_and_nothing_is_written_outside(tmp_path, name):
    folder = tmp_path / "deep" / "adapter"
    save_adapter(_tuned(1.0), folder)
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    recipe["models"][0]["recipe"][0]["adapter_name"] = name
    (folder / RECIPE_FILE).write_text(json.dumps(recipe))
    before = sorted(p for p in tmp_path.rglob("*"))
    model = _net()
    with pytest.raises(AdapterFileError, match=rf"adapter_name.*{re.escape(repr(name))}"):
        load_adapter(model, folder)
    assert not any(isinstance(m, peft_callbacks.AdaptedLayer) for m in model.modules())
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_writes_never_leave_the_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "b").symlink_to(outside, target_is_directory=True)  # a sub-folder that leads out
    with pytest.raises(ValueError, match="leads out of"):
        export_peft(_tuned(1.0, ("default", "b")), target)
    assert list(outside.iterdir()) == []
    with pytest.raises(ValueError, match="not a plain relative path"):
        path_inside(target, "../x")
    with pytest.raises(ValueError, match="not a plain relative path"):
        path_inside(target, str(outside))
    assert path_inside(target, "a/b.json") == target / "a" / "b.json"


def test_a_hostile_manifest_removes_nothing_outside_the_folder(tmp_path):
    folder = tmp_path / "adapter"
    save_adapter(_tuned(1.0), folder)
    (tmp_path / "precious.txt").write_text("keep")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["adapter"].append("../precious.txt")
    (folder / MANIFEST).write_text(json.dumps(manifest))
    save_adapter(_tuned(2.0), folder)  # the manifest is refused as malformed: nothing is taken as stale
    assert (tmp_path / "precious.txt").read_text() == "keep"
    assert _trained_value(load_adapter(_net(), folder)) == 2.0
