"""Flat keyword arguments derived from settings dataclasses: every setting is declared once.

A setting lives in one place: a field of a settings dataclass (a method's config, a callback's options), with its
type, its default and one line in the class's ``Attributes`` section. Functions and callbacks that take settings as
flat keywords (``inject_lora(model, rank=8)``, ``LoRACallback(rank=8)``, a LightningCLI YAML file) get their
signature and the ``Args`` of their docstring from those dataclasses with :func:`takes_settings`. Nothing is written
twice, so nothing drifts, and ``inspect.signature``, ``help()`` and jsonargparse (what LightningCLI uses) see every
argument with its type, default and doc.

The decorated function is written against the dataclasses: it receives one checked instance of each.

Example::

    >>> import dataclasses, inspect
    >>> @dataclasses.dataclass(frozen=True, kw_only=True)
    ... class Blur:
    ...     '''How to blur.
    ...
    ...     Attributes:
    ...         radius: the radius in pixels (> 0).
    ...         sigma: the Gaussian's standard deviation.
    ...     '''
    ...     radius: int = 3
    ...     sigma: float = 1.0
    >>> @takes_settings(Blur)
    ... def blur(image, blur: Blur):
    ...     '''Blur an image.'''
    ...     return blur.radius
    >>> inspect.signature(blur)
    <Signature (image, *, radius: int = 3, sigma: float = 1.0)>
    >>> blur("img", radius=5), blur("img")
    (5, 3)
    >>> print(blur.__doc__.split("Args:")[1].strip().splitlines()[0])
    radius: the radius in pixels (> 0).
    >>> blur("img", raduis=2)
    Traceback (most recent call last):
    ...
    TypeError: blur() got an unexpected argument 'raduis'; did you mean 'radius'?
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import typing
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["field_docs", "setting_names", "settings_parameters", "shared_settings", "takes_settings"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

_SECTION = re.compile(r"^(\s*)(Attributes|Args):\s*$")
_ENTRY = re.compile(r"^(\w+)(?: \(.*?\))?:\s*(.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """``{field: doc}`` from the ``Attributes:`` sections of ``cls`` and its bases (the nearest class wins).

    Example::

        >>> from peft_callbacks.methods.lora import LoRAConfig
        >>> field_docs(LoRAConfig)["rank"]
        'the rank ``r`` of the update (> 0; Hu et al. §4.1).'
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_section_entries(klass.__dict__.get("__doc__") or "", "Attributes"))
    return docs


def _section_entries(docstring: str, section: str) -> dict[str, str]:
    """The entries of one Google-style section (``Attributes:``/``Args:``), continuation lines joined."""
    entries: dict[str, str] = {}
    lines = textwrap.dedent("\n".join(docstring.splitlines()[1:])).splitlines()
    inside, indent, name = False, None, None
    for line in lines:
        header = _SECTION.match(line)
        if header:
            inside, indent, name = header.group(2) == section, None, None
            continue
        if not inside or not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:  # the section ended
            inside = False
            continue
        entry = _ENTRY.match(line.strip())
        if width == indent and entry:
            name = entry.group(1)
            entries[name] = entry.group(2)
        elif name is not None:
            entries[name] += " " + line.strip()
    return entries


def shared_settings(cls: type[T]) -> type[T]:
    """Mark a settings base class whose fields its subclasses share (``MethodConfig``'s ``train_head``): in a flat
    signature they come after the subclass's own fields, so each method's own settings lead.

    Example::

        >>> @shared_settings
        ... @dataclasses.dataclass(frozen=True, kw_only=True)
        ... class Common:
        ...     verbose: bool = False
        >>> @dataclasses.dataclass(frozen=True, kw_only=True)
        ... class Family(Common):
        ...     rank: int = 8
        >>> @dataclasses.dataclass(frozen=True, kw_only=True)
        ... class Member(Family):
        ...     decompose: bool = False
        >>> setting_names(Member)  # the family's fields, the member's, then the shared ones
        ['rank', 'decompose', 'verbose']
    """
    cls.__shared_settings__ = True  # type: ignore[attr-defined]
    return cls


def setting_names(cls: type) -> list[str]:
    """The fields of a settings dataclass in the order a flat signature lists them: those of its classes in the order
    they were declared (a base's before a subclass's), then those of the :func:`shared_settings` bases, the nearest
    first."""
    declared = [k for k in cls.__mro__ if dataclasses.is_dataclass(k)]
    shared = [k for k in declared if "__shared_settings__" in k.__dict__]
    ordered = [*reversed([k for k in declared if k not in shared]), *shared]
    names: list[str] = []
    for klass in ordered:
        annotations = klass.__dict__.get("__annotations__", {})
        names += [f.name for f in dataclasses.fields(klass) if f.name in annotations and f.name not in names]
    return [name for name in names if name in {f.name for f in dataclasses.fields(cls)}]


def settings_parameters(*sources: type, positional: int = 0) -> list[inspect.Parameter]:
    """The flat keyword parameters of ``sources`` (settings dataclasses), typed and with their defaults.

    Args:
        sources: the dataclasses, in the order their fields appear.
        positional: how many of the first fields may also be passed by position (the others are keyword-only).

    Raises:
        TypeError: two sources declare a field of the same name (a setting must be declared once).
    """
    parameters: list[inspect.Parameter] = []
    owner: dict[str, str] = {}
    for source in sources:
        hints = typing.get_type_hints(source)
        fields = {f.name: f for f in dataclasses.fields(source)}
        for name in setting_names(source):
            if name in owner:
                raise TypeError(f"`{name}` is declared by both {owner[name]} and {source.__name__}: declare it once.")
            owner[name] = source.__name__
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if len(parameters) < positional else _KEYWORD
            parameters.append(inspect.Parameter(name, kind, default=_default(fields[name]), annotation=hints[name]))
    return parameters


_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return inspect.Parameter.empty


def takes_settings(*sources: type, positional: int = 0) -> Callable[[F], F]:
    """Give a function (or a class's ``__init__``) the flat keyword arguments of the settings dataclasses
    ``sources``; it is called with one checked instance of each, under the parameter names it declares for them.

    The decorated callable keeps its leading parameters (``model``, ``self``) and declares one parameter per source,
    annotated with that source (``def inject_lora(model, config: LoRAConfig, *, adapter_name="default")``). Callers
    see ``(model, rank=8, alpha=16.0, …, adapter_name="default")``: each source's fields in its place, in the order of
    :func:`setting_names`, with the field's type and default; a field the caller leaves out keeps the dataclass's
    default (a ``default_factory`` runs per call). The docstring's ``Args`` lists every parameter in that order: the
    entries the callable documents itself, and for each field the line of its dataclass's ``Attributes``. The
    function's ``__settings__`` names the sources (for documentation tools and tests).

    Args:
        sources: the settings dataclasses, in the order their fields appear in the signature.
        positional: how many of the first fields may also be passed by position.

    Raises:
        TypeError: the callable does not declare one parameter per source.
    """

    def decorate(obj: F) -> F:
        function = obj.__init__ if isinstance(obj, type) else obj  # type: ignore[misc]
        flat = _flatten(function, sources, positional)
        order = [n for n in inspect.signature(flat).parameters if n != "self"]
        if isinstance(obj, type):
            obj.__init__ = flat  # type: ignore[misc]
            obj.__doc__ = _with_args(obj.__doc__, sources, order)
            return obj
        flat.__doc__ = _with_args(function.__doc__, sources, order)
        return flat  # type: ignore[return-value]

    return decorate


def _flatten(function: Callable[..., Any], sources: tuple[type, ...], positional: int) -> Callable[..., Any]:
    signature = inspect.signature(function)
    hints = typing.get_type_hints(function)
    slots = {source: [n for n, p in signature.parameters.items() if hints.get(n) is source] for source in sources}
    missing = [source.__name__ for source, names in slots.items() if len(names) != 1]
    if missing:
        raise TypeError(f"{function.__qualname__} must declare one parameter annotated with each of {missing}.")
    slot_of = {names[0]: source for source, names in slots.items()}
    settings = {p.name: p for p in settings_parameters(*sources, positional=positional)}
    names = {source: setting_names(source) for source in sources}
    parameters: list[inspect.Parameter] = []
    for name, parameter in signature.parameters.items():  # each slot is replaced by its fields, in place
        if name in slot_of:
            parameters += [settings[n] for n in names[slot_of[name]]]
        else:  # its annotation resolved (a string under `from __future__ import annotations`)
            parameters.append(parameter.replace(annotation=hints.get(name, parameter.annotation)))
    returns = hints.get("return", signature.return_annotation)
    returns = None if returns is type(None) else returns  # shown as `-> None`, as written
    flat_signature = signature.replace(parameters=_keyword_only_after_first(parameters), return_annotation=returns)
    others = [n for n in signature.parameters if n not in slot_of]

    @functools.wraps(function)
    def flat(*args: Any, **kwargs: Any) -> Any:
        unknown = [k for k in kwargs if k not in flat_signature.parameters]
        if unknown:
            raise TypeError(_unexpected(function, unknown[0], list(flat_signature.parameters)))
        values = flat_signature.bind(*args, **kwargs).arguments  # what the caller gave; the rest keeps its default
        built = {
            slot: source(**{n: values[n] for n in names[source] if n in values}) for slot, source in slot_of.items()
        }
        return function(**{n: values[n] for n in others if n in values}, **built)

    del flat.__wrapped__  # inspect.signature must show the flat form, not the wrapped one
    flat.__signature__ = flat_signature  # type: ignore[attr-defined]
    flat.__settings__ = sources  # type: ignore[attr-defined]  # what the arguments come from (docs, tests)
    flat.__annotations__ = {
        p.name: p.annotation for p in flat_signature.parameters.values() if p.annotation is not p.empty
    }
    if returns is not signature.empty:
        flat.__annotations__["return"] = returns
    return flat


def _keyword_only_after_first(parameters: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Every parameter after the first keyword-only one is keyword-only too (a valid signature order)."""
    out: list[inspect.Parameter] = []
    keyword_only = False
    for parameter in parameters:
        keyword_only = keyword_only or parameter.kind is _KEYWORD
        out.append(parameter.replace(kind=_KEYWORD) if keyword_only and parameter.kind is not _KEYWORD else parameter)
    return out


def _unexpected(function: Callable[..., Any], name: str, known: list[str]) -> str:
    owner = function.__qualname__.split(".")[0] if function.__name__ == "__init__" else function.__name__
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(k for k in known if k != 'self')}."
    return f"{owner}() got an unexpected argument {name!r}{hint}"


def _with_args(docstring: str | None, sources: tuple[type, ...], order: list[str]) -> str:
    """``docstring`` whose ``Args`` section lists every parameter of ``order`` (the flat signature) in that order:
    the entries it documents itself, and for each field of ``sources`` the line of its class's ``Attributes``."""
    doc = inspect.cleandoc(docstring or "")
    documented = _section_entries("\n" + doc, "Args")
    docs = {name: text for source in sources for name, text in field_docs(source).items()}
    docs.update(documented)
    names = [n for n in order if n in docs] + [n for n in documented if n not in order]
    lines = []
    for name in names:
        lines += textwrap.wrap(f"{name}: {docs[name]}", 116, subsequent_indent="    ", break_on_hyphens=False)
    section = "Args:\n" + textwrap.indent("\n".join(lines), "    ")
    if documented:  # the section is written anew where it stood
        head, _, rest = doc.partition("\nArgs:\n")
        match = re.search(r"\n\n(?=\S)", rest)
        return f"{head}\n{section}{rest[match.start() :] if match else ''}"
    parts = doc.split("\n\n")
    insert_at = next((i for i, p in enumerate(parts) if re.match(r"(Example|Returns|Raises|Yields)", p)), len(parts))
    return "\n\n".join([*parts[:insert_at], section, *parts[insert_at:]])
