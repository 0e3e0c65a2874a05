"""Writes that are never half done: a directory or file is always its old complete version or its new one.

:func:`atomic_directory` builds the new content in a hidden sibling folder (``.<name>.tmp-<random>``), flushes it to
disk, and then swaps it with the old folder in one step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames,
with the old version kept aside until the new one is in place). A process killed at any moment leaves either the old
folder or the new one under the name, plus at most a hidden leftover that the next write to the same place removes.
:func:`atomic_file` does the same for one file with ``os.replace``.

Example::

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "adapter"
    >>> with atomic_directory(target) as folder:
    ...     write_json(folder / "a.json", {"v": 1})
    >>> with atomic_directory(target) as folder:
    ...     write_json(folder / "a.json", {"v": 2})
    >>> (target / "a.json").read_text(), sorted(p.name for p in target.parent.iterdir())
    ('{\\n "v": 2\\n}', ['adapter'])
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = ["atomic_directory", "atomic_file", "write_json", "write_safetensors"]

_TMP, _OLD = ".tmp-", ".old-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _leftovers(target: Path) -> list[Path]:
    prefix = f".{target.name}"
    parent = target.parent
    if not parent.is_dir():
        return []
    return [p for p in parent.iterdir() if p.name.startswith((prefix + _TMP, prefix + _OLD))]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step where the OS can (Linux renameat2); False where it cannot."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to fill; on success it replaces ``directory`` as a whole (see the module docstring).

    If the block raises, ``directory`` is left as it was and the partial folder is removed.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"`directory` {str(target)!r} exists and is not a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in _leftovers(target):  # from writes killed earlier
        _remove(leftover)
    staging = target.parent / f".{target.name}{_TMP}{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        if not target.exists():
            os.rename(staging, target)
        elif _exchange(staging, target):
            _remove(staging)  # now holds the old version
        else:
            old = target.parent / f".{target.name}{_OLD}{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(staging, target)
            _remove(old)
    finally:
        if staging.exists():
            _remove(staging)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` in one step."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in _leftovers(target):
        _remove(leftover)
    staging = target.parent / f".{target.name}{_TMP}{uuid.uuid4().hex[:8]}"
    try:
        yield staging
        fd = os.open(staging, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staging, target)
    finally:
        if staging.exists():
            _remove(staging)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=1))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (moved to the CPU, contiguous, detached) as safetensors."""
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(path), metadata=metadata)
