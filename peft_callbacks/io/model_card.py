"""A ``README.md`` model card beside a saved adapter, as HF PEFT's ``save_pretrained`` writes one.

:func:`~peft_callbacks.io.save_adapter` and :func:`~peft_callbacks.io.export_peft` write it as one of the save's own
files (:mod:`peft_callbacks.io.atomic`): YAML front matter the Hub reads (``base_model``, ``library_name``, ``tags``),
then the base model, each adapter's method, settings and targets, the trainable share and how to load it.

A card is ours when it holds the :data:`MARKER` line. A ``README.md`` without it is the user's: it is never
overwritten or removed (the save logs that it left it). Delete the marker line from our card to keep your edits.

Example::

    >>> import tempfile, pathlib, torch.nn as nn
    >>> from peft_callbacks.methods.lora import inject_lora
    >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
    >>> card = model_card(net, "adapter")
    >>> card.splitlines()[:3], MARKER in card
    (['---', 'library_name: peft_callbacks', 'tags:'], True)
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / CARD_FILE).write_text("# My notes")
    >>> card_is_ours(folder)  # the user's: left alone
    False
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch.nn as nn

from peft_callbacks.core.params import count_parameters
from peft_callbacks.core.recipe import recorded_models, surgery_records
from peft_callbacks.engine.method import get_method

__all__ = ["CARD_FILE", "MARKER", "card_is_ours", "card_keep", "model_card", "write_card"]

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
MARKER = "<!-- peft_callbacks model card: rewritten by each save here; delete this line to keep your own edits -->"
_SHOWN_TARGETS = 12
_DESCRIBED = {"rank", "alpha", "init", "use_dora"}

_USE = {
    "adapter": (
        "peft_callbacks",
        'from peft_callbacks.io import load_adapter\n\nmodel = load_adapter(base_model, "path/to/this/folder")',
    ),
    "peft": (
        "peft",
        'from peft import PeftModel\n\nmodel = PeftModel.from_pretrained(base_model, "path/to/this/folder")\n'
        '# or, with peft_callbacks: peft_callbacks.io.import_peft(base_model, "path/to/this/folder")',
    ),
}


def card_is_ours(folder: str | Path) -> bool | None:
    """``None`` when ``folder`` has no ``README.md``, ``True`` when it holds our :data:`MARKER`, else ``False``."""
    path = Path(folder) / CARD_FILE
    if not path.is_file() or path.is_symlink():
        return False if path.is_symlink() or path.exists() else None
    try:
        return MARKER in path.read_text(errors="replace")
    except OSError:
        return False


def card_keep(folder: str | Path) -> tuple[str, ...]:
    """What a save into ``folder`` must keep: ``("README.md",)`` when the user wrote one there (then no card is
    written), else ``()``."""
    if card_is_ours(folder) is False:
        log.info("Left the README.md in %s as it is: it is not a card peft_callbacks wrote.", folder)
        return (CARD_FILE,)
    return ()


def _base_name(model: nn.Module) -> str | None:
    for sub in [*recorded_models(model).values(), model]:
        name = getattr(getattr(sub, "config", None), "_name_or_path", None)
        if isinstance(name, str) and name:
            return name
    return None


def _adapter_rows(model: nn.Module, names: list[str] | None) -> list[str]:
    rows = []
    for path, sub in (recorded_models(model) or {"": model}).items():
        for record in surgery_records(sub):
            name = record.get("adapter_name", "default")
            if names is not None and name not in names:
                continue
            method = get_method(record["method"])
            config, targets = method.parse_record(record["config"])
            targets = targets or []
            shown = ", ".join(f"`{t}`" for t in targets[:_SHOWN_TARGETS])
            more = f", … ({len(targets)} in all)" if len(targets) > _SHOWN_TARGETS else ""
            where = f" in `{path}`" if path else ""
            settings = ", ".join(filter(None, [method.describe(config), *_changed(config)]))
            rows.append(f"| {name} | {method.title}{where} | {settings or '-'} | {shown}{more} |")
    return rows


def _changed(config: object) -> list[str]:
    """``name=value`` of the settings that differ from their default (per-layer dicts as a count of layers), those
    :meth:`~peft_callbacks.engine.Method.describe` shows already (``rank``, ``alpha``, ``init``, ``use_dora``) left
    out."""
    out = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in _DESCRIBED or not field.metadata.get("recorded", True) or field.default is dataclasses.MISSING:
            continue
        if value != field.default:
            out.append(f"{field.name}={len(value)} layer(s)" if isinstance(value, dict) else f"{field.name}={value}")
    return out


def model_card(model: nn.Module, kind: str, names: list[str] | None = None) -> str:
    """The card's text for the adapters ``names`` (default: all) of ``model``, saved as ``kind`` (``"adapter"``:
    :func:`~peft_callbacks.io.save_adapter`'s format, ``"peft"``: HF PEFT's). Deterministic: saving the same model
    twice gives the same card."""
    library, use = _USE[kind]
    base = _base_name(model)
    methods = sorted(
        {get_method(r["method"]).name for s in recorded_models(model).values() for r in surgery_records(s)}
    )
    front = ["---", f"library_name: {library}"]
    if base:
        front.append(f"base_model: {base}")
    front += ["tags:", "- peft_callbacks", *(f"- {m}" for m in methods)]
    if base:
        front.append(f"- base_model:adapter:{base}")
    front.append("---")
    count = count_parameters(model)
    body = [
        MARKER,
        "",
        f"# {' + '.join(get_method(m).title for m in methods) or 'PEFT'} adapter for {base or type(model).__name__}",
        "",
        f"Fine-tuned with peft_callbacks on the base model `{base or type(model).__name__}`, which this folder does "
        f"not contain: load it first, then this adapter onto it.",
        "",
        "| adapter | method | settings | targets |",
        "|---|---|---|---|",
        *_adapter_rows(model, names),
        "",
        f"Trainable parameters: {count.trainable:,} of {count.total:,} ({count.trainable / max(count.total, 1):.2%}).",
        "",
        "## How to load",
        "",
        "```python",
        use,
        "```",
        "",
    ]
    return "\n".join(front + body)


def write_card(staging: Path, model: nn.Module, kind: str, names: list[str] | None = None) -> None:
    """Write the card into a save's staging folder (see :func:`~peft_callbacks.io.atomic.file_set`)."""
    (staging / CARD_FILE).write_text(model_card(model, kind, names))
