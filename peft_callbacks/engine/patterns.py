"""Per-layer settings with HF PEFT's key semantics: ``rank_pattern`` / ``alpha_pattern`` and ``layers_to_transform``.

* ``rank_pattern`` / ``alpha_pattern`` map a key to a value. A key applies to a module when it matches the end of the
  module's path as a regex, after a dot or at the start (PEFT's ``get_pattern_key``: ``(.*\\.)?(key)$``); the first
  matching key in the dict's order wins, and modules no key matches keep ``rank`` / ``alpha``. A key that is a
  target's full path applies to that module (that is how a recorded adapter stores them, so replaying a recipe
  evaluates no regex). :func:`resolve_patterns` turns the keys into exact target paths once, at injection.
* ``layers_to_transform`` keeps only the targets inside the numbered layers it names; the layer number is the first
  numbered path segment (PEFT's rule: ``model.layers.3.self_attn.q_proj`` is in layer 3), or the number right after
  a ``layers_pattern`` segment (``blocks`` for ``blocks.3.attn.qkv``).

Example::

    >>> pattern_value({"q_proj": 4, "layers\\\\.1\\\\..*v_proj": 2}, "model.layers.1.self_attn.v_proj")
    2
    >>> pattern_value({"q_proj": 4}, "model.layers.1.self_attn.v_proj") is None
    True
    >>> layer_index("model.layers.3.self_attn.q_proj"), layer_index("blocks.3.attn.qkv", ["blocks"])
    (3, 3)
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

__all__ = [
    "PerLayerSettings",
    "check_layer_indices",
    "check_pattern_dict",
    "layer_index",
    "layer_settings",
    "pattern_value",
    "prune_patterns",
    "resolve_patterns",
    "resolve_rank_alpha",
    "select_layers",
]

log = logging.getLogger(__name__)


def check_pattern_dict(name: str, value: Any, *, integer: bool) -> dict[str, Any] | None:
    """Return ``value`` (``None`` or ``{key: value > 0}``) checked; an empty dict becomes ``None``.

    Example::

        >>> check_pattern_dict("rank_pattern", {"q_proj": 0}, integer=True)
        Traceback (most recent call last):
        ...
        ValueError: `rank_pattern` must map keys to ints >= 1, got 0 for key 'q_proj'.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"`{name}` must be None or a dict of module-name pattern -> value, got {type(value).__name__}.")
    allowed = "ints >= 1" if integer else "numbers > 0"
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"`{name}` keys must be non-empty strings (module-name patterns), got {key!r}.")
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"`{name}` key {key!r} is not a valid regex: {err}.") from None
        ok_type = isinstance(item, int) if integer else isinstance(item, (int, float))
        if isinstance(item, bool) or not ok_type:
            raise TypeError(f"`{name}` must map keys to {allowed}, got {type(item).__name__} {item!r} for key {key!r}.")
        if item <= 0:
            raise ValueError(f"`{name}` must map keys to {allowed}, got {item!r} for key {key!r}.")
        out[key] = item if integer else float(item)
    return out or None


def check_layer_indices(name: str, value: Any) -> list[int] | None:
    """``layers_to_transform`` as a list of ints >= 0 (an int becomes a one-element list), or ``None``."""
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise TypeError(f"`{name}` must be None, an int or a non-empty list of ints (layer numbers), got {value!r}.")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ValueError(f"`{name}` must hold layer numbers (ints >= 0), got {item!r} in {value!r}.")
    return list(items)


def pattern_value(pattern: dict[str, Any] | None, path: str) -> Any:
    """The value of the first key of ``pattern`` that matches ``path`` (PEFT's ``get_pattern_key``), or ``None``."""
    if not pattern:
        return None
    if path in pattern:
        return pattern[path]
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None


def resolve_patterns(
    patterns: dict[str, dict[str, Any] | None], targets: list[str], defaults: dict[str, Any]
) -> dict[str, dict[str, Any] | None]:
    """``{field: {target path: value}}``: each pattern's keys turned into the exact targets they set.

    Only targets whose value differs from ``defaults[field]`` are listed, longest path first (so PEFT's first-match
    rule reads them back exactly). A pattern whose keys are all target paths (a recorded one) is read exactly, with
    no regex.

    Raises:
        ValueError: a key that matches no target (the message names the field, the key and some targets).

    Example::

        >>> resolve_patterns({"rank_pattern": {"v": 2}}, ["a.q", "a.v", "b.v"], {"rank_pattern": 8})
        {'rank_pattern': {'a.v': 2, 'b.v': 2}}
    """
    out: dict[str, dict[str, Any] | None] = {}
    for field, pattern in patterns.items():
        if not pattern:
            out[field] = None
            continue
        exact = set(pattern) <= set(targets)
        used: set[str] = set()
        resolved = {}
        for path in targets:
            key = path if exact and path in pattern else None if exact else _first_key(pattern, path)
            if key is None:
                continue
            used.add(key)
            if pattern[key] != defaults[field]:
                resolved[path] = pattern[key]
        unused = [k for k in pattern if k not in used]
        if unused:
            raise ValueError(
                f"`{field}` key {unused[0]!r} matches none of the {len(targets)} adapted module(s) (keys match the end "
                f"of a module's path as a regex, as in PEFT); adapted modules include: {', '.join(targets[:6])}"
                f"{', …' if len(targets) > 6 else ''}."
            )
        out[field] = dict(sorted(resolved.items(), key=lambda item: -len(item[0]))) or None
    return out


def _first_key(pattern: dict[str, Any], path: str) -> str | None:
    return next((key for key in pattern if re.match(rf"(.*\.)?({key})$", path)), None)


def layer_index(path: str, layers_pattern: list[str] | None = None) -> int | None:
    """The layer number of a module path as PEFT reads it (see the module docstring), or ``None``."""
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", f"{path}.")
    else:
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", f"{path}.")
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def select_layers(targets: list[str], layers: list[int] | None, layers_pattern: list[str] | None) -> list[str]:
    """The targets inside the layers numbered ``layers`` (all of them when ``layers`` is ``None``).

    Raises:
        ValueError: a layer number no target is in (out of range), naming the numbers the targets have.

    Example::

        >>> select_layers(["h.0.attn.c_attn", "h.1.attn.c_attn"], [1], ["h"])
        ['h.1.attn.c_attn']
        >>> select_layers(["h.0.attn.c_attn", "h.1.attn.c_attn"], [2], ["h"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `layers_to_transform`=[2] names layer(s) [2] that no selected module is in; ... layers 0..1 ...
    """
    if layers is None:
        return targets
    index = {path: layer_index(path, layers_pattern) for path in targets}
    found = sorted({i for i in index.values() if i is not None})
    missing = [i for i in layers if i not in found]
    if missing:
        where = f"layers {found[0]}..{found[-1]}" if found else "no numbered layer"
        hint = "" if found else "; set `layers_pattern` to the name before the layer number (e.g. 'blocks')"
        raise ValueError(
            f"`layers_to_transform`={layers!r} names layer(s) {missing} that no selected module is in; the selected "
            f"modules are in {where} (layers_pattern={layers_pattern!r}){hint}."
        )
    return [path for path in targets if index[path] in layers]


def prune_patterns(config: Any, targets: list[str]) -> Any:
    """``config`` without the ``*_pattern`` keys that match none of ``targets``: an imported PEFT config may hold
    keys its model never matched (PEFT ignores them), and only what sets a layer here is kept.

    Example::

        >>> from peft_callbacks.methods.lora import LoRAConfig
        >>> prune_patterns(LoRAConfig(rank_pattern={"q": 2, "k": 4}), ["a.q"]).rank_pattern
        {'q': 2}
    """
    changes = {}
    for field in dataclasses.fields(config):
        pattern = getattr(config, field.name)
        if field.name.endswith("_pattern") and isinstance(pattern, dict):
            kept = {k: v for k, v in pattern.items() if any(_first_key({k: v}, path) for path in targets)}
            if kept != pattern:
                left_out = sorted(set(pattern) - set(kept))
                log.info("`%s`: left out key(s) that match no adapted module: %s", field.name, left_out)
                changes[field.name] = kept or None
    return dataclasses.replace(config, **changes) if changes else config


def layer_settings(config: Any, path: str) -> Any:
    """The settings of the layer at ``path``: ``rank`` and ``alpha`` of ``config`` from its (resolved)
    ``rank_pattern`` / ``alpha_pattern``; ``config`` itself where no key sets the layer.

    Example::

        >>> from peft_callbacks.methods.lora import LoRAConfig
        >>> layer_settings(LoRAConfig(rank=8, rank_pattern={"v": 2}), "attn.v").rank
        2
    """
    rank, alpha = pattern_value(config.rank_pattern, path), pattern_value(config.alpha_pattern, path)
    if rank is None and alpha is None:
        return config
    changes = dict(rank=rank or config.rank, alpha=alpha or config.alpha, rank_pattern=None, alpha_pattern=None)
    return dataclasses.replace(config, **changes)


def resolve_rank_alpha(config: Any, targets: list[str]) -> Any:
    """``config`` with ``rank_pattern`` / ``alpha_pattern`` keyed by the exact ``targets`` they set (what recipes,
    adapter files and exports hold; see :func:`resolve_patterns`)."""
    if not config.rank_pattern and not config.alpha_pattern:
        return config
    patterns = {"rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern}
    resolved = resolve_patterns(patterns, targets, {"rank_pattern": config.rank, "alpha_pattern": config.alpha})
    return dataclasses.replace(config, **resolved)


class PerLayerSettings:
    """Mixin for a :class:`~peft_callbacks.engine.LayerMethod` whose config has ``rank``/``alpha`` and
    ``rank_pattern``/``alpha_pattern``: the patterns are resolved at injection and each adapter is built with its
    layer's rank and alpha, while its ``config`` stays the adapter's whole config (one per adapter, as PEFT's)."""

    def resolve(self, model: Any, config: Any, targets: list[str]) -> Any:
        return resolve_rank_alpha(config, targets)

    def create_adapter(self, model: Any, path: str, base: Any, config: Any, shared: Any) -> Any:
        adapter = super().create_adapter(model, path, base, layer_settings(config, path), shared)  # type: ignore[misc]
        adapter.config = config
        return adapter
