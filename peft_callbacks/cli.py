"""Command line: Lightning's own ``LightningCLI``, so every callback of this package is configurable from YAML.

::

    python -m peft_callbacks.cli fit --config examples/configs/digits_lora.yaml
    python -m peft_callbacks.cli fit --config examples/configs/digits_lora.yaml --print_config
    python -m peft_callbacks.cli fit --help

Model and data are given by ``class_path`` (any LightningModule / LightningDataModule, e.g. the ones in
:mod:`peft_callbacks.demo` or your own); callbacks go under ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: peft_callbacks.LoRACallback
          init_args: {rank: 8, alpha: 16}

jsonargparse checks every ``init_args`` entry against the callback's typed ``__init__`` before anything runs; a
bad one ends the output with the line to read, e.g. ``error: Option 'rnak' is not accepted by
peft_callbacks.LoRACallback; did you mean 'rank'?``.
After ``fit``, the final weights — LoRA already merged, so a plain model — are written to
``<log_dir>/final_model.safetensors`` (``--final_weights`` changes the name, ``--final_weights null`` turns it off).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import sys
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from peft_callbacks.engine import MethodConfig
from peft_callbacks.io.weights import save_state_dict

log = logging.getLogger(__name__)


def _accept_method_configs() -> None:
    """``PEFTCallback(config=...)`` takes any method's config (``LoRAConfig``, ``IA3Config``, …), all subclasses of
    the ``MethodConfig`` dataclass; recent jsonargparse accepts only a dataclass itself unless told otherwise."""
    try:
        from jsonargparse import set_parsing_settings

        set_parsing_settings(subclasses_enabled=[MethodConfig])
    except (ImportError, TypeError):  # an older jsonargparse without the setting
        pass


_accept_method_configs()

PROG = "python -m peft_callbacks.cli"


class PEFTArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose parse errors end with the one line a user needs.

    jsonargparse reports an unknown or ill-typed ``init_args`` entry inside a long message about every type it tried,
    after a usage block of some fifty lines. This parser prints that message, a tip, and last the line that matters,
    with the closest valid name for an unknown one: ``error: Option 'rnak' is not accepted by
    peft_callbacks.LoRACallback; did you mean 'rank'?``. Errors it cannot read are reported as jsonargparse does.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        last = error_line(message, parser)
        if last is None or not self.exit_on_error or _jsonargparse_debug():
            super().error(message, ex)  # exits, or raises where jsonargparse is told to
        self.logger.error(message)
        detail = f"{message}\n" if "\n" in message.strip() else ""
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{detail}tip: For details of accepted options run: {prog} --help\n")
        self.exit(2, f"error: {last}\n")


class PEFTCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule/LightningDataModule given by ``class_path``, saving final weights.

    Example::

        >>> cli = PEFTCLI(
        ...     args=["--model=peft_callbacks.demo.ImageClassifier", "--model.num_classes=5",
        ...           "--data=peft_callbacks.demo.DigitsDataModule", "--trainer.logger=false",
        ...           "--trainer.callbacks+=peft_callbacks.LoRACallback", "--trainer.callbacks.rank=2"],
        ...     run=False,
        ... )
        >>> [(type(c).__name__, c.rank) for c in cli.trainer.callbacks if hasattr(c, "rank")]
        [('LoRACallback', 2)]
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", PEFTArgumentParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--final_weights",
            type=str | None,
            default="final_model.safetensors",
            help="after fit, save the LightningModule's weights here (relative to the log dir); null: do not save",
        )

    def after_fit(self) -> None:
        name = self.config[self.subcommand].get("final_weights")
        if not name or not self.trainer.is_global_zero:
            return
        path = save_state_dict(self.model, os.path.join(self.trainer.log_dir or self.trainer.default_root_dir, name))
        rank_zero_info(f"Final weights: {path}")


_OWN_MESSAGE = re.compile(r"^\s*(?:- )?(`\w+`[^\n]*)$", re.MULTILINE)


def argument_error(err: BaseException) -> str | None:
    r"""The message of a callback's own argument check inside a LightningCLI error, if there is one.

    jsonargparse reports a failed ``init_args`` check inside a long message about every type it tried; the line that
    names the argument is the one a user needs.

    Example::

        >>> argument_error(ValueError("Does not validate\n  Errors:\n    - `rank` must be an int >= 1, got 0.\n"))
        '`rank` must be an int >= 1, got 0.'
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        found = _OWN_MESSAGE.search(str(err))
        if found:
            return found.group(1).strip()
        err = err.__cause__ or err.__context__
    return None


_CLASS_PROBLEM = "Problem with given class_path '"
_UNKNOWN = re.compile(r"^Option '([^']+)' is not accepted$")
_UNKNOWN_KEY = re.compile(
    r"^(Subcommand '\w+' does not accept option|Group '[\w.]+' does not accept option) '([^']+)'$"
)
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (--[\w.]+)(=\S*)?$")


def error_line(message: str, parser=None) -> str | None:
    r"""The one line of a jsonargparse error a user needs, with the closest valid name for an unknown one; ``None``
    where the message holds no such line. ``parser`` gives the valid option names of the command line itself.

    Example::

        >>> error_line(
        ...     "Parser key \"trainer.callbacks\":\n  Errors:\n"
        ...     "    - Problem with given class_path 'peft_callbacks.LoRACallback':\n"
        ...     "        Option 'rnak' is not accepted\n"
        ...     "    - Problem with given class_path 'lightning.Callback':\n"
        ...     "        Option 'rnak' is not accepted\n"
        ... )
        "Option 'rnak' is not accepted by peft_callbacks.LoRACallback; did you mean 'rank'?"
    """
    problem = _first_class_problem(message)
    if problem is not None:
        class_path, reason = problem
        unknown = _UNKNOWN.match(reason)
        if unknown is None:
            return f"{class_path}: {reason}"
        return f"{reason} by {class_path}{_did_you_mean(unknown.group(1), _init_arguments(class_path))}"
    line = message.strip()
    known = _parser_keys(parser) if parser is not None else []
    found = _UNKNOWN_KEY.match(line)
    if found:
        return f"{line}{_did_you_mean(found.group(2), known)}"
    found = _UNRECOGNIZED.match(line)
    if found:
        return f"{line}{_did_you_mean(found.group(1), [f'--{k}' for k in known])}"
    return None


def _first_class_problem(message: str) -> tuple[str, str] | None:
    """``(class_path, reason)`` of the first class jsonargparse could not build (the one the user named; those after
    it are base classes it tried), looking inside nested ones."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        at = line.find(_CLASS_PROBLEM)
        if at < 0:
            continue
        class_path = line[at + len(_CLASS_PROBLEM) :].split("'")[0]
        indent = len(line) - len(line.lstrip(" -"))
        block = []
        for inner in lines[i + 1 :]:
            if inner.strip() and len(inner) - len(inner.lstrip(" ")) <= indent - 2:
                break
            block.append(inner)
        nested = _first_class_problem("\n".join(block))
        return nested or (class_path, " ".join(b.strip() for b in block if b.strip()))
    return None


def _init_arguments(class_path: str) -> list[str]:
    """The ``__init__`` argument names of a class given by its import path (through ``**kwargs`` to its bases); only
    from a module jsonargparse has already imported (nothing else is imported for a hint)."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    names: list[str] = []
    for klass in inspect.getmro(cls) if isinstance(cls, type) else []:
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def _parser_keys(parser) -> list[str]:
    return [a.dest for a in getattr(parser, "_actions", []) if isinstance(a.dest, str) and a.dest != "help"]


def _did_you_mean(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _jsonargparse_debug() -> bool:
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() in ("1", "true", "yes", "on")


def main(args: list[str] | None = None) -> PEFTCLI:
    """Run the command line (``args`` default to ``sys.argv[1:]``) as ``python -m peft_callbacks.cli``."""
    return PEFTCLI(args=args, parser_kwargs={"prog": PROG})


def command_line() -> None:
    """``python -m peft_callbacks.cli``: :func:`main`, with a bad argument reported as the last, clear line."""
    try:
        main()
    except (ValueError, TypeError) as err:
        message = argument_error(err)
        if message is None:
            raise
        sys.stderr.write(f"{err}\n\n")
        sys.exit(f"error: {message}")


if __name__ == "__main__":
    command_line()
