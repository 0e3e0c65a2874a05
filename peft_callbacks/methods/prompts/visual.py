"""Visual prompt tuning (VPT, Jia et al. 2022) for timm Vision Transformers: learned tokens in the token sequence.

::

    [CLS, REG…] [P₁ … Pₙ] [patch₁ … patch_N]   ← prompts inserted after the prefix (class/register) tokens
          │ block 0 │ … │ block L-1 │        deep: before every block i > 0 the prompt slots are replaced by Pⁱ
    [CLS, REG…] [patch₁ … patch_N]          ← prompts dropped after the last block

Shallow VPT learns ``n·d`` parameters (prompts enter before the first block only); deep VPT learns ``L·n·d`` (a new
set replaces the old one before each block, §3.2). The prompts are taken out again after the last block, so
``forward_features`` returns the same shape as before and every ``global_pool`` (``"token"``, ``"avg"``, ``"map"``)
pools over exactly the tokens it did before. Works for timm ``VisionTransformer`` and its subclasses (ViT, DeiT,
DeiT-distilled, …); blocks called with an ``attn_mask`` are not supported.

Example::

    >>> import timm, torch
    >>> vit = timm.create_model("test_vit", pretrained=False, num_classes=5)
    >>> vit = inject_visual_prompts(vit, num_virtual_tokens=4, deep=True)
    >>> vit.forward_features(torch.randn(2, 3, 160, 160)).shape  # prompts are gone after the last block
    torch.Size([2, 101, 64])
    >>> print(count_parameters(vit))  # 6 blocks x 4 prompts x 64 dims + the 5-class head
    trainable 1,861 / total 308,101 (0.60%)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import torch
import torch.nn as nn

from peft_callbacks._validation import check_bool, check_float, check_int, check_module, check_positive_int
from peft_callbacks.core.model_kinds import TIMM_VISION_TRANSFORMERS, ModelKind
from peft_callbacks.core.modules import PEFTModule, peft_modules
from peft_callbacks.core.params import count_parameters
from peft_callbacks.engine import MethodConfig, inject, register_method, unload
from peft_callbacks.engine.arguments import takes_settings
from peft_callbacks.engine.scaling import FixedScale
from peft_callbacks.methods.prompts.method import PromptMethod

__all__ = [
    "VisualPromptConfig",
    "VisualPrompts",
    "count_parameters",
    "inject_visual_prompts",
    "remove_visual_prompts",
    "visual_prompts",
]

log = logging.getLogger(__name__)

PROMPT_NAME = "visual_prompts"


class VisualPrompts(FixedScale, PEFTModule):
    """Prompt tokens for a ViT's blocks: ``weight`` has shape ``(L or 1, n, d)``.

    Args:
        num_virtual_tokens: prompts per block ``n``.
        dim: token width ``d``.
        depth: number of prompt sets (1 for shallow VPT, the number of blocks for deep VPT).
        num_prefix_tokens: class/register/distillation tokens in front of the patches (prompts go after them).
        dropout: dropout on the prompts (VPT uses 0.1).

    Example::

        >>> VisualPrompts(num_virtual_tokens=10, dim=192, depth=12, num_prefix_tokens=1).weight.shape
        torch.Size([12, 10, 192])
    """

    def __init__(
        self, num_virtual_tokens: int, dim: int, depth: int, num_prefix_tokens: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = check_positive_int("num_virtual_tokens", num_virtual_tokens)
        check_positive_int("dim", dim)
        check_positive_int("depth", depth)
        check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        self.num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
        self.weight = nn.Parameter(torch.zeros(depth, num_virtual_tokens, dim))
        self.dropout = nn.Dropout(dropout)
        self.disabled = False  # the blocks run without prompts (e.g. to score the base model)

    def extra_repr(self) -> str:
        depth, n, dim = self.weight.shape
        return f"num_virtual_tokens={n}, dim={dim}, depth={depth}, num_prefix_tokens={self.num_prefix_tokens}"

    def _prompt(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.weight[index]).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)

    def insert(self, block: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook on the first block: put the prompts after the prefix tokens."""
        if self.disabled:
            return args
        x, p = args[0], self.num_prefix_tokens
        x = torch.cat([x[:, :p], self._prompt(0, x), x[:, p:]], dim=1)  # (B, p + n + N, d)
        return (x, *args[1:])

    def replace(self, index: int, block: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook on block ``index`` > 0 (deep VPT): swap the prompt slots for this block's prompts."""
        if self.disabled:
            return args
        x, p, n = args[0], self.num_prefix_tokens, self.num_virtual_tokens
        x = torch.cat([x[:, :p], self._prompt(index, x), x[:, p + n :]], dim=1)
        return (x, *args[1:])

    def drop(self, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the last block: take the prompt tokens out again."""
        if self.disabled:
            return output
        p, n = self.num_prefix_tokens, self.num_virtual_tokens
        return torch.cat([output[:, :p], output[:, p + n :]], dim=1)  # (B, p + N, d)


def visual_prompts(model: nn.Module) -> dict[str, VisualPrompts]:
    """``{path: prompts}`` of every set of visual prompts inside ``model``.

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> list(visual_prompts(inject_visual_prompts(vit, 4)))
        ['visual_prompts']
    """
    return peft_modules(model, VisualPrompts)


def _check_model(model: nn.Module) -> list[nn.Module]:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"Visual prompt tuning supports timm VisionTransformer models (ViT, DeiT, DeiT-distilled and other "
            f"subclasses), got {type(model).__name__}. Use adapters or LoRA for other architectures."
        )
    blocks = list(model.blocks)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no blocks to put visual prompts into.")
    return blocks


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisualPromptConfig(MethodConfig, method="visual_prompts"):
    """Visual prompt tuning (VPT, Jia et al. 2022) for timm Vision Transformers.

    Attributes:
        num_virtual_tokens: prompts per block ``n`` (> 0).
        deep: deep VPT (a new prompt set before every block, ``L·n·d`` parameters) instead of shallow
            (``n·d`` parameters, first block only).
        dropout: dropout on the prompts, in ``[0, 1)``.

    Example::

        >>> VisualPromptConfig(num_virtual_tokens=4, deep=True).to_dict()
        {'train_head': True, 'train_bn': False, 'num_virtual_tokens': 4, 'deep': True, 'dropout': 0.0}
    """

    num_virtual_tokens: int = 10
    deep: bool = False
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        check_bool("deep", self.deep)
        self._set("dropout", check_float("dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False))


class VisualPromptMethod(PromptMethod):
    """Learned tokens in the token sequence of a timm ViT (not mergeable)."""

    name = "visual_prompts"
    title = "Visual prompt tuning"
    config_class = VisualPromptConfig
    module_class = VisualPrompts
    existing_modules = "visual prompts"
    removal = "remove_visual_prompts(model)"
    examples = {
        "shallow": VisualPromptConfig(num_virtual_tokens=3),
        "deep": VisualPromptConfig(num_virtual_tokens=3, deep=True, dropout=0.1),
    }

    def applies_to(self, config: VisualPromptConfig) -> ModelKind:
        """timm VisionTransformer models (ViT, DeiT and their subclasses): the ones ``check_model`` accepts."""
        return TIMM_VISION_TRANSFORMERS

    def places(self, model: nn.Module) -> Any:
        return _check_model(model)

    def insert(self, model: nn.Module, targets: list[str], config: VisualPromptConfig, adapter_name: str) -> None:
        blocks = self.places(model)
        dim, n = model.embed_dim, config.num_virtual_tokens
        prompts = VisualPrompts(n, dim, len(blocks) if config.deep else 1, model.num_prefix_tokens, config.dropout)
        patch = getattr(model.patch_embed, "patch_size", (16, 16))
        bound = math.sqrt(6.0 / float(3 * math.prod(patch) + dim))  # Xavier-uniform over the patch projection (VPT §4)
        nn.init.uniform_(prompts.weight, -bound, bound)
        reference = model.cls_token if model.cls_token is not None else next(model.parameters())
        prompts.to(device=reference.device, dtype=reference.dtype)
        model.add_module(PROMPT_NAME, prompts)
        blocks[0].register_forward_pre_hook(prompts.insert)
        if config.deep:
            for index, block in enumerate(blocks[1:], start=1):
                block.register_forward_pre_hook(functools.partial(prompts.replace, index))
        blocks[-1].register_forward_hook(prompts.drop)

    def describe(self, config: VisualPromptConfig) -> str:
        return f"{'deep' if config.deep else 'shallow'}, {config.num_virtual_tokens} tokens"


register_method(VisualPromptMethod())


@takes_settings(VisualPromptConfig, positional=3)
def inject_visual_prompts(model: nn.Module, config: VisualPromptConfig) -> nn.Module:
    """Give a timm ViT learned prompt tokens (VPT) and freeze everything else (in place).

    ``inject(model, VisualPromptConfig(...))`` with :class:`VisualPromptConfig`'s fields as keywords (the first three
    also by position).

    Args:
        model: a timm ``VisionTransformer`` (or subclass).

    Returns:
        ``model`` itself, modified in place.

    Raises:
        ValueError: ``num_virtual_tokens`` <= 0, or a model that is not a timm VisionTransformer.
    """
    return inject(check_module("model", model), config)


def remove_visual_prompts(model: nn.Module) -> nn.Module:
    """Take the visual prompts and their hooks out of ``model`` (in place).

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> vit = remove_visual_prompts(inject_visual_prompts(vit, 4, deep=True))
        >>> len(visual_prompts(vit)), len(vit.blocks[0]._forward_pre_hooks)
        (0, 0)
    """
    return unload(model, method="visual_prompts")
