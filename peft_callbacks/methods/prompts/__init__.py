"""Prompt tuning: soft prompts for transformers models and visual prompts (VPT) for timm ViTs (plain PyTorch)."""

from peft_callbacks.methods.prompts.soft import (
    PromptTuningConfig,
    SoftPrompt,
    inject_prompt_tuning,
    remove_prompt_tuning,
    soft_prompts,
)
from peft_callbacks.methods.prompts.visual import (
    VisualPromptConfig,
    VisualPrompts,
    inject_visual_prompts,
    remove_visual_prompts,
    visual_prompts,
)

__all__ = [
    "PromptTuningConfig",
    "SoftPrompt",
    "VisualPromptConfig",
    "VisualPrompts",
    "inject_prompt_tuning",
    "inject_visual_prompts",
    "remove_prompt_tuning",
    "remove_visual_prompts",
    "soft_prompts",
    "visual_prompts",
]
