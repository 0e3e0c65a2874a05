"""Every setting is declared once, on a dataclass, and every flat signature agrees with it.

The typed callbacks and the ``inject_*`` functions take their settings as keywords; this checks, for each of them,
that every field of its config (and of the callback options) is a parameter with the field's default and
annotation and the field's doc, that LightningCLI's ``--trainer.callbacks.help`` lists each with that doc and type,
and that the registry holds one method per name, each named by its config where it is declared.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing

import docstring_parser
import pytest
import torch.nn as nn

import peft_callbacks
import peft_callbacks.callbacks
import peft_callbacks.engine.method as registry
from peft_callbacks import (
    AdaLoRACallback,
    AdaLoRAConfig,
    AdapterCallback,
    BottleneckConfig,
    IA3Callback,
    IA3Config,
    LoHaCallback,
    LoHaConfig,
    LoKrCallback,
    LoKrConfig,
    LoRACallback,
    LoRAConfig,
    OFTCallback,
    OFTConfig,
    PEFTCallback,
    PromptTuningCallback,
    PromptTuningConfig,
    VeRACallback,
    VeRAConfig,
    VisualPromptCallback,
    VisualPromptConfig,
    inject_adapters,
    inject_lora,
    inject_prompt_tuning,
    inject_visual_prompts,
)
from peft_callbacks.callbacks import CallbackOptions, LoRATrainingOptions
from peft_callbacks.cli import main
from peft_callbacks.engine import LayerConfig, LayerMethod, get_method, register_method, registered_methods
from peft_callbacks.engine.arguments import takes_settings
from peft_callbacks.methods.lora.corda import CorDAOptions
from peft_callbacks.methods.lora.eva import EVAOptions
from peft_callbacks.methods.lora.loftq import LoftQOptions
from peft_callbacks.methods.lora.loraga import LoRAGAOptions

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

# each typed callback: the settings dataclasses its arguments come from (CallbackOptions for all of them)
TYPED = {
    LoRACallback: (LoRAConfig, LoRATrainingOptions, EVAOptions, LoftQOptions, CorDAOptions, LoRAGAOptions),
    AdaLoRACallback: (AdaLoRAConfig,),
    IA3Callback: (IA3Config,),
    LoHaCallback: (LoHaConfig,),
    LoKrCallback: (LoKrConfig,),
    OFTCallback: (OFTConfig,),
    VeRACallback: (VeRAConfig,),
    AdapterCallback: (BottleneckConfig,),
    PromptTuningCallback: (PromptTuningConfig,),
    VisualPromptCallback: (VisualPromptConfig,),
}
INJECT = {
    inject_lora: LoRAConfig,
    inject_adapters: BottleneckConfig,
    inject_prompt_tuning: PromptTuningConfig,
    inject_visual_prompts: VisualPromptConfig,
}
INJECT_OWN = {"model", "adapter_name"}  # what an inject_* function takes besides its config's fields


def fields_of(*sources: type) -> dict[str, tuple[type, dataclasses.Field, typing.Any]]:
    """``{name: (dataclass, field, annotation)}`` of every field of ``sources``."""
    found = {}
    for source in sources:
        hints = typing.get_type_hints(source)
        for field in dataclasses.fields(source):
            assert field.name not in found, f"{field.name} is declared by {found[field.name][0]} and {source}"
            found[field.name] = (source, field, hints[field.name])
    return found


def default_of(field: dataclasses.Field) -> typing.Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default


def documented(source: type) -> dict[str, str]:
    """``{field: doc}`` from the ``Attributes`` of ``source`` and its bases, as docstring_parser reads them."""
    docs = {}
    for klass in reversed(source.__mro__):
        for param in docstring_parser.parse(klass.__dict__.get("__doc__") or "").params:
            docs[param.arg_name] = param.description
    return docs


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_every_method_of_the_package_has_a_typed_callback_and_every_typed_callback_is_listed():
    package = {get_method(n).config_class for n in registered_methods()}
    package = {c for c in package if c.__module__.startswith("peft_callbacks.")}
    assert {sources[0] for sources in TYPED.values()} == package
    exported = {
        c
        for c in vars(peft_callbacks.callbacks).values()
        if isinstance(c, type) and issubclass(c, PEFTCallback) and c is not PEFTCallback
    }
    assert exported == set(TYPED)


@pytest.mark.parametrize("callback", TYPED, ids=lambda c: c.__name__)
def test_a_typed_callback_takes_every_field_with_its_default_annotation_and_doc(callback):
    sources = (*TYPED[callback], CallbackOptions)
    fields = fields_of(*sources)
    parameters = {n: p for n, p in inspect.signature(callback).parameters.items()}
    assert set(parameters) == set(fields)
    docs = {name: text for source in sources for name, text in documented(source).items()}
    shown = {p.arg_name: p.description for p in docstring_parser.parse(callback.__doc__).params}
    for name, (source, field, annotation) in fields.items():
        parameter = parameters[name]
        assert parameter.default == default_of(field), f"{callback.__name__}({name}=...) default"
        assert parameter.annotation == annotation, f"{callback.__name__}({name}: ...) annotation"
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
        assert docs.get(name), f"{source.__name__}.{name} has no line in Attributes"
        assert squeeze(shown.get(name, "")) == squeeze(docs[name]), f"{callback.__name__} Args: {name}"
    built = callback()  # the defaults build the config and the options the dataclasses default to
    assert built.config == TYPED[callback][0]()
    options = CallbackOptions()
    assert (built.adapter_name, built.module, built.merge_on_train_end) == (
        options.adapter_name,
        options.module,
        options.merge_on_train_end,
    )
    assert (built.save_adapter_to, built.save_merged_to, built.merged_dtype) == (None, None, None)


@pytest.mark.parametrize("function", INJECT, ids=lambda f: f.__name__)
def test_an_inject_function_takes_every_field_of_its_config(function):
    config = INJECT[function]
    fields = fields_of(config)
    parameters = inspect.signature(function).parameters
    assert set(parameters) - INJECT_OWN == set(fields)
    docs = documented(config)
    shown = {p.arg_name: p.description for p in docstring_parser.parse(function.__doc__).params}
    for name, (_, field, annotation) in fields.items():
        assert parameters[name].default == default_of(field), f"{function.__name__}({name}=...) default"
        assert parameters[name].annotation == annotation, f"{function.__name__}({name}: ...) annotation"
        assert squeeze(shown[name]) == squeeze(docs[name]), f"{function.__name__} Args: {name}"
    assert set(shown) >= INJECT_OWN & set(parameters)  # its own arguments are documented too


def test_inject_lora_takes_rank_alpha_and_dropout_by_position_and_passes_every_value_on():
    net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), 3, 6.0, 0.25, target_modules=["0"])
    adapter = net[0].adapters["default"]
    assert (adapter.config.rank, adapter.config.alpha, adapter.config.dropout) == (3, 6.0, 0.25)
    with pytest.raises(TypeError, match="positional"):
        inject_lora(nn.Linear(4, 4), 3, 6.0, 0.25, ["0"])
    with pytest.raises(TypeError, match=r"inject_lora\(\) got an unexpected argument 'rnak'; did you mean 'rank'\?"):
        inject_lora(nn.Linear(4, 4), rnak=3)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
    """How to build.

    Attributes:
        depth: how many blocks.
        sizes: the width of each.
    """

    depth: int = 2
    sizes: list = dataclasses.field(default_factory=list)


def test_flat_arguments_build_the_dataclass_with_what_was_given_and_fresh_defaults():
    @takes_settings(Shape, positional=1)
    def build(model, shape: Shape, *, name: str = "net"):
        """Build."""
        return shape, name

    (first, name), (second, _) = build(None), build(None, 3, sizes=[4])
    assert (first, name) == (Shape(), "net") and second == Shape(depth=3, sizes=[4])
    assert build(None)[0].sizes is not first.sizes  # a default_factory runs for each call
    assert str(inspect.signature(build)) == "(model, depth: int = 2, *, sizes: list = [], name: str = 'net')"
    with pytest.raises(TypeError, match="positional"):
        build(None, 3, [4])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Deeper:
    depth: int = 4


def test_a_setting_declared_twice_or_a_missing_slot_is_refused():
    with pytest.raises(TypeError, match=r"`depth` is declared by both Shape and Deeper: declare it once"):

        @takes_settings(Shape, Deeper)
        def twice(shape: Shape, deeper: Deeper) -> None: ...

    with pytest.raises(TypeError, match=r"must declare one parameter annotated with each of \['Deeper'\]"):

        @takes_settings(Shape, Deeper)
        def slotless(shape: Shape) -> None: ...


# -- LightningCLI sees every argument, typed and documented -----------------------------------------------------------
def callback_help(name: str, capsys) -> dict[str, str]:
    """``{argument: its help block}`` of ``--trainer.callbacks.help=peft_callbacks.<name>``, run in-process."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--trainer.callbacks=peft_callbacks.{name}", f"--trainer.callbacks.help=peft_callbacks.{name}"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    blocks = re.split(r"\n  --trainer\.callbacks\.", text.split("Help for", 1)[1])[1:]
    return {block.split()[0]: block for block in blocks}


def type_names(annotation: typing.Any) -> set[str]:
    """The names a help line must show for ``annotation``: each type in it, each ``Literal`` value, and ``null``
    (jsonargparse writes ``X | None`` as ``Optional[X]``, ``Union[X, Y, null]`` or ``X | null``)."""
    if annotation is type(None):
        return {"null|Optional["}
    if annotation is typing.Any:
        return {"Any"}
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return {repr(a) for a in args}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(type_names(a) for a in args))
    origin = typing.get_origin(annotation) or annotation
    return {origin.__name__}.union(*(type_names(a) for a in args))


@pytest.mark.parametrize("callback", TYPED, ids=lambda c: c.__name__)
def test_callbacks_help_lists_every_argument_with_its_doc_and_type(callback, capsys):
    sources = (*TYPED[callback], CallbackOptions)
    shown = callback_help(callback.__name__, capsys)
    docs = {name: text for source in sources for name, text in documented(source).items()}
    for name, (_, _, annotation) in fields_of(*sources).items():
        assert name in shown, f"--trainer.callbacks.help={callback.__name__} does not list {name}"
        block = shown[name]
        assert squeeze(docs[name]) in squeeze(block), f"{callback.__name__} help for {name}:\n{block}"
        typed = re.search(r"\(type:\s+(.*),\s+default:\s", block, re.S)
        assert typed, f"{callback.__name__} help for {name} shows no type:\n{block}"
        written = squeeze(typed.group(1))
        missing = {t for t in type_names(annotation) if not any(a in written for a in t.split("|"))}
        assert not missing, f"{callback.__name__} help for {name} shows type {typed.group(1)!r}, lacking {missing}"


# -- the registry ------------------------------------------------------------------------------------------------------
@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tiny(LayerConfig, method="tiny"):
    """A config that names its method where it is declared."""


class TinyMethod(LayerMethod):
    name, title, config_class = "tiny", "Tiny", Tiny


def test_a_config_names_its_method_where_it_is_declared(scratch_registry):
    assert LoRAConfig.method == "lora" and Tiny.method == "tiny" and LayerConfig.method == ""
    register_method(TinyMethod())
    assert get_method(Tiny()) is registry._METHODS["tiny"]

    class Mislabelled(TinyMethod):
        name = "tiny2"

    with pytest.raises(ValueError, match=r"named 'tiny2', but its config class Tiny names method 'tiny'"):
        register_method(Mislabelled())
    with pytest.raises(ValueError, match=r"`method` must be a method's name"):

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Nameless(LayerConfig, method=""):
            pass


def test_a_second_method_under_a_taken_name_is_refused_and_the_same_one_replaces(scratch_registry):
    class AnotherLoRA(LayerMethod):
        name, title, config_class = "lora", "Another LoRA", LoRAConfig

    with pytest.raises(ValueError) as refused:
        register_method(AnotherLoRA())
    message = str(refused.value)
    assert "'lora'" in message and "LoRAMethod" in message and "AnotherLoRA" in message
    assert type(get_method("lora")).__name__ == "LoRAMethod"  # the first one stays

    first = register_method(TinyMethod())
    again = register_method(TinyMethod())  # the same class again (a module imported twice): it replaces
    assert get_method("tiny") is again and again is not first
