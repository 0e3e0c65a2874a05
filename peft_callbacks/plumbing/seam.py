"""The one seam between the library and the Lightning objects it does not own.

A few things the callbacks do must happen *inside* a call Lightning makes on someone else's object: surgery right
after the LightningModule's ``configure_model``, a checkpoint rewritten right after its ``on_save_checkpoint``, a loss
term added to what its ``training_step`` returns, a slim checkpoint read in the strategy's ``load_checkpoint``. Every
such change goes through this module, and nowhere else:

* :func:`wrap_method` gives ``target.<name>`` an instance-level wrapper (once per object and name, however many
  callbacks ask) that runs each *layer* around what was there before: the ``before`` parts, then the first ``instead``
  that returns something (else the object's own method), then the ``after`` parts, which may change the result.
  :func:`run_after` is the common case: an action right after the next call, once.
* :func:`replace` sets a plain attribute (through its property, if it has one); :func:`temporarily` does so for the
  duration of a ``with`` block.
* :func:`undo` takes away what one owner (a callback) added, :func:`undo_all` everything on a trainer's objects. The
  callbacks call :func:`undo` from ``teardown`` and ``on_exception``: after ``fit``, ``validate``, ``test`` or
  ``predict``, finished or failed, the objects are as they were, including an instance-level override someone else
  had installed before (it is what the wrapper called, and it is put back).

The wrapper is an object of this module, not a closure, and a copy of the object (``copy.deepcopy``, pickling) gets
what was there before instead of it, so a patched module still pickles; the layers live in the wrapper, so two
trainers or modules at once never share one. What the library patches, and why:

===========================  ============================  =========================================================
object                       attribute                     why (who)
===========================  ============================  =========================================================
LightningModule              ``configure_model``           surgery once the network exists, freezing after every
                                                           other surgery (surgery callbacks; once)
precision plugin             ``convert_module``            surgery after bitsandbytes replaced the layers (once)
LightningModule              ``on_load_checkpoint``        re-create adapters, refill a slim checkpoint's base and
                                                           restore the adapted layout before the state loads (once)
LightningModule              ``on_save_checkpoint``        checkpoints in the plain layout while fitting (PEFT)
LightningModule              ``training_step``             forgetting terms added to the loss (replay, LwF, EWC, L2-SP)
strategy                     ``load_checkpoint``           freezing param groups put back before a late restore;
                                                           slim checkpoints of another strategy's layout
strategy                     ``checkpoint_io``             atomic checkpoint files (SlimCheckpoint)
the user's module class      ``on_load_checkpoint``        :func:`~peft_callbacks.load_checkpoint` outside a Trainer
                                                           (only within the call, see :func:`temporarily`)
LightningModule              ``log``, ``log_dict``         no-ops while LoRA-GA runs ``training_step`` at ``setup``
                                                           for its gradient (only within it, :func:`temporarily`)
===========================  ============================  =========================================================

Example::

    >>> class Module:
    ...     def step(self, x):
    ...         return x + 1
    >>> class Owner:  # a callback, in the library
    ...     pass
    >>> module, owner = Module(), Owner()
    >>> wrap_method(module, "step", owner=owner, after=lambda result, x: 10 * result)
    >>> module.step(1), sorted(patches(module))
    (20, ['step'])
    >>> undo(owner)
    >>> module.step(1), vars(module)
    (2, {})
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["is_wrapped", "patches", "replace", "run_after", "temporarily", "undo", "undo_all", "unwrap", "wrap_method"]

log = logging.getLogger(__name__)

_ABSENT = object()
# owner -> the objects it patched (both weak: the seam keeps nothing alive)
_OWNED: weakref.WeakKeyDictionary[Any, weakref.WeakSet] = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class _Layer:
    """One owner's part of a wrapped method (several owners may share a layer with the same ``key``)."""

    owners: list[Any]
    key: str | None
    before: Callable[..., None] | None
    instead: Callable[..., Any] | None
    after: Callable[..., Any] | None
    once: bool


@dataclass(eq=False)
class _Replaced:
    """An attribute :func:`replace` set: the value there before, to put back."""

    owners: list[Any]
    value: Any
    previous: Any  # _ABSENT: nothing of the object's own
    via_property: bool


# replaced attributes, per object; the values (checkpoint IO objects, functions) do not refer to the object
_REPLACED: weakref.WeakKeyDictionary[Any, dict[str, _Replaced]] = weakref.WeakKeyDictionary()


class _Wrapped:
    """What ``target.<name>`` is while the seam wraps it (see the module docstring)."""

    def __init__(self, target: Any, name: str, own: Any) -> None:
        self.target, self.name, self.own = target, name, own  # own: the instance's value before, or _ABSENT
        self.layers: list[_Layer] = []

    @property
    def __code__(self):  # Lightning's `is_overridden` compares code objects: a wrapped hook counts as overridden
        return type(self).__call__.__code__

    def _beneath(self) -> Callable[..., Any]:
        if self.own is not _ABSENT:
            return self.own
        return _bound(self.target, self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # no signature of its own: Lightning reads the class's
        layers = self.layers
        try:
            for layer in list(layers):
                if layer.before is not None:
                    layer.before(*args, **kwargs)
            result = None
            for layer in list(layers):
                if layer.instead is not None and (result := layer.instead(*args, **kwargs)) is not None:
                    break
            if result is None:
                result = self._beneath()(*args, **kwargs)
            index = 0
            while index < len(layers):  # layers added meanwhile (a surgery scheduling one more) run in this call too
                layer, index = layers[index], index + 1
                if layer.after is not None:
                    result = layer.after(result, *args, **kwargs)
            return result
        finally:
            if any(layer.once for layer in layers):
                layers[:] = [layer for layer in layers if not layer.once]
                _settle(self)

    def __reduce__(self) -> tuple:
        """A copy of the object gets what was there before: another party's value, or the class's method."""
        if self.own is not _ABSENT:
            return _identity, (self.own,)
        return _bound, (self.target, self.name)


def _identity(value: Any) -> Any:
    return value


def _bound(target: Any, name: str) -> Any:
    """``target.<name>`` as the class defines it (bound to ``target``), whatever the instance holds."""
    attribute = getattr(type(target), name)
    return attribute.__get__(target, type(target)) if hasattr(attribute, "__get__") else attribute


def _note(owner: Any, target: Any) -> None:
    try:
        _OWNED.setdefault(owner, weakref.WeakSet()).add(target)
    except TypeError:
        raise TypeError(
            f"`owner` must be an object the seam can refer to weakly (a callback), got {type(owner).__name__} "
            f"{owner!r}."
        ) from None


def _check_target(target: Any, name: str) -> None:
    if isinstance(target, type) or not hasattr(target, "__dict__"):
        raise TypeError(f"wrap_method patches an object's own attributes, got {target!r}; see temporarily().")
    if not callable(getattr(target, name, None)):
        raise ValueError(f"{type(target).__name__} has no method {name!r} to wrap.")


def _wrapped(target: Any, name: str) -> _Wrapped:
    """The wrapper of ``target.<name>``, installed now if the seam has not wrapped it yet."""
    current = vars(target).get(name, _ABSENT)
    if isinstance(current, _Wrapped) and current.target is target:
        return current
    wrapped = _Wrapped(target, name, current)
    vars(target)[name] = wrapped
    return wrapped


def _settle(wrapped: _Wrapped) -> None:
    """Once no layer is left, put back what was there before (unless someone replaced the wrapper since)."""
    if wrapped.layers:
        return
    own = vars(wrapped.target)
    if own.get(wrapped.name) is not wrapped:
        log.debug("%s.%s was replaced after the seam wrapped it; left as it is.", type(wrapped.target), wrapped.name)
    elif wrapped.own is _ABSENT:
        del own[wrapped.name]
    else:
        own[wrapped.name] = wrapped.own


def wrap_method(
    target: Any,
    name: str,
    *,
    owner: Any,
    key: str | None = None,
    before: Callable[..., None] | None = None,
    instead: Callable[..., Any] | None = None,
    after: Callable[..., Any] | None = None,
    once: bool = False,
) -> None:
    """Run a layer around every call of ``target.<name>(*args, **kwargs)`` (see the module docstring).

    Args:
        target: the object (a LightningModule, a strategy, a precision plugin), never a class.
        name: the method.
        owner: who asks (a callback); :func:`undo` takes away what it added.
        key: a layer with this key is added once per object and method, however many owners ask.
        before: ``before(*args, **kwargs)``, before the call.
        instead: ``instead(*args, **kwargs)``: a result, or ``None`` to let the method run.
        after: ``after(result, *args, **kwargs) -> result``, after the call.
        once: drop the layer after the next call (whether or not it raised).

    Raises:
        TypeError: ``target`` is a class; ``owner`` cannot be referred to weakly.
        ValueError: ``target`` has no such method, or no part of the layer is given.

    Example::

        >>> class Module:
        ...     def step(self, x):
        ...         return x
        >>> class Owner:
        ...     pass
        >>> module, first, second = Module(), Owner(), Owner()
        >>> wrap_method(module, "step", owner=first, before=lambda x: print("before", x))
        >>> wrap_method(module, "step", owner=second, after=lambda result, x: result * 2)
        >>> module.step(3)
        before 3
        6
        >>> undo(first)
        >>> module.step(3)
        6
    """
    if before is None and instead is None and after is None:
        raise ValueError("wrap_method needs at least one of `before`, `instead` and `after`.")
    _check_target(target, name)
    _note(owner, target)
    wrapped = _wrapped(target, name)
    shared = next((layer for layer in wrapped.layers if key is not None and layer.key == key), None)
    if shared is None:
        wrapped.layers.append(_Layer([owner], key, before, instead, after, once))
    elif not any(o is owner for o in shared.owners):
        shared.owners.append(owner)


def run_after(target: Any, name: str, action: Callable[..., None], *, owner: Any) -> None:
    """Call ``action(*args, **kwargs)`` right after the next ``target.<name>(*args, **kwargs)``, once.

    Actions run in the order they were scheduled; one scheduled while the actions run (from inside an action) runs
    in the same call, after the others.

    Example::

        >>> class Module:
        ...     def configure_model(self):
        ...         print("built")
        >>> class Owner:
        ...     pass
        >>> module, owner = Module(), Owner()
        >>> run_after(module, "configure_model", lambda: print("surgery"), owner=owner)
        >>> module.configure_model()
        built
        surgery
        >>> module.configure_model(), patches(module)
        built
        (None, {})
    """

    def after(result: Any, *args: Any, **kwargs: Any) -> Any:
        action(*args, **kwargs)
        return result

    wrap_method(target, name, owner=owner, after=after, once=True)


def unwrap(target: Any, name: str, key: str) -> None:
    """Take the layer ``key`` of ``target.<name>`` away, whoever added it."""
    wrapped = vars(target).get(name)
    if isinstance(wrapped, _Wrapped) and wrapped.target is target:
        wrapped.layers[:] = [layer for layer in wrapped.layers if layer.key != key]
        _settle(wrapped)


def is_wrapped(target: Any, name: str, key: str | None = None) -> bool:
    """Does the seam wrap ``target.<name>`` (with a layer ``key``, if given)?"""
    wrapped = vars(target).get(name) if hasattr(target, "__dict__") else None
    if not isinstance(wrapped, _Wrapped) or wrapped.target is not target:
        return False
    return key is None or any(layer.key == key for layer in wrapped.layers)


def _is_property(target: Any, name: str) -> bool:
    return not isinstance(target, type) and isinstance(getattr(type(target), name, None), property)


def replace(target: Any, name: str, value: Any, *, owner: Any) -> None:
    """Set ``target.<name> = value`` (through its property, if it has one) until :func:`undo` puts back what was
    there: the object's own value, or nothing.

    Raises:
        RuntimeError: the seam replaced this attribute already with another value.

    Example::

        >>> class Strategy:
        ...     checkpoint_io = "default"
        >>> class Owner:
        ...     pass
        >>> strategy, owner = Strategy(), Owner()
        >>> replace(strategy, "checkpoint_io", "atomic", owner=owner)
        >>> strategy.checkpoint_io
        'atomic'
        >>> undo(owner)
        >>> strategy.checkpoint_io, vars(strategy)
        ('default', {})
    """
    records = _REPLACED.setdefault(target, {})
    record = records.get(name)
    if record is not None:
        if record.value is not value:
            raise RuntimeError(f"{type(target).__name__}.{name} is replaced already; undo that first.")
        if not any(o is owner for o in record.owners):
            record.owners.append(owner)
        _note(owner, target)
        return
    _note(owner, target)
    via_property = _is_property(target, name)
    previous = getattr(target, name) if via_property else vars(target).get(name, _ABSENT)
    records[name] = _Replaced([owner], value, previous, via_property)
    if via_property or isinstance(target, type):
        setattr(target, name, value)
    else:
        vars(target)[name] = value


def _put_back(target: Any, name: str, record: _Replaced) -> None:
    current = getattr(target, name) if record.via_property else vars(target).get(name, _ABSENT)
    if current is not record.value:
        log.debug("%s.%s was changed after the seam replaced it; left as it is.", type(target).__name__, name)
    elif record.via_property or (isinstance(target, type) and record.previous is not _ABSENT):
        setattr(target, name, record.previous)
    elif isinstance(target, type):
        delattr(target, name)
    elif record.previous is _ABSENT:
        del vars(target)[name]
    else:
        vars(target)[name] = record.previous


class _Token:
    """The owner of a :func:`temporarily` block."""


@contextlib.contextmanager
def temporarily(target: Any, name: str, value: Any) -> Iterator[None]:
    """``target.<name> = value`` inside the block (a class attribute too), put back after it, whatever happens.

    Example::

        >>> class Module:
        ...     pass
        >>> with temporarily(Module, "hook", staticmethod(lambda: "patched")):
        ...     Module.hook()
        'patched'
        >>> hasattr(Module, "hook")
        False
    """
    token = _Token()
    replace(target, name, value, owner=token)
    try:
        yield
    finally:
        undo(token)


def _drop(target: Any, keep: Callable[[list[Any]], list[Any]]) -> None:
    """Filter the owners of every patch on ``target`` through ``keep``; patches left without owners go."""
    for value in list(vars(target).values()) if hasattr(target, "__dict__") else ():
        if isinstance(value, _Wrapped) and value.target is target:
            for layer in value.layers:
                layer.owners = keep(layer.owners)
            value.layers[:] = [layer for layer in value.layers if layer.owners]
            _settle(value)
    records = _REPLACED.get(target, {})
    for name, record in list(records.items()):
        record.owners = keep(record.owners)
        if not record.owners:
            _put_back(target, name, records.pop(name))
    if not records:
        _REPLACED.pop(target, None)


def undo(owner: Any) -> None:
    """Take away every patch ``owner`` added (what others share with it stays until they undo theirs)."""
    for target in list(_OWNED.pop(owner, ())):
        _drop(target, lambda owners: [o for o in owners if o is not owner])


def _objects(item: Any) -> list[Any]:
    """A trainer stands for itself, its strategy, its precision plugin and its LightningModule."""
    strategy = getattr(item, "strategy", None)
    if strategy is None or not hasattr(item, "lightning_module"):
        return [item]
    return [item, strategy, strategy.precision_plugin, strategy.lightning_module]


def undo_all(*objects: Any) -> None:
    """Take away every patch of the seam on ``objects``, whoever added it (a Trainer stands for itself, its
    strategy, its precision plugin and its LightningModule)."""
    for item in objects:
        for target in _objects(item):
            if target is not None:
                _drop(target, lambda owners: [])


def patches(target: Any) -> dict[str, list[str]]:
    """What the seam changed on ``target``: ``{attribute: [each layer or replacement, and who asked]}``."""
    found: dict[str, list[str]] = {}
    for name, value in vars(target).items() if hasattr(target, "__dict__") else ():
        if isinstance(value, _Wrapped) and value.target is target and value.layers:
            found[name] = [_describe(layer.key or "layer", layer.owners) for layer in value.layers]
    for name, record in _REPLACED.get(target, {}).items():
        found.setdefault(name, []).append(_describe("replaced", record.owners))
    return found


def _describe(what: str, owners: list[Any]) -> str:
    return f"{what} ({', '.join(type(o).__name__ for o in owners)})"
