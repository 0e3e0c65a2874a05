"""Put bottleneck adapters into a model, or take them out again. Plain PyTorch: no Trainer needed.

Each adapter becomes a child called ``adapter`` of the sub-layer it follows (``blocks.0.mlp.adapter``) and a forward
hook on that sub-layer passes its output through it. The sub-layer keeps its type and the base model keeps all its
``state_dict`` keys, so code that looks for ``LlamaAttention`` or loads a base checkpoint still works; attention
modules that return tuples have only their first item (the hidden states) adapted.

Example::

    >>> import timm, torch
    >>> model = timm.create_model("test_vit", pretrained=False, num_classes=5)
    >>> x = torch.randn(2, 3, 160, 160)
    >>> before = model(x)
    >>> model = inject_adapters(model, bottleneck=8, placement="pfeiffer")
    >>> torch.equal(model(x), before)  # up-projections start at zero
    True
    >>> sorted(adapter_layers(model))[:2]
    ['blocks.0.mlp.adapter', 'blocks.1.mlp.adapter']
    >>> remove_adapters(model) is model, len(adapter_layers(model))
    (True, 0)
"""

from __future__ import annotations

import logging

import torch.nn as nn

from peft_callbacks._validation import check_bool, check_choice, check_module, check_positive_int
from peft_callbacks.adapters.bottleneck import ACTIVATIONS, BottleneckAdapter
from peft_callbacks.adapters.points import PLACEMENTS, find_insertion_points, match_modules, output_width
from peft_callbacks.core.heads import find_head
from peft_callbacks.core.modules import peft_modules
from peft_callbacks.core.params import count_parameters, freeze, unfreeze
from peft_callbacks.core.recipe import clear_surgery, record_surgery, register_surgery
from peft_callbacks.core.targets import exact_patterns
from peft_callbacks.prompts.hooks import remove_hooks_of

__all__ = ["adapter_layers", "inject_adapters", "is_norm_layer", "remove_adapters"]

log = logging.getLogger(__name__)

ADAPTER_NAME = "adapter"


def adapter_layers(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """``{path: adapter}`` of every bottleneck adapter inside ``model``.

    Example::

        >>> adapter_layers(nn.Linear(2, 2))
        {}
    """
    return peft_modules(model, BottleneckAdapter)


def is_norm_layer(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm / GroupNorm, including the transformers classes named ``*LayerNorm`` / ``*RMSNorm``.

    Example::

        >>> is_norm_layer(nn.LayerNorm(4)), is_norm_layer(nn.BatchNorm1d(4))
        (True, False)
    """
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _check_args(model, bottleneck, placement, activation, train_head, train_norms) -> None:
    check_module("model", model)
    check_positive_int("bottleneck", bottleneck)
    check_choice("placement", placement, PLACEMENTS)
    check_choice("activation", activation, ACTIVATIONS)
    check_bool("train_head", train_head)
    check_bool("train_norms", train_norms)
    existing = adapter_layers(model)
    if existing:
        raise ValueError(
            f"{type(model).__name__} already has {len(existing)} bottleneck adapter(s) ({', '.join(list(existing)[:3])}"
            f", …); injecting twice would stack them. Call remove_adapters(model) first."
        )


def inject_adapters(
    model: nn.Module,
    bottleneck: int = 64,
    placement: str = "houlsby",
    activation: str = "gelu",
    modules: str | list[str] | None = None,
    *,
    train_head: bool = True,
    train_norms: bool = False,
) -> nn.Module:
    """Add bottleneck adapters after the sub-layers of each transformer block and freeze the rest (in place).

    Args:
        model: a timm ViT-family model, a transformers model (see :mod:`peft_callbacks.adapters.points` for the
            blocks found automatically) or any ``nn.Module`` together with ``modules``.
        bottleneck: bottleneck width ``m`` (> 0); each adapter has ``2·d·m + d + m`` parameters.
        placement: ``"houlsby"``: after the attention and the MLP sub-layer of every block (Houlsby et al. 2019);
            ``"pfeiffer"``: after the MLP only (Pfeiffer et al. 2021). Ignored when ``modules`` is given.
        activation: ``"gelu"``, ``"relu"``, ``"silu"`` or ``"tanh"``.
        modules: names, dotted suffixes or regexes of the modules whose output should pass through an adapter,
            instead of the automatic choice; each must end in a Linear projection (its width sets ``d``).
        train_head: keep the task head (``get_classifier()`` / the transformers task head) trainable.
        train_norms: also train every LayerNorm/RMSNorm (Houlsby et al. train them with the adapters).

    Returns:
        ``model`` itself, modified in place.

    Example::

        >>> import transformers as hf
        >>> cfg = hf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=10)
        >>> gpt2 = inject_adapters(hf.GPT2LMHeadModel(cfg), bottleneck=4)
        >>> count_parameters(gpt2).trainable == 4 * (2 * 16 * 4 + 16 + 4)  # 2 blocks x 2 adapters
        True

    Raises:
        ValueError: bad hyper-parameters, no supported block (the message lists them), a ``modules`` entry that
            matches nothing, or a model that already has adapters.
    """
    _check_args(model, bottleneck, placement, activation, train_head, train_norms)
    paths = find_insertion_points(model, placement) if modules is None else match_modules(model, modules)
    head = find_head(model).head if train_head else []
    targets = [(path, model.get_submodule(path)) for path in paths]
    for path, target in targets:
        if hasattr(target, ADAPTER_NAME):
            raise ValueError(f"{path!r} already has an attribute {ADAPTER_NAME!r}; cannot add an adapter to it.")
    freeze(model)
    if train_norms:
        unfreeze([m for m in model.modules() if is_norm_layer(m)])
    if head:
        unfreeze([model.get_submodule(p) for p in head])
    for path, target in targets:
        adapter = BottleneckAdapter(output_width(target, path), bottleneck, activation)
        weight = next(target.parameters(), None)
        if weight is not None:
            adapter.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        target.add_module(ADAPTER_NAME, adapter)
        target.register_forward_hook(adapter.hook)
    record_surgery(
        model,
        "adapters",
        dict(
            modules=paths,
            bottleneck=bottleneck,
            placement=placement,
            activation=activation,
            train_head=train_head,
            train_norms=train_norms,
        ),
    )
    log.info(
        "Bottleneck adapters (m=%d, %s) after %d sub-layer(s) of %s; head %s; %s",
        bottleneck,
        placement if modules is None else "named modules",
        len(paths),
        type(model).__name__,
        head or "frozen",
        count_parameters(model),
    )
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take every bottleneck adapter (and its hook) out of ``model``; the base model is as before (in place).

    Parameters keep the ``requires_grad`` the injection gave them; unfreeze what you want to train next.
    See the module docstring for an example.
    """
    for path, adapter in adapter_layers(model).items():
        parent = model.get_submodule(path.rpartition(".")[0])
        remove_hooks_of(parent, adapter)
        delattr(parent, path.rpartition(".")[2])
    clear_surgery(model, "adapters")
    return model


def _replay_adapters(model: nn.Module, modules: list[str], **config) -> nn.Module:
    return inject_adapters(model, modules=exact_patterns(modules), **config)


register_surgery("adapters", _replay_adapters)
