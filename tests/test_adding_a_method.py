"""docs/adding-a-method.md: the new method (SSF) is added exactly as the page shows, in the number of lines it states,
and then gets inject, merge, unload, files, the typed callback, YAML and the registry's checks without more code."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import sys

import pytest
import torch
import torch.nn as nn

import peft_callbacks.engine.method as registry
from peft_callbacks import PEFTCallback, inject, load_adapter, merge, save_adapter, unload
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.demo import ImageClassifier, quiet_trainer, random_loader
from peft_callbacks.engine import get_method, register_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "adding-a-method.md")
MARKER = "# ssf.py: "


def page_section() -> str:
    with open(PAGE) as f:
        text = f.read()
    start = text.index("## The whole cost")
    return text[start : text.index("\n## ", start + 1)]


def code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", page_section(), re.S)


@pytest.fixture
def ssf(tmp_path, monkeypatch):
    """The module ``ssf`` written from the page's blocks, imported; the registry as it was afterwards."""
    module = "".join(block for block in code_blocks() if block.startswith(MARKER))
    (tmp_path / "ssf.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # the method leaves with the test
    monkeypatch.delitem(sys.modules, "ssf", raising=False)
    yield importlib.import_module("ssf")
    sys.modules.pop("ssf", None)


def test_the_stated_line_counts_are_the_code_shown():
    rows = dict(re.findall(r"^\| (\d)\. .*? \| (\d+) \|$", page_section(), re.M))
    blocks = [b for b in code_blocks() if b.startswith(MARKER)]
    assert len(blocks) == len(rows) == 4
    assert f"{sum(int(n) for n in rows.values())} lines in all" in page_section()
    for block in blocks:
        number = re.match(rf"{MARKER}(\d)\.", block).group(1)
        lines = [line for line in block.splitlines()[1:] if line.strip()]
        assert len(lines) == int(rows[number]), f"block {number} has {len(lines)} lines, the table says {rows[number]}"


def test_the_page_example_runs(ssf):
    (example,) = [b for b in code_blocks() if b.startswith("# try it")]
    exec(compile(example, PAGE, "exec"), {})


def adapted(ssf, **config) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    net = inject(net, ssf.SSFConfig(target_modules=["0", "2"], train_head=False, **config))
    with torch.no_grad():  # away from the identity, so the checks below can fail
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return net


def test_the_engine_gives_it_merge_unload_and_files(ssf, tmp_path):
    net, x = adapted(ssf), torch.randn(5, 8)
    expected = net(x)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.adapters.default.ssf_{t}" for i in (0, 2) for t in ("scale", "shift")}

    save_adapter(net, tmp_path / "adapter")
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    base = fresh(x)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)

    plain = merge(net)  # plain layers again, the update folded into their weights and biases
    assert not any(isinstance(m, PEFTModule) for m in plain.modules())
    torch.testing.assert_close(plain(x), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)

    torch.testing.assert_close(unload(loaded)(x), base, rtol=0, atol=0)  # unload: the base again, unchanged


def test_the_typed_callback_takes_the_config_and_the_options(ssf):
    parameters = inspect.signature(ssf.SSFCallback).parameters
    assert list(parameters)[:2] == ["shift", "target_modules"]
    assert {"adapter_dtype", "train_bn", "adapter_name", "save_adapter_to", "merged_dtype"} <= set(parameters)
    assert parameters["shift"].default is True and parameters["shift"].annotation is bool
    assert "shift: learn the shift" in ssf.SSFCallback.__doc__  # its Args entry, from SSFConfig's Attributes
    with pytest.raises(TypeError, match=r"`shift` must be True or False, got str 'no'"):
        ssf.SSFCallback(shift="no")


def test_the_callback_trains_and_merges_it(ssf, tmp_path):
    callback = ssf.SSFCallback(target_modules=["qkv"], save_adapter_to=str(tmp_path / "adapter"))
    module = ImageClassifier("test_vit", num_classes=3)
    quiet_trainer(max_steps=2, callbacks=[callback]).fit(module, random_loader(8, shape=(3, 32, 32), classes=3))
    assert not any(isinstance(m, PEFTModule) for m in module.modules())  # merged into a plain model
    assert (tmp_path / "adapter").is_dir()
    widths = [block.attn.qkv.out_features for block in module.model.blocks]
    head = sum(p.numel() for p in module.model.get_classifier().parameters())
    assert callback.parameter_count.trainable == 2 * sum(widths) + head  # γ and β of each qkv layer, the head


def test_yaml_names_it_by_its_class_path(ssf):
    from peft_callbacks.cli import PEFTCLI

    config = os.path.join(ROOT, "examples", "configs", "digits_base.yaml")
    callbacks = [{"class_path": "ssf.SSFCallback", "init_args": {"shift": False, "target_modules": ["fc"]}}]
    args = ["--config", config, "--trainer.logger=false", f"--trainer.callbacks={json.dumps(callbacks)}"]
    (callback,) = [c for c in PEFTCLI(args=args, run=False).trainer.callbacks if isinstance(c, PEFTCallback)]
    assert isinstance(callback, ssf.SSFCallback) and callback.config == ssf.SSFConfig(
        shift=False, target_modules=["fc"]
    )


def test_the_registry_holds_its_name(ssf):
    assert get_method(ssf.SSFConfig()) is registry._METHODS["ssf"]
    importlib.reload(ssf)  # the same class registered again replaces the earlier object
    assert type(get_method("ssf")) is ssf.SSFMethod

    class Impostor(ssf.SSFMethod):
        pass

    with pytest.raises(ValueError, match=r"name 'ssf' is taken by ssf\.SSFMethod; cannot register .*Impostor"):
        register_method(Impostor())
