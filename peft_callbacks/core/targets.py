"""Which layers of a model to adapt: supported layer types and ``target_modules`` / ``exclude_modules`` patterns.

Pattern rules (the same for ``target_modules`` and ``exclude_modules``, and for every callback):

* ``None`` — every supported layer (Linear, Conv1d/2d/3d, transformers ``Conv1D``, ``nn.MultiheadAttention``) except
  the task head and the vocabulary projection; embeddings only where a pattern names them (as in HF PEFT).
  Grouped/depthwise convolutions and mixture-of-experts routers (:mod:`~peft_callbacks.core.moe`) are skipped with a
  log line.
* ``"all-linear"`` — the same, Linear and ``Conv1D`` only (quantized bitsandbytes Linear layers too), as in HF PEFT.
* a name such as ``"qkv"`` or ``"attn.proj"`` — modules whose path equals it or ends with ``"." + name``.
* a regular expression (any string holding one of ``* + ? [ ] ( ) { } | ^ $ \\``) — modules whose full path
  matches it (``re.fullmatch``).
* a list of the above.

A pattern that matches a container (``"blocks.11"``) selects every supported layer inside it. Each pattern must
select something: a typo is an error that lists the layers that do exist, never a silent no-op.

Example::

    >>> import torch.nn as nn
    >>> model = nn.Sequential()
    >>> model.add_module("attn", nn.Sequential()); model.attn.add_module("qkv", nn.Linear(4, 12))
    >>> model.add_module("fc", nn.Linear(4, 2))
    >>> resolve_targets(model, "qkv").targets
    ['attn.qkv']
    >>> resolve_targets(model, ["qkvv"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `target_modules` entry 'qkvv' matched no module in Sequential; supported layers include: attn.qkv, fc...
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch.nn as nn

from peft_callbacks._validation import check_patterns
from peft_callbacks.core.kinds import (
    KIND_NAMES,
    LINEAR_KINDS,
    NAMED_ONLY_KINDS,
    is_custom_layer,
    is_grouped_conv,
    kinds_description,
    layer_kind,
)
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.moe import moe_routers
from peft_callbacks.core.quantized import is_quantized

log = logging.getLogger(__name__)

_REGEX_CHARS = frozenset("*+?[](){}|^$\\")
_MAX_LISTED = 12
SUPPORTED_LAYERS = kinds_description(tuple(KIND_NAMES))
_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Layers whose parent reads their weight directly and never calls them: an update beside them would never run.
# (nn.MultiheadAttention.out_proj is caught by its own class, NonDynamicallyQuantizableLinear.)
_WEIGHT_READ_BY_PARENT = {"MambaMixer": ("dt_proj",), "FalconMambaMixer": ("dt_proj",)}


def _read_by_parent(walk: list[tuple[str, nn.Module]], model: nn.Module) -> set[str]:
    """Paths of layers that their parent module never calls (see ``_WEIGHT_READ_BY_PARENT``)."""
    modules = dict(walk)
    found = set()
    for path, _ in walk:
        parent_path, _, name = path.rpartition(".")
        parent = modules.get(parent_path, model) if parent_path else model
        if name in _WEIGHT_READ_BY_PARENT.get(type(parent).__name__, ()):
            found.add(path)
    return found


def is_regex(pattern: str) -> bool:
    """Patterns holding a regex metacharacter are matched with ``re.fullmatch``; others by name or suffix."""
    return any(c in _REGEX_CHARS for c in pattern)


def path_matches(pattern: str, path: str) -> bool:
    """Does module ``path`` match ``pattern`` (see the module docstring for the rules)?"""
    if is_regex(pattern):
        return re.fullmatch(pattern, path) is not None
    return path == pattern or path.endswith("." + pattern)


def exact_patterns(paths: Iterable[str]) -> list[str]:
    """Patterns that match exactly these module paths and nothing else (for replaying a recorded selection)."""
    return [f"^{re.escape(p)}$" for p in paths]


def in_subtree(path: str, roots: Iterable[str]) -> bool:
    """Is ``path`` one of ``roots`` or inside one of them?"""
    return any(path == r or path.startswith(r + ".") for r in roots)


@dataclass
class TargetSelection:
    """The outcome of :func:`resolve_targets`.

    Attributes:
        targets: paths of the layers to adapt, in model order.
        skipped_grouped: grouped/depthwise convolutions and custom-forward layers skipped by a default selection.
        protected: paths left out because they are the head (or the vocabulary projection).
    """

    targets: list[str] = field(default_factory=list)
    skipped_grouped: list[str] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)


def _walk(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules of ``model`` without the root and without the inside of modules we inserted."""
    out: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            out.append((path, child))
            if not isinstance(child, PEFTModule):
                visit(child, path)

    visit(model, "")
    return out


def _unwrapped(module: nn.Module) -> nn.Module:
    """An adapted layer counts as the layer it wraps, so that a second adapter can go on the same layer."""
    base = module._modules.get("base_layer") if isinstance(module, PEFTModule) else None
    return base if base is not None else module


def _describe(paths: list[str], modules: dict[str, nn.Module]) -> str:
    shown = ", ".join(f"{p} ({type(modules[p]).__name__})" for p in paths[:_MAX_LISTED])
    return shown + (f", … ({len(paths)} in all)" if len(paths) > _MAX_LISTED else "")


def _listing(paths: list[str]) -> str:
    shown = ", ".join(paths[:_MAX_LISTED])
    return shown + (f", … ({len(paths)} in all)" if len(paths) > _MAX_LISTED else "") if paths else "(none)"


def _compile_checked(argument: str, pattern: str) -> None:
    if is_regex(pattern):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"`{argument}` entry {pattern!r} is not a valid regular expression: {err}.") from None


def resolve_targets(
    model: nn.Module,
    target_modules: str | list[str] | None = None,
    exclude_modules: str | list[str] | None = None,
    *,
    protected: Iterable[str] = (),
    always_protected: Iterable[str] = (),
    kind_filter: Callable[[str], bool] | None = None,
    method: str = "LoRA",
    supported: str = SUPPORTED_LAYERS,
) -> TargetSelection:
    """Resolve target/exclude patterns to the layer paths to adapt.

    Args:
        model: the model to search.
        target_modules: ``None``, ``"all-linear"``, a name, a regex or a list (see the module docstring).
        exclude_modules: patterns of modules (and everything inside them) to leave alone.
        protected: paths (the trainable task head) never adapted; naming one explicitly is an error.
        always_protected: paths left out of default selections only (e.g. the vocabulary projection); naming one
            explicitly adapts it.
        kind_filter: optional extra predicate on :func:`~peft_callbacks.core.kinds.layer_kind` results.
        method: the method's name, for messages.
        supported: the layer types the method adapts, for messages.

    Raises:
        ValueError: a pattern selects nothing, names only protected/unsupported layers, or is not a valid regex.
    """
    if not (target_modules is None or target_modules == "all-linear"):
        target_modules = check_patterns("target_modules", target_modules)
    exclude_modules = check_patterns("exclude_modules", exclude_modules)
    for argument, patterns in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        for pattern in patterns if isinstance(patterns, list) else []:
            _compile_checked(argument, pattern)

    walk = [(path, _unwrapped(m)) for path, m in _walk(model)]
    modules = dict(walk)
    protected = list(protected)
    default_protected = protected + list(always_protected)
    model_name = type(model).__name__

    never_called = _read_by_parent(walk, model)

    def is_supported(path: str) -> bool:
        kind = layer_kind(modules[path])
        return kind is not None and path not in never_called and (kind_filter is None or kind_filter(kind))

    supported_paths = [p for p, _ in walk if is_supported(p)]
    candidates = [p for p in supported_paths if not in_subtree(p, default_protected)]
    selection = TargetSelection(protected=[p for p in supported_paths if in_subtree(p, default_protected)])

    if target_modules is None or target_modules == "all-linear":
        linear_only = target_modules == "all-linear"
        routers = set(moe_routers(model))  # a merged update could flip their top-k: named only
        if routers & set(candidates):
            log.info(
                "%s: left out %d mixture-of-experts router(s) (a merged update can change which experts a token "
                "goes to; name them in target_modules to adapt them): %s",
                method,
                len(routers & set(candidates)),
                _listing(sorted(routers & set(candidates))),
            )
        for path in candidates:
            if path in routers:
                continue
            kind = layer_kind(modules[path])
            if kind not in NAMED_ONLY_KINDS and (not linear_only or kind in LINEAR_KINDS):
                selection.targets.append(path)
        selection.skipped_grouped = [
            p
            for p, m in walk
            if (is_grouped_conv(m) or is_custom_layer(m) or p in never_called)
            and not (linear_only and isinstance(m, _PLAIN_CONVS))
            and not in_subtree(p, default_protected)
        ]
        if selection.skipped_grouped:
            log.info(
                "%s: skipped %d grouped/depthwise convolution(s), layers with their own forward or layers their "
                "parent never calls (name them in target_modules to be told why): %s",
                method,
                len(selection.skipped_grouped),
                _listing(selection.skipped_grouped),
            )
    else:
        chosen: set[str] = set()
        for pattern in target_modules:
            chosen.update(
                _select(
                    pattern,
                    walk,
                    modules,
                    is_supported,
                    protected,
                    candidates,
                    model_name,
                    method,
                    supported_paths,
                    supported,
                    never_called,
                )
            )
        selection.targets = [p for p in supported_paths if p in chosen]

    for pattern in exclude_modules or []:
        hits = [p for p, _ in walk if path_matches(pattern, p)]
        if not hits:
            raise ValueError(
                f"`exclude_modules` entry {pattern!r} matched no module in {model_name}; "
                f"supported layers include: {_listing(supported_paths)}."
            )
        selection.targets = [p for p in selection.targets if not in_subtree(p, hits)]

    if not selection.targets:
        unadapted = [p for p, m in walk if is_quantized(m) and not is_supported(p)]
        hint = (
            f" {len(unadapted)} layer(s) are bitsandbytes-quantized ({_listing(unadapted)}), which {method} does not "
            f"adapt (nor does HF PEFT); LoRA (DoRA, PiSSA/OLoRA), IA3 and AdaLoRA do, or load the base unquantized."
            if unadapted
            else ""
        )
        raise ValueError(
            f"No layer of {model_name} was selected for {method} (target_modules={target_modules!r}, "
            f"exclude_modules={exclude_modules!r}). Layers {method} can adapt ({supported}) outside the head: "
            f"{_listing(candidates)}.{hint}"
        )
    return selection


def _select(
    pattern: str,
    walk: list[tuple[str, nn.Module]],
    modules: dict[str, nn.Module],
    is_supported: Callable[[str], bool],
    protected: list[str],
    candidates: list[str],
    model_name: str,
    method: str,
    supported_paths: list[str],
    supported: str,
    never_called: set[str],
) -> set[str]:
    hits = [p for p, _ in walk if path_matches(pattern, p)]
    if not hits:
        raise ValueError(
            f"`target_modules` entry {pattern!r} matched no module in {model_name}; supported layers include: "
            f"{_listing(candidates or supported_paths)}."
        )
    inserted = [p for p in hits if isinstance(modules[p], PEFTModule)]  # adapted layers count as their base layer
    if inserted:
        raise ValueError(
            f"`target_modules` entry {pattern!r} matched {_describe(inserted, modules)}, which is already a module "
            f"inserted by peft_callbacks; merge or remove it first."
        )
    uncalled = [p for p in hits if p in never_called and p in modules]
    if uncalled:
        raise ValueError(
            f"`target_modules` entry {pattern!r} matched {_describe(uncalled, modules)}, which its parent never calls "
            f"(it reads the weight directly), so a {method} update there would never run or train. Name other layers."
        )
    grouped = [p for p in hits if is_grouped_conv(modules[p]) or is_custom_layer(modules[p])]
    if grouped:
        raise ValueError(
            f"`target_modules` entry {pattern!r} matched {_describe(grouped, modules)}: a grouped/depthwise "
            f"convolution or a layer with its own forward (its output is not weight @ input, so a merged update "
            f"would differ); {method} supports {supported}. Exclude them or name other layers."
        )
    selected = {p for p in supported_paths if in_subtree(p, hits)}
    allowed = {p for p in selected if not in_subtree(p, protected)}
    if allowed:
        return allowed
    if selected:
        raise ValueError(
            f"`target_modules` entry {pattern!r} selects only the task head ({_listing(sorted(selected))}), which "
            f"is trained in full while `train_head=True`. Set `train_head=False` to adapt the head with {method}."
        )
    raise ValueError(
        f"`target_modules` entry {pattern!r} matched {_describe(hits, modules)}, which {method} cannot adapt; "
        f"it supports {supported}. Supported layers include: {_listing(candidates or supported_paths)}."
    )
