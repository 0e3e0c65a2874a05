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

jsonargparse checks every ``init_args`` entry against the callback's typed ``__init__`` before anything runs.
After ``fit``, the final weights — LoRA already merged, so a plain model — are written to
``<log_dir>/final_model.safetensors`` (``--final_weights`` changes the name, ``--final_weights null`` turns it off).
"""

from __future__ import annotations

import logging
import os
import re
import sys

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from peft_callbacks.io.weights import save_state_dict

log = logging.getLogger(__name__)


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


def main(args: list[str] | None = None) -> PEFTCLI:
    """Run the command line (``args`` default to ``sys.argv[1:]``)."""
    return PEFTCLI(args=args)


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
