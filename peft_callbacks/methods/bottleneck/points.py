"""Where bottleneck adapters go: the attention and feed-forward sub-layers of each transformer block, found by shape.

A block is recognised by the children it holds, never by its name or path:

====================================================  ============================  ===========================
block                                                 after attention               after the MLP
====================================================  ============================  ===========================
timm ViT / DeiT / Swin / BEiT / EVA, HF GPT-2         ``attn``                      ``mlp``
HF Llama / Qwen2 / Mistral / … decoder layers         ``self_attn``                 ``mlp``
HF BART / mBART / Marian / … layers (``fc1``, ``fc2``)  ``self_attn``                 ``fc2``
HF ViT-style layers                                   ``attention``                 ``mlp``
HF BERT / RoBERTa / ELECTRA layers                    ``attention.output.dense``    ``output.dense``
HF DistilBERT blocks                                  ``attention.out_lin``         ``ffn.lin2``
HF T5 blocks                                          ``layer.0.SelfAttention``     ``layer.<last>.DenseReluDense``
====================================================  ============================  ===========================

For post-LayerNorm models (BERT, DistilBERT) the adapter sits on the output projection, before the residual sum and
the LayerNorm, as in Houlsby et al. (2019, Fig. 2).

Example::

    >>> import timm
    >>> vit = timm.create_model("test_vit", pretrained=False)
    >>> points = find_insertion_points(vit, "pfeiffer")
    >>> points[:2], len(points)
    (['blocks.0.mlp', 'blocks.1.mlp'], 6)
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from peft_callbacks._validation import check_choice, check_patterns
from peft_callbacks.core.kinds import is_hf_conv1d
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.targets import path_matches

PLACEMENTS = ("houlsby", "pfeiffer")


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)  # a LoRA-wrapped projection still counts: adapters can follow LoRA
    except AttributeError:
        return None


def _fixed(attn: str, mlp: str, *extra: str) -> Callable[[nn.Module], tuple[str, str] | None]:
    def rule(block: nn.Module) -> tuple[str, str] | None:
        if all(_child(block, p) is not None for p in (attn, mlp, *extra)):
            return attn, mlp
        return None

    return rule


def _t5_block(block: nn.Module) -> tuple[str, str] | None:
    layers = getattr(block, "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
        return None
    if _child(layers[0], "SelfAttention") is None or _child(layers[-1], "DenseReluDense") is None:
        return None
    return "layer.0.SelfAttention", f"layer.{len(layers) - 1}.DenseReluDense"


BLOCK_RULES: list[tuple[str, Callable[[nn.Module], tuple[str, str] | None]]] = [
    ("timm ViT/DeiT/Swin/BEiT/EVA and GPT-2 blocks (attn + mlp)", _fixed("attn", "mlp")),
    ("Llama/Qwen/Mistral-style decoder layers (self_attn + mlp)", _fixed("self_attn", "mlp")),
    ("BART-style layers (self_attn + fc1/fc2)", _fixed("self_attn", "fc2", "fc1")),
    ("HF ViT/… layers (attention + mlp)", _fixed("attention", "mlp")),
    (
        "BERT/RoBERTa/ELECTRA layers (attention.output.dense + output.dense)",
        _fixed("attention.output.dense", "output.dense", "intermediate"),
    ),
    ("DistilBERT blocks (attention.out_lin + ffn.lin2)", _fixed("attention.out_lin", "ffn.lin2")),
    ("T5 blocks (layer.0.SelfAttention + layer.N.DenseReluDense)", _t5_block),
]


def supported_blocks() -> str:
    """One line listing the block types found automatically, for error messages.

    Example::

        >>> supported_blocks().split("; ")[1]
        'Llama/Qwen/Mistral-style decoder layers (self_attn + mlp)'
    """
    return "; ".join(name for name, _ in BLOCK_RULES)


def find_insertion_points(model: nn.Module, placement: str = "houlsby") -> list[str]:
    """Paths of the sub-layers whose output gets an adapter, in model order.

    Args:
        model: the model to search.
        placement: ``"houlsby"`` (after attention and after the MLP) or ``"pfeiffer"`` (after the MLP only).

    Example::

        >>> import transformers as hf
        >>> cfg = hf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                      vocab_size=10)
        >>> find_insertion_points(hf.LlamaForCausalLM(cfg))
        ['model.layers.0.self_attn', 'model.layers.0.mlp']

    Raises:
        ValueError: no supported transformer block was found (the message lists the supported ones).
    """
    check_choice("placement", placement, PLACEMENTS)
    points: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, PEFTModule):
                continue
            found = next((hit for _, rule in BLOCK_RULES if (hit := rule(child)) is not None), None)
            if found is None:
                visit(child, path)
                continue
            attn, mlp = found
            points.extend([f"{path}.{attn}", f"{path}.{mlp}"] if placement == "houlsby" else [f"{path}.{mlp}"])

    visit(model, "")
    if not points:
        raise ValueError(
            f"Found no transformer block in {type(model).__name__} to put adapters in. Supported blocks: "
            f"{supported_blocks()}. For other models name the sub-layers whose output should pass through an "
            f"adapter with `modules=[...]` (e.g. modules=['blocks.0.mlp', 'blocks.1.mlp'] or a regex)."
        )
    return points


def match_modules(model: nn.Module, modules: str | list[str]) -> list[str]:
    """Paths of the modules named by ``modules`` (names, dotted suffixes or regexes), in model order.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        >>> match_modules(net, "[0-9]")
        ['0', '1', '2']

    Raises:
        ValueError: an entry matches no module.
    """
    patterns = check_patterns("modules", modules)
    walk = [(p, m) for p, m in model.named_modules() if p and not _inside_inserted(model, p)]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [p for p, m in walk if path_matches(pattern, p) and not isinstance(m, PEFTModule)]
        if not hits:
            listing = ", ".join(p for p, _ in walk[:12])
            raise ValueError(
                f"`modules` entry {pattern!r} matched no module in {type(model).__name__}; modules include: "
                f"{listing}{', …' if len(walk) > 12 else ''}."
            )
        chosen.extend(h for h in hits if h not in chosen)
    order = {p: i for i, (p, _) in enumerate(walk)}
    return sorted(chosen, key=order.__getitem__)


def _inside_inserted(model: nn.Module, path: str) -> bool:
    parts = path.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, PEFTModule):
            return True
    return False


def output_width(module: nn.Module, path: str = "module") -> int:
    """Width ``d`` of a sub-layer's output: its own, or that of the last Linear / ``Conv1D`` inside it.

    Example::

        >>> output_width(nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)))
        8

    Raises:
        ValueError: the module holds no Linear layer to read the width from.
    """
    last = None
    for m in module.modules():
        if isinstance(m, PEFTModule):
            continue
        if isinstance(m, nn.Linear) or is_hf_conv1d(m):
            last = m
    if last is None:
        raise ValueError(
            f"Cannot tell the output width of {path!r} ({type(module).__name__}): it holds no Linear layer. Name a "
            f"module that ends in a Linear projection (an attention or MLP sub-layer) in `modules`."
        )
    return last.out_features if isinstance(last, nn.Linear) else last.nf
