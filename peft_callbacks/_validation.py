"""Argument checks shared by every public function and callback.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value) with a message that
names the argument, shows what was received and says what is allowed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an ``int`` greater than zero."""
    return check_int(name, value, minimum=1)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``float(value)`` if it is a finite real number inside the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")
    return value


def check_positive_float(name: str, value: Any) -> float:
    """Return ``float(value)`` if it is a finite number greater than zero."""
    return check_float(name, value, low=0.0, low_inclusive=False)


def check_module(name: str, value: Any) -> Any:
    """Return ``value`` if it is a ``torch.nn.Module``."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"`{name}` must be a torch.nn.Module, got {type(value).__name__} {_short_repr(value)}.")
    return value


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {type(value).__name__} {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {allowed}; got {value!r}.")
    return value


def check_optional_str(name: str, value: Any) -> str | None:
    """Return ``value`` if it is ``None`` or a non-empty ``str``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a string or None, got {type(value).__name__} {value!r}.")
    if not value:
        raise ValueError(f"`{name}` must be a non-empty string or None, got ''.")
    return value


def check_patterns(name: str, value: Any) -> list[str] | None:
    """Return ``value`` as a list of non-empty pattern strings, or ``None``.

    A single string becomes a one-element list. Anything else (numbers, dicts, lists holding non-strings) raises.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"`{name}` must be None, a string or a list of strings, got {type(value).__name__} {value!r}.")
    if not value:
        raise ValueError(f"`{name}` must not be an empty list; use None for the default.")
    for item in value:
        if not isinstance(item, str) or not item:
            raise TypeError(f"`{name}` entries must be non-empty strings, got {type(item).__name__} {item!r}.")
    return list(value)


def check_path(name: str, value: Any) -> Any:
    """Return ``value`` if it is a non-empty ``str`` or ``os.PathLike`` (a file or directory to read or write)."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a path (str or os.PathLike), got {type(value).__name__} {value!r}.")
    if not os.fspath(value):
        raise ValueError(f"`{name}` must be a non-empty path, got {value!r}.")
    return value


def check_int_list(name: str, value: Any) -> list[int] | None:
    """Return ``value`` as a list of ints, or ``None``."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"`{name}` must be None or a list of ints, got {type(value).__name__} {value!r}.")
    if not value:
        raise ValueError(f"`{name}` must not be an empty list; use None for the default.")
    return list(value)


MAX_ADAPTER_NAME = 100
_ADAPTER_NAME_RULE = (
    f"a plain name of 1 to {MAX_ADAPTER_NAME} printable characters without '.', '/', '\\' or ':' (it becomes a "
    f"module key and a sub-folder name)"
)


def check_instance(name: str, value: Any, kind: type, *, optional: bool = False) -> Any:
    """Return ``value`` if it is a ``kind`` (or ``None`` with ``optional``)."""
    if (value is None and optional) or isinstance(value, kind):
        return value
    allowed = f"a {kind.__name__}" + (" or None" if optional else "")
    raise TypeError(f"`{name}` must be {allowed}, got {type(value).__name__} {_short_repr(value)}.")


def check_callable(name: str, value: Any, *, optional: bool = False) -> Any:
    """Return ``value`` if it can be called (or is ``None`` with ``optional``)."""
    if (value is None and optional) or (callable(value) and not isinstance(value, type)):
        return value
    raise TypeError(
        f"`{name}` must be a function{' or None' if optional else ''}, got {type(value).__name__} {_short_repr(value)}."
    )


def check_batches(name: str, value: Any) -> Any:
    """Return ``value`` if it can be a source of batches: an iterable (a DataLoader, a list of batches), not a
    string, a mapping or a tensor (those are one batch: wrap it in a list)."""
    if isinstance(value, (str, bytes, dict, torch.Tensor)) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"`{name}` must be a DataLoader or another iterable of batches, got {type(value).__name__} "
            f"{_short_repr(value)} (one batch: pass [batch])."
        )
    return value


def check_adapter_name(value: Any, name: str = "adapter_name") -> str:
    """Return ``value`` if it can name an adapter: one plain path component (see :data:`MAX_ADAPTER_NAME`).

    An adapter name becomes a module key and, in PEFT's multi-adapter layout, a sub-folder of the saved directory;
    so it is never a path: no separator, nothing absolute, no ``.``/``..`` (no dot at all: module keys refuse it),
    no drive colon, no NUL or other control character, bounded length.

    Example::

        >>> check_adapter_name("sst2")
        'sst2'
        >>> check_adapter_name("../evil")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `adapter_name` must be a plain name of 1 to 100 printable characters ... got '../evil'.
    """
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a string ({_ADAPTER_NAME_RULE}), got {type(value).__name__} {value!r}.")
    separators = {"/", "\\", ":", ".", os.sep, os.altsep or "/"}
    if (
        not value
        or len(value) > MAX_ADAPTER_NAME
        or any(c in separators or not c.isprintable() for c in value)
        or os.path.isabs(value)
    ):
        shown = value if len(value) <= MAX_ADAPTER_NAME else value[:MAX_ADAPTER_NAME] + "…"
        raise ValueError(f"`{name}` must be {_ADAPTER_NAME_RULE}, got {shown!r}.")
    return value
