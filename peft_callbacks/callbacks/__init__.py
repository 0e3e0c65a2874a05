"""Lightning callbacks: thin glue that runs the surgery at the right hook."""

from peft_callbacks.callbacks.base import (
    SurgeryCallback,
    remove_scheduled_hooks,
    run_after_configure_model,
    run_after_hook,
)
from peft_callbacks.callbacks.lora import LoRACallback

__all__ = [
    "LoRACallback",
    "SurgeryCallback",
    "remove_scheduled_hooks",
    "run_after_configure_model",
    "run_after_hook",
]
