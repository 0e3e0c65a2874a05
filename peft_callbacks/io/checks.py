"""Checks on tensors read from files: nothing non-finite, or of another kind than where it goes, reaches a model.

Example::

    >>> import torch
    >>> check_tensors({"a": torch.ones(2)}, "adapter_model.safetensors")
    >>> check_tensors({"a": torch.tensor([1.0, float("nan")])}, "adapter_model.safetensors")
    Traceback (most recent call last):
    ...
    ValueError: adapter_model.safetensors: tensor 'a' holds NaN or Inf values; refusing to load it.
    >>> check_tensors({"a": torch.ones(2, dtype=torch.int32)}, "f", targets={"a": torch.zeros(2)})
    Traceback (most recent call last):
    ...
    ValueError: f: tensor 'a' has dtype int32 but goes into a float32 tensor; refusing to cast it.
"""

from __future__ import annotations

import torch

__all__ = ["check_tensors"]


def check_tensors(
    tensors: dict[str, torch.Tensor],
    source: str,
    error: type[ValueError] = ValueError,
    targets: dict[str, torch.Tensor] | None = None,
    action: str = "load",
) -> None:
    """Refuse NaN/Inf values and tensors of another kind than their destination, naming the first bad one.

    Args:
        tensors: ``{name: tensor}`` as read from a file.
        source: the file, for the message.
        error: the exception class to raise (a ``ValueError``).
        targets: ``{name: tensor}`` where each one will be copied; without it, only floating-point tensors pass.
        action: what is refused, for the message (``"load"``: "refusing to load it").
    """
    for name, tensor in tensors.items():
        target = (targets or {}).get(name)
        floating = tensor.is_floating_point()
        if target is None and not floating and targets is None:
            raise error(f"{source}: tensor {name!r} has dtype {_name(tensor)}; adapter tensors are floating point.")
        if target is not None and (
            floating != target.is_floating_point() or (not floating and tensor.dtype != target.dtype)
        ):
            raise error(
                f"{source}: tensor {name!r} has dtype {_name(tensor)} but goes into a {_name(target)} tensor; "
                f"refusing to cast it."
            )
        if floating and not bool(torch.isfinite(tensor).all()):
            raise error(f"{source}: tensor {name!r} holds NaN or Inf values; refusing to {action} it.")


def _name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")
