"""Lightning checkpoints written during a PEFT fit that load like the user's own, and the loader for the others.

While a PEFT callback fits a LightningModule, the module's ``on_save_checkpoint`` gets a layer through the
:mod:`~peft_callbacks.plumbing.seam` (after the module's own hook) that rewrites each checkpoint as
:mod:`peft_callbacks.io.checkpoint` describes: for mergeable methods the ``state_dict`` is the plain model
(``MyModule.load_from_checkpoint(path)`` works in a process that never imports peft_callbacks), and what resuming
needs sits beside it. It runs for full and ``weights_only`` checkpoints alike, on every rank (only rank zero writes
under DDP); sharded strategies (FSDP, DeepSpeed, model parallel) keep their own layout. Model objects in the saved
hyper-parameters are replaced by plain copies. Once the fit is over the layer is gone; a full checkpoint saved later
(``trainer.save_checkpoint``) of a module that still carries surgery is rewritten by the PEFT callback's own
``on_save_checkpoint`` instead (:func:`write_outside_fit`).

Checkpoints a plain load cannot rebuild (bottleneck adapters, prompts, slim checkpoints) load with
:func:`load_checkpoint`, which replays the surgery recorded in the checkpoint on the module first.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn

from peft_callbacks._validation import check_bool
from peft_callbacks.core import quantized
from peft_callbacks.core.modules import PEFTModule, modules_at
from peft_callbacks.core.recipe import surgery_records
from peft_callbacks.engine import DEFAULT_ADAPTER, AdaptedLayer, get_method, merge, replay
from peft_callbacks.engine.usage import drop_adapters
from peft_callbacks.io.checkpoint import (
    CheckpointLayoutError,
    check_recipes,
    check_replay,
    read_record,
    restore_adapted_layout,
    stored_tensors,
    strip_loader_key,
    write_plain_layout,
)
from peft_callbacks.io.plain_copy import plain_hyperparameters
from peft_callbacks.io.slim import SLIM_CHECKPOINT_KEY as SLIM_KEY
from peft_callbacks.io.slim import fill_slim_state_dict
from peft_callbacks.plumbing import seam

__all__ = [
    "install_checkpoint_hook",
    "load_checkpoint",
    "restore_checkpoint",
    "write_outside_fit",
]

log = logging.getLogger(__name__)

_HOOK, _LAYOUT = "on_save_checkpoint", "plain checkpoint layout"
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
_LOADING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("peft_callbacks_loading", default=None)
_PATCH_LOCK = threading.Lock()


def _sharded(pl_module: pl.LightningModule, state: dict[str, Any]) -> bool:
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is not None and type(trainer.strategy).__name__ in _SHARDED:
        return True
    return any(type(t).__name__ == "DTensor" for t in state.values())


def write_checkpoint_layout(pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Rewrite a checkpoint of ``pl_module`` (see the module docstring); sharded checkpoints are left alone."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or _sharded(pl_module, state):
        return
    record = write_plain_layout(pl_module, checkpoint, keep_adapted=SLIM_KEY in checkpoint)
    fold = record is None or record["layout"] == "merged"
    replaced = plain_hyperparameters(pl_module, checkpoint, fold=fold, key=pl_module.CHECKPOINT_HYPER_PARAMS_KEY)
    if replaced:
        log.debug("Saved plain copies of the hyper-parameters %s (they held PEFT modules).", replaced)


def install_checkpoint_hook(pl_module: pl.LightningModule, *, owner: Any) -> None:
    """Rewrite every checkpoint of ``pl_module`` right after its own ``on_save_checkpoint`` (once, however many
    callbacks ask), until ``owner``'s :func:`~peft_callbacks.plumbing.seam.undo`.

    Example::

        >>> import lightning as L
        >>> class Owner:
        ...     pass
        >>> module, owner = L.LightningModule(), Owner()
        >>> install_checkpoint_hook(module, owner=owner)
        >>> seam.patches(module)
        {'on_save_checkpoint': ['plain checkpoint layout (Owner)']}
        >>> seam.undo(owner)
        >>> "on_save_checkpoint" in vars(module)
        False
    """

    def after(result: Any, checkpoint: dict[str, Any]) -> Any:
        write_checkpoint_layout(pl_module, checkpoint)
        return result

    seam.wrap_method(pl_module, _HOOK, owner=owner, key=_LAYOUT, after=after)


def write_outside_fit(trainer: pl.Trainer, caller: Any, checkpoint: dict[str, Any]) -> None:
    """A full checkpoint saved outside a PEFT fit (``trainer.save_checkpoint`` after it), of a module that still
    carries surgery: rewrite it as during the fit. Called from the ``on_save_checkpoint`` of the callbacks that shape
    checkpoints (``writes_plain_checkpoints``: the PEFT callbacks; ``SlimCheckpoint``); the last of them in
    ``trainer.callbacks`` writes, once the others are done. During a fit the module's hook writes instead."""
    pl_module = trainer.lightning_module
    if pl_module is None or seam.is_wrapped(pl_module, _HOOK, _LAYOUT):
        return
    shaping = [c for c in trainer.callbacks if hasattr(c, "writes_plain_checkpoints")]
    if not shaping or shaping[-1] is not caller or not any(c.writes_plain_checkpoints for c in shaping):
        return
    if any(isinstance(m, PEFTModule) for m in pl_module.modules()):
        write_checkpoint_layout(pl_module, checkpoint)


# -- loading ----------------------------------------------------------------------------------------------------------
def _recipes_from_callbacks(checkpoint: dict[str, Any]) -> dict[str, list]:
    """Recipes of checkpoints written before the record existed: the PEFT callbacks' states hold them."""
    recipes: dict[str, list] = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        for path, records in (state.get("recipes") or {}).items() if isinstance(state, dict) else ():
            if isinstance(records, list) and len(records) > len(recipes.get(path, [])):
                recipes[path] = records
    check_recipes(recipes)
    return recipes


def replay_missing(module: nn.Module, recipes: dict[str, list], stored: dict[str, torch.Tensor] | None) -> list[str]:
    """Replay the recorded surgeries ``module`` does not carry, e.g. an adapter trained in an earlier fit that this
    run did not re-create. On a module that carries some surgery already, what trains and what is active stay as
    they were, and the re-created adapters are frozen. Return the names of the adapters replayed.

    What the replays would create is checked first against the checkpoint's tensors ``stored``
    (:func:`~peft_callbacks.io.checkpoint.check_replay`), before anything is allocated."""
    modules = modules_at(
        module,
        recipes,
        lambda missing: CheckpointLayoutError(
            f"The checkpoint's surgery was recorded on {missing[0] or '<root>'!r}, which {type(module).__name__} does "
            f"not have; build the module as for training."
        ),
    )
    carried = any(surgery_records(modules[path]) for path in recipes)
    flags = [(p, p.requires_grad) for p in module.parameters()]
    active = {id(m): list(m.active_adapters) for m in module.modules() if isinstance(m, AdaptedLayer)}
    plans = {}
    for path, records in recipes.items():
        present = {(r["method"], r.get("adapter_name", DEFAULT_ADAPTER)) for r in surgery_records(modules[path])}
        todo = [r for r in records if (r["method"], r.get("adapter_name", DEFAULT_ADAPTER)) not in present]
        if todo:
            plans[path] = todo
    check_replay(module, plans, stored)
    added = []
    for path, todo in plans.items():
        replay(modules[path], todo)
        added.extend(r.get("adapter_name", DEFAULT_ADAPTER) for r in todo)
    if added and carried:
        before = {id(p) for p, _ in flags}
        for p, flag in flags:
            p.requires_grad_(flag)
        for p in module.parameters():
            if id(p) not in before:
                p.requires_grad_(False)
        for m in module.modules():
            if isinstance(m, AdaptedLayer) and id(m) in active:
                m.active_adapters = active[id(m)]
    return list(dict.fromkeys(added))


def drop_as_recorded(module: nn.Module, recipes: dict[str, list]) -> list[str]:
    """Leave out again the adapters the run that wrote the checkpoint dropped from layers its model never called (the
    records' ``"dropped"`` paths, see :mod:`peft_callbacks.engine.usage`), so that the module as re-adapted at setup
    fits the checkpoint's tensors and optimizer state. Return the paths dropped."""
    dropped = []
    for path, records in recipes.items():
        for record in records if isinstance(records, list) else ():
            paths = record.get("dropped") if isinstance(record, dict) else None
            if paths is None:
                continue
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise CheckpointLayoutError(f"A surgery record's 'dropped' must be a list of paths, got {paths!r}.")
            full = [f"{path}.{p}" if path else p for p in paths]
            dropped += drop_adapters(module, full, record.get("adapter_name", DEFAULT_ADAPTER))
    if dropped:
        log.info("Left out adapter(s) of %s again: the checkpoint's run found the model never calls them.", dropped)
    return dropped


def restore_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """The load-time half of :func:`write_checkpoint_layout`, for a module that carries the surgery again
    (resuming, testing): adapters of earlier fits re-created, the adapted layout restored."""
    record = read_record(checkpoint)
    if record is not None and any(isinstance(m, PEFTModule) for m in pl_module.modules()):
        drop_as_recorded(pl_module, record["recipes"])
        added = replay_missing(pl_module, record["recipes"], stored_tensors(checkpoint))
        if added:
            log.info("Re-created adapter(s) %s from the checkpoint's recipe (frozen, as when it was written).", added)
    if isinstance(checkpoint.get("state_dict"), dict):  # sharded strategies load the model state themselves
        restore_adapted_layout(pl_module, checkpoint)
        restore_quantized_state(pl_module, checkpoint["state_dict"])


def restore_quantized_state(module: nn.Module, state: dict[str, Any]) -> None:
    """Make a checkpoint's quantized layers load into ``module``: the 4-bit statistics (which their own
    ``load_state_dict`` refuses as unexpected keys) loaded and removed from ``state``, the 8-bit scales given a place
    to load into (:func:`peft_callbacks.core.quantized.load_quantized_states`)."""
    if quantized.holds_quantized(module):
        loaded = quantized.load_quantized_states(module, state)
        if loaded:
            log.debug("Loaded the 4-bit statistics of %d layer(s) from the checkpoint.", len(loaded))


def prepare_module(module: nn.Module, checkpoint: dict[str, Any], merged: bool) -> list[str]:
    """Make ``module`` (as built) fit ``checkpoint["state_dict"]``: replay the recorded surgery, refill a slim
    checkpoint's base, restore the adapted layout. Return the mergeable methods to fold once the state is loaded."""
    state = checkpoint["state_dict"]
    record = read_record(checkpoint)
    recipes = record["recipes"] if record is not None else _recipes_from_callbacks(checkpoint)
    if not recipes or (record is not None and record["layout"] == "merged" and merged):
        strip_loader_key(state)
        return []
    replay_missing(module, recipes, stored_tensors(checkpoint))
    if SLIM_KEY in checkpoint:
        fill_slim_state_dict(module, state, checkpoint[SLIM_KEY])
    restore_adapted_layout(module, checkpoint)
    restore_quantized_state(module, state)
    methods = {r["method"] for records in recipes.values() for r in records}
    return sorted(m for m in methods if merged and get_method(m).mergeable)


@contextlib.contextmanager
def _preparing(module_class: type, merged: bool) -> Iterator[dict]:
    """Within the block, ``module_class.on_load_checkpoint`` also prepares the instance being loaded (this thread)."""
    inherited = module_class.on_load_checkpoint
    outcome: dict[str, Any] = {"merge": [], "merged": merged}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        inherited(self, checkpoint)
        loading = _LOADING.get()
        if loading is not None and "module" not in loading:
            loading["module"] = self
            loading["merge"] = prepare_module(self, checkpoint, loading["merged"])

    with _PATCH_LOCK, seam.temporarily(module_class, "on_load_checkpoint", on_load_checkpoint):
        token = _LOADING.set(outcome)
        try:
            yield outcome
        finally:
            _LOADING.reset(token)


def _check_map_location(value: Any) -> None:
    """``torch.load``'s ``map_location``: None, a device (name), a dict of device names or a callable."""
    if value is None or callable(value) or isinstance(value, (torch.device, dict)):
        return
    if isinstance(value, str):
        try:
            torch.device(value)
            return
        except RuntimeError:
            pass
    raise ValueError(
        f"`map_location` must be None, a device such as 'cpu' or 'cuda:0', a dict or a callable (as for torch.load), "
        f"got {value!r}."
    )


def load_checkpoint(
    module: type[pl.LightningModule] | pl.LightningModule,
    checkpoint_path: str | Path,
    *,
    merged: bool = True,
    map_location: Any = None,
    strict: bool | None = None,
    weights_only: bool = True,
    **kwargs: Any,
) -> pl.LightningModule:
    """Load a checkpoint written during a PEFT fit, for every method: what to use when a plain
    ``MyModule.load_from_checkpoint(path)`` cannot rebuild the model (bottleneck adapters, prompts, slim checkpoints).

    The module is built as for training, the surgery recorded in the checkpoint is replayed on it, a slim
    checkpoint's base is taken from it, and the state is loaded. Checkpoints of mergeable methods load with a plain
    ``load_from_checkpoint`` too; here they can also come back with their adapters (``merged=False``).

    Args:
        module: a LightningModule class (built from the checkpoint's hyper-parameters, ``kwargs`` overriding them,
            exactly as ``load_from_checkpoint`` does) or an instance built as for training.
        checkpoint_path: the checkpoint file.
        merged: fold mergeable adapters (LoRA, IA3, …) into the weights, as a plain load does; ``False`` keeps
            every adapter as during training (to switch adapters, or to train on).
        map_location: as for ``torch.load``.
        strict: as for ``load_state_dict``; ``None`` follows the module's ``strict_loading``.
        weights_only: ``True`` (the default, also for URLs, where Lightning would otherwise switch to ``False``):
            the file is read as plain data and tensors, nothing in it is unpickled or run. Pass ``False`` only for a
            file you trust that holds other Python objects (e.g. models in its hyper-parameters); ``None`` means
            ``True``.
        **kwargs: hyper-parameters overriding the saved ones (with a class).

    Returns:
        The loaded module, in training mode as Lightning leaves it.

    Raises:
        CheckpointLayoutError: the checkpoint's surgery does not fit the module (another module, or a newer
            checkpoint format).

    Example::

        >>> import lightning as L, os, tempfile, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from peft_callbacks import AdapterCallback
        >>> class Net(L.LightningModule):
        ...     def __init__(self, width=8):
        ...         super().__init__()
        ...         self.save_hyperparameters()
        ...         torch.manual_seed(0)
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 2))
        ...     def training_step(self, batch, batch_idx):
        ...         return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.5)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[AdapterCallback(bottleneck=2, modules=["net.0"])],
        ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trained = Net()
        >>> trainer.fit(trained, data)
        >>> path = os.path.join(tempfile.mkdtemp(), "adapters.ckpt")
        >>> trainer.save_checkpoint(path)
        >>> Net.load_from_checkpoint(path, weights_only=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: Error(s) in loading state_dict for Net:
        ...Unexpected key(s) in state_dict: "(load this checkpoint with peft_callbacks.load_checkpoint(Net, path))"...
        >>> loaded = load_checkpoint(Net, path)
        >>> x = torch.randn(3, 4)
        >>> torch.equal(loaded.net(x), trained.net(x))
        True
    """
    check_bool("merged", merged)
    if strict is not None:
        check_bool("strict", strict)
    weights_only = True if weights_only is None else check_bool("weights_only", weights_only)  # never Lightning's None
    _check_map_location(map_location)
    if isinstance(module, type) and issubclass(module, pl.LightningModule):
        with _preparing(module, merged) as outcome:
            loaded = module.load_from_checkpoint(
                checkpoint_path, map_location=map_location, strict=strict, weights_only=weights_only, **kwargs
            )
    elif isinstance(module, pl.LightningModule):
        if not isinstance(checkpoint_path, (str, Path)) or not str(checkpoint_path):
            raise TypeError(f"`checkpoint_path` must be a file path, got {type(checkpoint_path).__name__}.")
        if not Path(checkpoint_path).is_file():
            raise FileNotFoundError(f"`checkpoint_path`: no checkpoint file at {str(checkpoint_path)!r}.")
        checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=weights_only)
        module.on_load_checkpoint(checkpoint)
        outcome = {"merge": prepare_module(module, checkpoint, merged)}
        module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading if strict is None else strict)
        loaded = module
    else:
        raise TypeError(
            f"`module` must be a LightningModule class or instance, got {type(module).__name__} {module!r}."
        )
    for method in outcome["merge"]:
        merge(loaded, method=method)
    return loaded
