"""Lightning callbacks: thin glue that runs the surgery at the right hook."""

from peft_callbacks.callbacks.adalora import AdaLoRACallback
from peft_callbacks.callbacks.base import SurgeryCallback
from peft_callbacks.callbacks.budget import ForgettingBudget
from peft_callbacks.callbacks.finish import ForgettingAwareFinish
from peft_callbacks.callbacks.forgetting import ForgettingMonitor
from peft_callbacks.callbacks.freezing import FreezeBackbone, HeadOnly, HeadThenFull, LayerwiseUnfreezing
from peft_callbacks.callbacks.lora import LoRACallback, LoRATrainingOptions
from peft_callbacks.callbacks.method_callbacks import (
    AdapterCallback,
    IA3Callback,
    LoHaCallback,
    LoKrCallback,
    OFTCallback,
    PromptTuningCallback,
    VeRACallback,
    VisualPromptCallback,
)
from peft_callbacks.callbacks.mitigation import DistillationCallback, ReplayCallback
from peft_callbacks.callbacks.options import CallbackOptions, typed_callback
from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.callbacks.regularization import EWCCallback, L2SPCallback
from peft_callbacks.callbacks.slim_checkpoint import SlimCheckpoint
from peft_callbacks.callbacks.verify import MergeCheck

__all__ = [
    "AdaLoRACallback",
    "AdapterCallback",
    "CallbackOptions",
    "DistillationCallback",
    "EWCCallback",
    "ForgettingAwareFinish",
    "ForgettingBudget",
    "L2SPCallback",
    "ReplayCallback",
    "ForgettingMonitor",
    "FreezeBackbone",
    "HeadOnly",
    "HeadThenFull",
    "IA3Callback",
    "LayerwiseUnfreezing",
    "LoHaCallback",
    "LoKrCallback",
    "LoRACallback",
    "LoRATrainingOptions",
    "MergeCheck",
    "OFTCallback",
    "PEFTCallback",
    "PromptTuningCallback",
    "SlimCheckpoint",
    "SurgeryCallback",
    "VeRACallback",
    "VisualPromptCallback",
    "typed_callback",
]
