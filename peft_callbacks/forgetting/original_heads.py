"""The original (base-task) head: load it, and score through *current backbone → frozen original head*.

Fine-tuning usually replaces a model's head (``timm.create_model(..., num_classes=5)``, ``reset_classifier``,
``from_pretrained(..., num_labels=5)``). The base task can still be scored by putting a frozen copy of the original
head back at the head's place for the duration of one forward pass: the model's own ``forward`` then runs its
backbone as it is now (for timm ``forward_features`` → ``forward_head`` with the original classifier; for
transformers the base model's outputs through the original ``classifier``/``score``/… module). The head's place is
found by its family's contract (:func:`peft_callbacks.core.heads.find_head`).

Example::

    >>> import timm, torch
    >>> original = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    >>> heads = base_heads_from(original.get_classifier(), original)
    >>> model = original
    >>> model.reset_classifier(4)
    >>> with swapped_heads(model, heads):
    ...     model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
from collections.abc import Iterator

import torch
import torch.nn as nn

from peft_callbacks.core.heads import find_head
from peft_callbacks.core.models import family_of


def head_paths(model: nn.Module) -> list[str]:
    """Paths of ``model``'s task head, or of its output embeddings (``lm_head``) when it has no task head.

    Example::

        >>> import timm
        >>> head_paths(timm.create_model("test_vit", pretrained=False, num_classes=3))
        ['head']
    """
    info = find_head(model)
    return info.head or info.output_embeddings


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode with every parameter frozen."""
    module = copy.deepcopy(module)
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def base_heads_from(base_head: nn.Module, model: nn.Module) -> dict[str, nn.Module]:
    """Frozen copies of the original head modules, keyed by their path inside ``model``.

    Args:
        base_head: the original head module (replaces ``model``'s single head), or the whole original timm /
            transformers model (its head modules are taken through the family's contract).
        model: the model being fine-tuned.

    Raises:
        TypeError: ``base_head`` is not a module.
        ValueError: the head places of ``base_head`` and ``model`` do not correspond.
    """
    if not isinstance(base_head, nn.Module):
        raise TypeError(f"`base_head` must be a torch.nn.Module or a path, got {type(base_head).__name__}.")
    paths = head_paths(model)
    if family_of(base_head) != "generic":
        found = head_paths(base_head)
        if sorted(found) != sorted(paths):
            raise ValueError(
                f"`base_head` is a {type(base_head).__name__} whose head is at {found}, but the model's head is at "
                f"{paths}; pass the original head module itself."
            )
        return {p: frozen_copy(base_head.get_submodule(p)) for p in paths}
    if len(paths) != 1:
        raise ValueError(
            f"`base_head` is one {type(base_head).__name__} but {type(model).__name__}'s head has {len(paths)} "
            f"modules ({paths}); pass the whole original model, or a state-dict path holding every head module."
        )
    return {paths[0]: frozen_copy(base_head)}


def load_state_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a saved state dict (``.safetensors``, or ``torch.save``'d, loaded with ``weights_only=True``;
    a Lightning checkpoint's ``state_dict``); refuse anything else with the ``base_head`` argument named."""
    if not os.path.isfile(path):
        raise ValueError(f"`base_head`={path!r} is not a file; pass a torch.save'd state dict or a .safetensors file.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"`base_head`={path!r} holds objects other than tensors and cannot be loaded safely; save the head with "
            f"torch.save(head.state_dict(), path) or safetensors. ({error.__class__.__name__}: {str(error)[:200]})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"`base_head`={path!r} does not hold a state dict of tensors.")
    return state


def _prefix_for(state: dict[str, torch.Tensor], path: str, names: list[str]) -> str | None:
    """The key prefix under which every tensor of the head at ``path`` is stored in ``state``, if any."""
    if all(n in state for n in names) and len(names) == len(state):
        return ""  # the head's own state dict
    suffix = f"{path}.{names[0]}"
    candidates = {k[: -len(names[0])] for k in state if k == suffix or k.endswith("." + suffix)}
    found = [c for c in candidates if all(c + n in state for n in names)]
    return min(found, key=len) if found else None


def _assign(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    # Shapes may differ from the current head (10 base classes, 4 new ones), so tensors are assigned, not copied.
    for key, tensor in state.items():
        owner_path, _, name = key.rpartition(".")
        owner = module.get_submodule(owner_path)
        if name in owner._parameters:
            setattr(owner, name, nn.Parameter(tensor.clone(), requires_grad=False))
        else:
            owner.register_buffer(name, tensor.clone())
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape


def base_heads_from_file(path: str, model: nn.Module) -> dict[str, nn.Module]:
    """Frozen original head modules read from a saved state dict (``torch.save`` or ``.safetensors``).

    The file holds either the state dict of the single head module (``{"weight", "bias"}``), or the state dict of
    the whole original model / LightningModule / Lightning checkpoint (keys ending in ``<head path>.weight``).

    Raises:
        ValueError: no such file, or no tensors for the head in it (the message lists the keys it has).

    Example::

        >>> import os, tempfile, timm
        >>> original = timm.create_model("test_resnet", pretrained=False, num_classes=10)
        >>> path = os.path.join(tempfile.mkdtemp(), "original.pt")
        >>> torch.save({"model." + k: v for k, v in original.state_dict().items()}, path)
        >>> original.reset_classifier(4)
        >>> base_heads_from_file(path, original)["fc"].out_features
        10
    """
    state = load_state_file(path)
    heads = {}
    for head_path in head_paths(model):
        current = model.get_submodule(head_path)
        names = list(current.state_dict())
        prefix = _prefix_for(state, head_path, names)
        if prefix is None:
            shown = ", ".join(list(state)[:8]) + (", ..." if len(state) > 8 else "")
            raise ValueError(
                f"`base_head`={path!r} holds no tensors for the head {head_path!r} (expected keys {names} or "
                f"'<prefix>{head_path}.{names[0]}', ...); the file has: {shown}."
            )
        head = frozen_copy(current)
        _assign(head, {n: state[prefix + n] for n in names})
        heads[head_path] = head
    return heads


def _replace(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


@contextlib.contextmanager
def swapped_heads(model: nn.Module, heads: dict[str, nn.Module] | None) -> Iterator[None]:
    """Put ``heads`` (``{path: module}``) in place inside ``model`` and put the current ones back afterwards.

    Example::

        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        >>> with swapped_heads(model, {"1": nn.Linear(4, 7)}):
        ...     model(torch.zeros(1, 3)).shape
        torch.Size([1, 7])
        >>> model[1].out_features
        2
    """
    if not heads:
        yield
        return
    previous = {}
    try:
        for path, head in heads.items():
            current = model.get_submodule(path)
            ref = next(iter(current.parameters()), None)
            if ref is not None:
                head.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            previous[path] = _replace(model, path, head)
        yield
    finally:
        for path, old in previous.items():
            _replace(model, path, old)


def output_size(heads: dict[str, nn.Module] | None, model: nn.Module) -> int | None:
    """Number of outputs (classes) of the last head layer: of ``heads`` if given, else of ``model``'s head.

    Example::

        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 4))
        >>> output_size({"1": nn.Linear(8, 10)}, model), output_size(None, model)
        (10, 4)
    """
    modules = list(heads.values()) if heads else [model.get_submodule(p) for p in head_paths(model)]
    size = None
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                size = m.weight.shape[0]
            elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
                size = m.out_channels
            elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):  # transformers' GPT-2 Conv1D
                size = m.nf
    return size


@contextlib.contextmanager
def captured_input(module: nn.Module | None, store: list[torch.Tensor]) -> Iterator[None]:
    """Append the first positional input of each ``module`` call to ``store`` (the head's input: pooled features).

    Example::

        >>> model, store = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), []
        >>> with captured_input(model[1], store):
        ...     _ = model(torch.zeros(5, 3))
        >>> store[0].shape
        torch.Size([5, 4])
    """
    if module is None:
        yield
        return
    with hooked(module.register_forward_pre_hook(lambda m, args: store.append(args[0]) if args else None)):
        yield


@contextlib.contextmanager
def hooked(handle: torch.utils.hooks.RemovableHandle) -> Iterator[None]:
    """Keep a hook (``handle``, as ``register_forward_hook`` returns it) for the ``with`` block, then remove it."""
    try:
        yield
    finally:
        handle.remove()
