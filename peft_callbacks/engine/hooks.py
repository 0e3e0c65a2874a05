"""Forward hooks owned by an inserted module: they are bound methods of it, so they survive ``deepcopy`` and
pickling, and can be found (and removed) again by identity without keeping hook handles around."""

from __future__ import annotations

import torch.nn as nn

_DICTS = {
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
}


def hook_owner(hook) -> object | None:
    """The object a hook is a bound method of (looking through ``functools.partial``).

    Example::

        >>> import functools
        >>> net = nn.Linear(2, 2)
        >>> hook_owner(functools.partial(net.forward)) is net, hook_owner(lambda *args: None)
        (True, None)
    """
    return getattr(getattr(hook, "func", hook), "__self__", None)


def remove_hooks_of(root: nn.Module, owner: nn.Module) -> int:
    """Remove every forward (pre-)hook inside ``root`` that is a method of ``owner``; return how many.

    Example::

        >>> net, owner = nn.Sequential(nn.Linear(2, 2)), nn.Identity()
        >>> _ = net[0].register_forward_hook(lambda m, a, out: owner(out))
        >>> _ = net[0].register_forward_hook(owner.forward)
        >>> remove_hooks_of(net, owner), len(net[0]._forward_hooks)
        (1, 1)
    """
    removed = 0
    for module in root.modules():
        for main, extra in _DICTS.items():
            hooks = getattr(module, main)
            for key in [k for k, hook in hooks.items() if hook_owner(hook) is owner]:
                del hooks[key]
                for name in extra:
                    getattr(module, name).pop(key, None)
                removed += 1
    return removed
