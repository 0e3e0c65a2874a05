"""The documentation site builds with ``mkdocs build --strict``: broken links, missing pages, a docstring that
mkdocstrings cannot render or an API object that no longer exists fail the test suite."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-f", "mkdocs.yml", "-d", str(site)]
    env = {**os.environ, "PYTHONPATH": ROOT, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed (pip install -e '.[test]'):\n{done.stderr[-4000:]}"
    api = (site / "api" / "index.html").read_text()
    for name in ("LoRACallback", "inject_lora", "merge_lora", "count_parameters"):
        assert name in api, f"{name} missing from the API reference"
    assert "final_model.safetensors" in (site / "cli" / "index.html").read_text()  # the YAML snippet was included

    # every exported callback has its reference rendered on a callback page, not only in the API list
    import lightning.pytorch as pl

    import peft_callbacks

    pages = "".join(p.read_text() for p in (site / "callbacks").rglob("*.html"))
    pages += (site / "file-format" / "index.html").read_text()
    callbacks = [n for n in peft_callbacks.__all__ if isinstance(getattr(peft_callbacks, n), type)]
    callbacks = [n for n in callbacks if issubclass(getattr(peft_callbacks, n), pl.Callback)]
    assert len(callbacks) >= 8
    for name in callbacks:
        assert f'id="peft_callbacks.{name}"' in pages, f"{name} has no reference section on a callback page"


def test_the_docs_extra_installs_what_the_site_needs():
    """``pip install -e ".[docs]"`` brings mkdocs and the plugins mkdocs.yml uses; ``.[test]`` keeps them (the build
    above runs in the suite)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=~ ;]", r, maxsplit=1)[0].lower() for r in requirements}

    assert names(extras["docs"]) == {"mkdocs", "mkdocstrings", "pymdown-extensions"}
    assert set(extras["docs"]) <= set(extras["test"])
    with open(os.path.join(ROOT, "mkdocs.yml")) as f:
        config = f.read()
    assert "mkdocstrings" in config and "pymdownx." in config  # the plugins the extra provides
    assert "mkdocstrings[python]" in " ".join(extras["docs"])  # the Python handler the API pages use
