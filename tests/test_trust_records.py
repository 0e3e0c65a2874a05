"""Checkpoint records and adapter inputs follow the rules of adapter files (issue 25, item 5, last bullet).

A checkpoint's ``peft_callbacks`` record is untrusted input like an adapter directory: non-finite tensors, malformed
fields and adapter names that are not plain are refused with ``CheckpointLayoutError`` naming the field, and a
recorded rank that does not fit the stored tensors is refused by a dry run before anything is allocated.
``add_weighted_adapter`` refuses a non-finite input adapter, naming it.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn as nn
from user_modules import TwoLayerNet, feature_batches

import peft_callbacks.plumbing.checkpoint_hooks as checkpoints
from peft_callbacks import AdaptedLayer, LoRACallback, add_weighted_adapter, inject_lora, load_checkpoint
from peft_callbacks.io.checkpoint import CHECKPOINT_KEY, CheckpointLayoutError, check_replay, read_record


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A checkpoint of a LoRA fit (merged layout: the adapters' tensors are in the record)."""
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[LoRACallback(rank=2, merge_on_train_end=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TwoLayerNet(), feature_batches())
    path = tmp_path_factory.mktemp("lora") / "lora.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint[CHECKPOINT_KEY]["layout"] == "merged" and checkpoint[CHECKPOINT_KEY]["tensors"]
    return checkpoint


def _write(saved: dict, tmp_path, edit) -> str:
    checkpoint = copy.deepcopy(saved)
    edit(checkpoint[CHECKPOINT_KEY])
    path = str(tmp_path / "edited.ckpt")
    torch.save(checkpoint, path)
    return path


def test_the_unedited_checkpoint_loads(saved, tmp_path):
    loaded = load_checkpoint(TwoLayerNet, _write(saved, tmp_path, lambda record: None), merged=False)
    assert isinstance(loaded.net[0], AdaptedLayer)


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "adapters"])
def test_non_finite_record_tensors_are_refused_by_name(saved, tmp_path, bad, merged):
    def poison(record):
        key = next(k for k in record["tensors"] if k.endswith("lora_B.weight"))
        record["tensors"][key][0, 0] = float(bad)

    path = _write(saved, tmp_path, poison)
    with pytest.raises(CheckpointLayoutError, match=r"'net\.0\.adapters\.default\.lora_B\.weight' holds NaN or Inf"):
        load_checkpoint(TwoLayerNet, path, merged=merged)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r.update(layers="net.0"), "field 'layers' must be a dict, got str"),
        (lambda r: r.update(layers=["net.0"]), "field 'layers' must be a dict, got list"),
        (lambda r: r["layers"].update({"net.0": "folded"}), "field 'layers.net.0' must be an object, got str"),
        (lambda r: r["layers"]["net.0"].update(folded="default"), "layers.net.0.folded"),
        (lambda r: r["layers"]["net.0"].update(active=["../x"]), r"layers.net.0.active.*'\.\./x'"),
        (lambda r: r["layers"]["net.0"].update(digests=[1]), "layers.net.0.digests"),
        (lambda r: r.update(recipes={"": "lora"}), "recipes."),
        (lambda r: r["recipes"][""].append("lora"), r"recipes\.\[1\]"),
        (lambda r: r["recipes"][""][0].update(adapter_name="/some/dir"), r"adapter_name.*'/some/dir'"),
        (lambda r: r["tensors"].update(extra=[1.0]), "field 'tensors' must map names to tensors"),
    ],
    ids=[
        "layers-str",
        "layers-list",
        "layer-str",
        "folded-str",
        "active-path",
        "digests-list",
        "recipes-str",
        "record-str",
        "name-absolute",
        "tensor-list",
    ],
)
def test_a_malformed_record_is_refused_naming_the_field(saved, tmp_path, edit, field):
    path = _write(saved, tmp_path, edit)
    for merged in (True, False):
        with pytest.raises(CheckpointLayoutError, match=field):
            load_checkpoint(TwoLayerNet, path, merged=merged)


@pytest.mark.parametrize("rank", [2**22, 3])
def test_a_recorded_rank_that_does_not_fit_is_refused_before_anything_is_allocated(saved, tmp_path, monkeypatch, rank):
    def bigger(record):
        for records in record["recipes"].values():
            for r in records:
                r["config"]["rank"] = rank

    def no_replay(*args, **kwargs):
        raise AssertionError("the surgery was replayed (and its tensors allocated) before the shapes were checked")

    monkeypatch.setattr(checkpoints, "replay", no_replay)
    path = _write(saved, tmp_path, bigger)
    with pytest.raises(CheckpointLayoutError, match=rf"lora_A\.weight \(2, 8\) vs \({rank}, 8\)"):
        load_checkpoint(TwoLayerNet, path, merged=False)


def test_a_sharded_checkpoint_without_tensors_to_compare_bounds_what_a_replay_creates(saved):
    record = read_record(saved)
    huge = copy.deepcopy(record["recipes"])
    huge[""][0]["config"]["rank"] = 2**22
    with pytest.raises(CheckpointLayoutError, match="more than four times TwoLayerNet"):
        check_replay(TwoLayerNet(), huge, None)
    check_replay(TwoLayerNet(), record["recipes"], None)  # the recorded rank 2 fits


def test_a_checkpoint_missing_the_tensors_its_surgery_creates_is_refused(saved, tmp_path):
    path = _write(saved, tmp_path, lambda r: r.update(tensors={}, layout="adapted"))
    with pytest.raises(CheckpointLayoutError, match=r"not stored: net\.0\.adapters\.default\.lora_A\.weight"):
        load_checkpoint(TwoLayerNet, path, merged=False)


# -- add_weighted_adapter ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_add_weighted_adapter_refuses_a_non_finite_input_naming_it(bad):
    torch.manual_seed(0)
    model = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2, adapter_name="a", train_head=False)
    model = inject_lora(model, rank=2, adapter_name="b", train_head=False)
    with torch.no_grad():
        model[0].adapters["b"].lora_A.weight[0, 0] = float(bad)
    with pytest.raises(ValueError, match=r"`adapters` entry 'b': tensor '0\.lora_A\.weight' holds NaN or Inf"):
        add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "c")
    assert sorted(model[0].adapters) == ["a", "b"]  # nothing was added
