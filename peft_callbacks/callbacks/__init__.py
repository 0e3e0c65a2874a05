"""Lightning callbacks: thin glue that runs the surgery at the right hook."""

from peft_callbacks.callbacks.adapters import AdapterCallback
from peft_callbacks.callbacks.base import (
    PermanentSurgeryCallback,
    SurgeryCallback,
    remove_scheduled_hooks,
    run_after_configure_model,
    run_after_hook,
)
from peft_callbacks.callbacks.lora import LoRACallback
from peft_callbacks.callbacks.prompts import PromptTuningCallback, VisualPromptCallback

__all__ = [
    "AdapterCallback",
    "LoRACallback",
    "PermanentSurgeryCallback",
    "PromptTuningCallback",
    "SurgeryCallback",
    "VisualPromptCallback",
    "remove_scheduled_hooks",
    "run_after_configure_model",
    "run_after_hook",
]
