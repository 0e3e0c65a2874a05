"""Nothing is unpickled (issue 25, item 3).

A checkpoint is a file from anywhere: every read of one in the package passes ``weights_only=True`` (plain data and
tensors), whatever Lightning or an environment variable would default to, so a pickle payload in it never runs. The
last test reads the package's source and fails on any call that could unpickle.
"""

from __future__ import annotations

import ast
import builtins
import doctest
import os
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from user_modules import TwoLayerNet, feature_batches

import peft_callbacks
from peft_callbacks import LayerwiseUnfreezing, LoRACallback, SlimCheckpoint, load_checkpoint
from peft_callbacks.callbacks.freezing import saved_callback_state
from peft_callbacks.plumbing.slim_loading import install_slim_loader

PACKAGE = Path(peft_callbacks.__file__).resolve().parent


class Payload:
    """Unpickling this object creates the file ``marker`` (``open(marker, "w")``): proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _trainer(callbacks, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A checkpoint of a LoRA fit, as the library writes it."""
    trainer = _trainer([LoRACallback(rank=2, merge_on_train_end=False)])
    trainer.fit(TwoLayerNet(), feature_batches())
    path = tmp_path_factory.mktemp("genuine") / "lora.ckpt"
    trainer.save_checkpoint(path)
    return path


def _with_payload(genuine: Path, folder: Path) -> tuple[Path, Path]:
    """A copy of ``genuine`` carrying a payload; returns ``(checkpoint, marker the payload would create)``."""
    marker = folder / "payload-ran"
    checkpoint = torch.load(genuine, weights_only=True)
    checkpoint["callbacks"] = {**checkpoint.get("callbacks", {}), "evil": Payload(marker)}
    path = folder / "evil.ckpt"
    torch.save(checkpoint, path)
    return path, marker


# -- the freezing callbacks' early read (FSDP, DeepSpeed, FSDP2) ----------------------------------------------------
def test_saved_callback_state_runs_no_payload(tmp_path, genuine):
    path, marker = _with_payload(genuine, tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        saved_callback_state(path, "LayerwiseUnfreezing")
    sharded = tmp_path / "sharded.ckpt"  # a sharded checkpoint's folder: its meta.pt is read
    sharded.mkdir()
    os.replace(path, sharded / "meta.pt")
    with pytest.raises(pickle.UnpicklingError):
        saved_callback_state(sharded, "LayerwiseUnfreezing")
    assert not marker.exists()


class LateRestore(SingleDeviceStrategy):
    """Restores checkpoints after ``setup``, as FSDP, DeepSpeed and FSDP2 do: the freezing callbacks then read their
    state from the file themselves, before Lightning does."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def test_resume_with_a_freezing_callback_under_late_restore_runs_no_payload(tmp_path):
    first = _trainer([LayerwiseUnfreezing()], max_epochs=1, max_steps=-1)
    first.fit(TwoLayerNet(), feature_batches())
    genuine = tmp_path / "epoch.ckpt"
    first.save_checkpoint(genuine)
    resumed = _trainer([LayerwiseUnfreezing()], max_epochs=2, max_steps=-1, strategy=LateRestore("cpu"))
    resumed.fit(
        TwoLayerNet(), feature_batches(), ckpt_path=genuine
    )  # the callback's own state reads with weights_only=True
    assert resumed.current_epoch == 2
    path, marker = _with_payload(genuine, tmp_path)
    again = _trainer([LayerwiseUnfreezing()], max_epochs=2, max_steps=-1, strategy=LateRestore("cpu"))
    with pytest.raises(pickle.UnpicklingError):
        again.fit(TwoLayerNet(), feature_batches(), ckpt_path=path)
    assert not marker.exists()


# -- load_checkpoint ------------------------------------------------------------------------------------------------
def _serve_urls(monkeypatch, served: Path) -> list[bool | None]:
    """Stand in for the network: a URL "downloads" ``served``, read with the ``weights_only`` the caller passed."""
    seen: list[bool | None] = []

    def from_url(url, map_location=None, weights_only=False, **kwargs):
        seen.append(weights_only)
        return torch.load(served, map_location=map_location, weights_only=weights_only)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", from_url)
    return seen


def test_load_checkpoint_from_a_url_reads_safely_by_default(tmp_path, monkeypatch, genuine):
    seen = _serve_urls(monkeypatch, genuine)
    loaded = load_checkpoint(
        TwoLayerNet, "https://example.invalid/lora.ckpt"
    )  # Lightning would pick weights_only=False
    assert isinstance(loaded, TwoLayerNet) and seen == [True]
    path, marker = _with_payload(genuine, tmp_path)
    _serve_urls(monkeypatch, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(TwoLayerNet, "https://example.invalid/evil.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(TwoLayerNet, "https://example.invalid/evil.ckpt", weights_only=None)  # None means True too
    assert not marker.exists()


def test_load_checkpoint_onto_an_instance_runs_no_payload_even_if_torch_defaults_to_unsafe(
    tmp_path, monkeypatch, genuine
):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's own default becomes weights_only=False
    path, marker = _with_payload(genuine, tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(TwoLayerNet(), path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(TwoLayerNet, path)
    assert not marker.exists()


def test_load_checkpoint_unpickles_only_when_the_caller_says_so(tmp_path, genuine):
    path, marker = _with_payload(genuine, tmp_path)
    load_checkpoint(TwoLayerNet, path, weights_only=False)  # a file the caller trusts: their explicit choice
    assert marker.exists()


def test_slim_checkpoint_loader_reads_safely_when_lightning_passes_none(tmp_path, monkeypatch, genuine):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, marker = _with_payload(genuine, tmp_path)
    folder = tmp_path / "distributed.ckpt"
    folder.mkdir()
    os.replace(path, folder / "meta.pt")
    strategy, owner = SingleDeviceStrategy("cpu"), SlimCheckpoint()
    install_slim_loader(strategy, "fsdp2", "peft_callbacks_slim", owner=owner)
    with pytest.raises(pickle.UnpicklingError):
        strategy.load_checkpoint(folder)  # weights_only=None, Lightning's default
    assert not marker.exists()


# -- nothing in the package can unpickle ----------------------------------------------------------------------------
# Where a caller's own explicit choice of ``weights_only`` is passed on (a variable, never a literal False or None).
CALLERS_CHOICE = {("plumbing/checkpoint_hooks.py", "load_checkpoint"), ("plumbing/slim_loading.py", "load")}
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib"}


def _problems(tree: ast.AST, where: str, functions: dict[int, str]) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in PICKLE_MODULES:
            if any(alias.name in ("load", "loads", "Unpickler") for alias in node.names):
                found.append(f"{where}:{node.lineno}: imports an unpickler from {node.module}")
        if not isinstance(node, ast.Call):
            continue
        func, line = node.func, f"{where}:{node.lineno}"
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        keywords = {k.arg: k.value for k in node.keywords}
        if owner in PICKLE_MODULES and name in ("load", "loads", "Unpickler"):
            found.append(f"{line}: {owner}.{name}")
        if "allow_pickle" in keywords and not (
            isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False
        ):
            found.append(f"{line}: allow_pickle")
        value = keywords.get("weights_only")
        if owner == "torch" and name == "load" and value is None:
            found.append(f"{line}: torch.load without weights_only=True")
        if name == "load_from_checkpoint" and value is None:  # Lightning turns None into False for URLs
            found.append(f"{line}: load_from_checkpoint without weights_only=True")
        if value is None or (isinstance(value, ast.Constant) and value.value is True):
            continue
        if isinstance(value, ast.Constant):
            found.append(f"{line}: weights_only={value.value!r}")
        elif (where.split(":")[0], functions.get(node.lineno)) not in CALLERS_CHOICE:
            found.append(f"{line}: weights_only={ast.unparse(value)} (not the literal True)")
    return found


def _enclosing_functions(tree: ast.AST) -> dict[int, str]:
    """``{line: name of the innermost function around it}``."""
    lines: dict[int, str] = {}
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for function in sorted(functions, key=lambda f: f.end_lineno - f.lineno, reverse=True):
        for line in range(function.lineno, function.end_lineno + 1):
            lines[line] = function.name
    return lines


def _docstring_examples(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line of the docstring, source)`` of every ``>>>`` example in the file's docstrings."""
    examples = []
    parser = doctest.DocTestParser()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=True)
            if text:
                line = node.body[0].lineno if node.body else 0
                examples.extend((line, e.source) for e in parser.get_examples(text))
    return examples


def test_no_call_in_the_package_can_unpickle():
    problems: list[str] = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50
    for file in files:
        where = file.relative_to(PACKAGE).as_posix()
        tree = ast.parse(file.read_text(), filename=where)
        problems += _problems(tree, where, _enclosing_functions(tree))
        for line, source in _docstring_examples(tree):
            try:
                example = ast.parse(source)
            except SyntaxError:
                continue
            problems += _problems(example, f"{where} (docstring at line {line})", {})
    assert not problems, "calls that could unpickle:\n" + "\n".join(problems)


def test_the_scan_finds_what_it_looks_for():
    bad = """
import pickle
from pickle import loads
torch.load(f)
torch.load(f, weights_only=False)
torch.load(f, weights_only=None)
trainer.fit(m, ckpt_path=p, weights_only=False)
pickle.load(f)
numpy.load(f, allow_pickle=True)
torch.load(f, weights_only=flag)
Module.load_from_checkpoint(p)
"""
    found = _problems(ast.parse(bad), "x.py", {})
    assert len(found) == 9, found
    good = "torch.load(f, weights_only=True)\nModule.load_from_checkpoint(p, weights_only=True)"
    assert not _problems(ast.parse(good), "x.py", {})
