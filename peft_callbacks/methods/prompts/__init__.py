"""Prompt tuning: soft prompts for transformers models and visual prompts (VPT) for timm ViTs (plain PyTorch)."""

from peft_callbacks.prompts.soft import SoftPrompt, inject_prompt_tuning, remove_prompt_tuning, soft_prompts
from peft_callbacks.prompts.visual import (
    VisualPrompts,
    inject_visual_prompts,
    remove_visual_prompts,
    visual_prompts,
)

__all__ = [
    "SoftPrompt",
    "VisualPrompts",
    "inject_prompt_tuning",
    "inject_visual_prompts",
    "remove_prompt_tuning",
    "remove_visual_prompts",
    "soft_prompts",
    "visual_prompts",
]
