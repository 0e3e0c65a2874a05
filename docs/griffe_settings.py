"""Griffe extension for the API pages: show the flat signatures that ``takes_settings`` derives.

Griffe reads the source, where ``inject_lora`` is written against its settings dataclass
(``inject_lora(model, config: LoRAConfig, *, adapter_name)``) and a typed callback has no ``__init__`` of its own. For
every function or class decorated with ``takes_settings`` or ``typed_callback``, this extension takes the signature and
docstring from the imported object instead: every setting as a parameter, its annotation as written on the dataclass
field, its default, and the ``Args`` entry taken from the dataclass's ``Attributes``. Everything else stays as griffe's
static analysis reads it.
"""

from __future__ import annotations

import inspect
from typing import Any

import griffe

DECORATORS = ("takes_settings", "typed_callback")
KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


class SettingsSignatures(griffe.Extension):
    """Replace the static signature and docstring of each settings-taking object by its runtime ones."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for obj in list(_objects(pkg)):
            if any(d.callable_path.rpartition(".")[2] in DECORATORS for d in obj.decorators):
                _use_runtime_signature(obj, loader)


def _objects(module: griffe.Object):
    for member in module.members.values():
        if member.is_alias:
            continue
        if member.is_function or member.is_class:
            yield member
        if member.is_module or member.is_class:
            yield from _objects(member)


def _use_runtime_signature(obj: griffe.Object, loader: griffe.GriffeLoader) -> None:
    runtime = griffe.dynamic_import(obj.path)
    flat = runtime.__init__ if obj.is_class else runtime
    sources = getattr(flat, "__settings__", ())
    signature = inspect.signature(flat)
    parameters = griffe.Parameters(
        *[_parameter(p, sources, obj, loader) for p in signature.parameters.values() if p.name != "self"]
    )
    written = obj.docstring  # how the static docstring is parsed (the handler's docstring_style)
    docstring = griffe.Docstring(
        inspect.cleandoc(runtime.__doc__ or ""),
        lineno=written.lineno if written else obj.lineno,
        parent=obj,
        parser=written.parser if written else None,
        parser_options=written.parser_options if written else None,
    )
    if obj.is_class:
        init = griffe.Function("__init__", parameters=parameters, lineno=obj.lineno, parent=obj)
        init.parameters = griffe.Parameters(griffe.Parameter("self"), *parameters)
        obj.set_member("__init__", init)
    else:
        obj.parameters = parameters
    obj.docstring = docstring


def _parameter(
    parameter: inspect.Parameter, sources: tuple[type, ...], obj: griffe.Object, loader: griffe.GriffeLoader
) -> griffe.Parameter:
    default = None if parameter.default is inspect.Parameter.empty else repr(parameter.default)
    annotation = _field_annotation(parameter.name, sources, loader) or _written(parameter.annotation, obj)
    return griffe.Parameter(parameter.name, annotation=annotation, kind=KINDS[parameter.kind], default=default)


def _field_annotation(name: str, sources: tuple[type, ...], loader: griffe.GriffeLoader) -> Any:
    """The annotation as written on the dataclass field that declares ``name`` (a griffe expression)."""
    for source in sources:
        for klass in source.__mro__:
            if name in klass.__dict__.get("__annotations__", {}):
                try:
                    return loader.modules_collection[f"{klass.__module__}.{klass.__qualname__}.{name}"].annotation
                except (KeyError, griffe.AliasResolutionError):
                    return None
    return None


def _written(annotation: Any, obj: griffe.Object) -> str | None:
    """A parameter the callable declares itself (``model``, ``config``): its annotation's name."""
    if annotation is inspect.Parameter.empty:
        return None
    return getattr(annotation, "__name__", None) or repr(annotation)
