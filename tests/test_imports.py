"""Every module of the package imports first, on its own: no import cycle hides behind the order in which the
suite or a user's code happens to import them."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import peft_callbacks

PURGE_AND_IMPORT = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "peft_callbacks" or m.startswith("peft_callbacks.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f"{name}: {type(error).__name__}: {error}")
print("\\n".join(failed))
"""


def module_names() -> list[str]:
    found = pkgutil.walk_packages(peft_callbacks.__path__, prefix="peft_callbacks.")
    return ["peft_callbacks", *sorted(info.name for info in found)]


def test_every_module_imports_first():
    names = module_names()
    assert len(names) > 50 and "peft_callbacks.plumbing.checkpoint_hooks" in names
    # one interpreter: torch, Lightning and transformers stay loaded, the package is dropped before each import
    done = subprocess.run(
        [sys.executable, "-c", PURGE_AND_IMPORT, *names], capture_output=True, text=True, timeout=600, check=True
    )
    assert done.stdout.strip() == "", done.stdout
