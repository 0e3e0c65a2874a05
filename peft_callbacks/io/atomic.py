"""Saves that write only their own files, each in one step, and leave everything else in the folder alone.

A save (an adapter file, a PEFT directory, full weights) writes a *set* of files that belong together (tensors and the
recipe or config that describes them) into a folder that may hold other things: Lightning checkpoints, logs, a save
of another kind. :func:`file_set` writes such a set, as a transaction:

1. each file is written under ``<folder>/.peft_callbacks-staging/`` and flushed to disk (``fsync``);
2. commit: the manifest ``<folder>/.peft_callbacks-files.json`` is replaced in one step (temporary file, ``fsync``,
   ``os.replace``), recording the files to move in and the stale files to remove;
3. each file is moved onto its final name with ``os.replace`` (JSON files last, as ``save_pretrained`` writes the
   config last), and the stale files are removed;
4. the manifest is written again without the pending step.

The manifest lists, for each kind of save, the files it wrote. *Stale* files are those the previous save of the same
kind wrote that this one does not (a shard of an earlier, larger save; a PEFT adapter no longer exported), known by
exact name, never by pattern; they are the only files a save removes. A process killed before the commit leaves the
old version (and a staging folder the next save removes); killed after it, the next save or load through
peft_callbacks completes steps 3-4 first (:func:`finish_interrupted_save`), so the folder holds the new version.
Every name is resolved inside the folder (:func:`path_inside`). :func:`atomic_file` writes one file in one step.

Example::

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> (folder / "epoch=1.ckpt").write_text("the user's")
    10
    >>> with file_set(folder, "demo") as staging:
    ...     write_json(staging / "a.json", {"v": 1})
    ...     write_json(staging / "b.json", {"v": 1})
    >>> with file_set(folder, "demo") as staging:  # b.json is stale now: it goes, the checkpoint stays
    ...     write_json(staging / "a.json", {"v": 2})
    >>> sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    ['a.json', 'epoch=1.ckpt']
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = [
    "MANIFEST",
    "STAGING",
    "atomic_file",
    "file_set",
    "finish_interrupted_save",
    "path_inside",
    "write_json",
    "write_safetensors",
]

log = logging.getLogger(__name__)

MANIFEST = ".peft_callbacks-files.json"
STAGING = ".peft_callbacks-staging"
_FORMAT = "peft_callbacks.files"
_TMP = ".peft_callbacks-tmp"  # suffix of a file being written: ".<name>.peft_callbacks-tmp", one exact name per file


def path_inside(target: str | os.PathLike, name: str | os.PathLike) -> Path:
    """``target / name``, refused unless it stays inside ``target``: ``name`` is relative, has no ``..`` or empty
    step, and no folder on the way is a link leading out (the last step may be a link: replacing it replaces the
    link, not what it points to).

    Raises:
        ValueError: ``name`` would write or remove something outside ``target``.

    Example::

        >>> path_inside("/runs", "b/adapter_config.json").as_posix()
        '/runs/b/adapter_config.json'
        >>> path_inside("/runs", "../etc/passwd")
        Traceback (most recent call last):
        ...
        ValueError: '../etc/passwd' is not a plain relative path inside '/runs'; a save writes only inside its folder.
    """
    root = Path(target)
    relative = Path(name)
    parts = PurePosixPath(os.fspath(name).replace(os.sep, "/")).parts
    if relative.is_absolute() or relative.drive or not parts or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise ValueError(
            f"{os.fspath(name)!r} is not a plain relative path inside {os.fspath(target)!r}; a save "
            f"writes only inside its folder."
        )
    path = root / relative
    if not path.parent.resolve().is_relative_to(root.resolve()):
        raise ValueError(
            f"{os.fspath(name)!r} leads out of {os.fspath(target)!r} (through a link); a save writes only inside its "
            f"folder."
        )
    return path


# -- flushing and removing ----------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    if path.is_dir() and not hasattr(os, "O_DIRECTORY"):
        return  # folders cannot be opened for fsync here (Windows); renames are durable there already
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Remove ``path`` (one of our exact names): a link or file is unlinked, a folder removed with its content."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` in one step.

    The temporary file is ``.<name>.peft_callbacks-tmp`` in the same folder; one left by a killed write is removed by
    the next write to the same path. Nothing else in the folder is touched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}{_TMP}"
    _discard(staging)
    try:
        yield staging
        _fsync(staging)
        os.replace(staging, target)
        _fsync(target.parent)
    finally:
        _discard(staging)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=1))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (moved to the CPU, contiguous, detached) as safetensors."""
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(path), metadata=metadata)


# -- the manifest -------------------------------------------------------------------------------------------------
def _plain_names(value: Any) -> bool:
    """A list of ``/``-separated relative names without empty, ``.`` or ``..`` steps, backslashes or control
    characters (names read from the manifest, which could have been edited)."""
    return isinstance(value, list) and all(
        isinstance(name, str)
        and all(p not in ("", ".", "..") and "\\" not in p and p.isprintable() for p in name.split("/"))
        for name in value
    )


def _read_manifest(folder: Path) -> dict[str, Any]:
    """``{"files": {kind: [names]}, "pending": None | {"write": [names], "remove": [names]}}``; empty when the folder
    has no manifest, or one that is not ours or malformed (then nothing is removed as stale)."""
    empty: dict[str, Any] = {"files": {}, "pending": None}
    path = folder / MANIFEST
    if not path.is_file():
        return empty
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        data = None
    files = data.get("files") if isinstance(data, dict) and data.get("format") == _FORMAT else None
    pending = data.get("pending") if isinstance(files, dict) else None
    valid = (
        isinstance(files, dict)
        and all(isinstance(k, str) and _plain_names(v) for k, v in files.items())
        and (
            pending is None
            or isinstance(pending, dict)
            and all(_plain_names(pending.get(k)) for k in ("write", "remove"))
        )
    )
    if not valid:
        log.warning("%s is not a valid peft_callbacks manifest; it is ignored (no stale file is removed).", path)
        return empty
    return {"files": files, "pending": pending}


def _write_manifest(folder: Path, files: dict[str, list[str]], pending: dict[str, list[str]] | None) -> None:
    path = folder / MANIFEST
    staging = folder / f"{MANIFEST}{_TMP}"
    write_json(staging, {"format": _FORMAT, "version": 1, "files": files, "pending": pending})
    _fsync(staging)
    try:
        os.replace(staging, path)
    except FileNotFoundError:  # another process finishing the same interrupted save moved it first
        if not path.is_file():
            raise
    _fsync(folder)


def _written(staging: Path) -> list[str]:
    """Every file under ``staging``, as ``/``-separated relative names; JSON files (configs, recipes) last."""
    names = [p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file() and not p.is_symlink()]
    return sorted(names, key=lambda n: (n.endswith(".json"), n))


def _plan(files: dict[str, list[str]], kind: str, names: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """The manifest's new ``files`` and the stale names to remove: the previous files of ``kind`` not written now,
    and the whole set of another kind whose files this save overwrote in part (a set that no longer belongs
    together), minus what any remaining set still lists."""
    new = set(names)
    broken = {k for k, listed in files.items() if k != kind and new & set(listed)}
    kept = {k: listed for k, listed in files.items() if k != kind and k not in broken}
    listed_still = {n for listed in kept.values() for n in listed}
    before = set(files.get(kind, [])).union(*(files[k] for k in broken))
    return {**kept, kind: names}, sorted(before - new - listed_still)


def _apply(folder: Path, write: list[str], remove: list[str]) -> None:
    """Steps 3 of the module docstring (idempotent: a step already done is skipped)."""
    staging = folder / STAGING
    touched = {folder}
    for name in write:
        source, destination = staging / name, path_inside(folder, name)
        if source.is_file():
            destination.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # moved already by another process finishing this save
                os.replace(source, destination)
            touched.add(destination.parent)
    for name in remove:
        path = path_inside(folder, name)
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != folder and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()  # a sub-folder of ours left empty (the adapter it held is no longer saved)
            parent = parent.parent
        touched.add(parent)
    for path in touched:
        if path.is_dir():
            _fsync(path)
    _discard(staging)


def finish_interrupted_save(directory: str | os.PathLike) -> bool:
    """Complete a save to ``directory`` that was killed after its commit point (see the module docstring); say
    whether there was one. Loads call it first, so they read the new version, never a mix.

    Example::

        >>> import tempfile
        >>> finish_interrupted_save(tempfile.mkdtemp())
        False
    """
    folder = Path(directory)
    manifest = _read_manifest(folder)
    pending = manifest["pending"]
    if pending is None:
        return False
    try:
        _apply(folder, pending["write"], pending["remove"])
        _write_manifest(folder, manifest["files"], None)
    except OSError as err:
        raise OSError(
            f"A save to {str(folder)!r} was interrupted after its commit point; peft_callbacks completes it before "
            f"reading the folder, which failed: {err}"
        ) from err
    log.warning("Completed the save to %s that was interrupted after its commit point.", folder)
    return True


@contextlib.contextmanager
def file_set(directory: str | os.PathLike, kind: str, *, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty staging folder to fill with the files of one save of ``kind`` (``"adapter"``, ``"peft"``,
    ``"weights"``); on success they replace their namesakes in ``directory`` together, the stale files of ``kind``
    go, and nothing else in ``directory`` is touched (see the module docstring).

    ``keep`` names files that are no longer ours although an earlier save wrote them (a ``README.md`` card the user
    replaced with their own): they are never removed as stale, and the manifest stops listing them.

    If the block raises, ``directory`` is left as it was.

    Raises:
        ValueError: ``directory`` exists and is not a folder, a file would land outside it or replace a folder.
    """
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"`directory` {str(folder)!r} exists and is not a directory.")
    folder.mkdir(parents=True, exist_ok=True)
    finish_interrupted_save(folder)
    staging = folder / STAGING
    _discard(staging)  # from a save killed before its commit
    staging.mkdir()
    committed = False
    try:
        yield staging
        names = _written(staging)
        for name in names:
            destination = path_inside(folder, name)
            if destination.is_dir() and not destination.is_symlink():
                raise ValueError(f"{str(destination)!r} is a folder; the save would replace it with a file.")
            _fsync(staging / name)
        for sub in {(staging / n).parent for n in names}:
            _fsync(sub)
        files, stale = _plan(_read_manifest(folder)["files"], kind, names)
        files = {k: [n for n in listed if n not in keep] for k, listed in files.items()}
        stale = [n for n in stale if n not in keep]
        _write_manifest(folder, files, {"write": names, "remove": stale})
        committed = True
        _apply(folder, names, stale)
        _write_manifest(folder, files, None)
    finally:
        if not committed:
            _discard(staging)
