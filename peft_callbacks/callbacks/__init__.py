"""Lightning callbacks: thin glue that runs the surgery at the right hook."""

from peft_callbacks.callbacks.adalora import AdaLoRACallback
from peft_callbacks.callbacks.adapters import AdapterCallback
from peft_callbacks.callbacks.base import SurgeryCallback
from peft_callbacks.callbacks.finish import ForgettingAwareFinish
from peft_callbacks.callbacks.forgetting import ForgettingMonitor
from peft_callbacks.callbacks.freezing import FreezeBackbone, HeadOnly, HeadThenFull, LayerwiseUnfreezing
from peft_callbacks.callbacks.lora import LoRACallback
from peft_callbacks.callbacks.methods import LoHaCallback, LoKrCallback, OFTCallback
from peft_callbacks.callbacks.mitigation import DistillationCallback, ReplayCallback
from peft_callbacks.callbacks.peft import PEFTCallback
from peft_callbacks.callbacks.prompts import PromptTuningCallback, VisualPromptCallback
from peft_callbacks.callbacks.regularization import EWCCallback, L2SPCallback
from peft_callbacks.callbacks.slim_checkpoint import SlimCheckpoint
from peft_callbacks.callbacks.vera import VeRACallback

__all__ = [
    "AdaLoRACallback",
    "AdapterCallback",
    "DistillationCallback",
    "EWCCallback",
    "ForgettingAwareFinish",
    "L2SPCallback",
    "ReplayCallback",
    "ForgettingMonitor",
    "FreezeBackbone",
    "HeadOnly",
    "HeadThenFull",
    "LayerwiseUnfreezing",
    "LoHaCallback",
    "LoKrCallback",
    "LoRACallback",
    "OFTCallback",
    "PEFTCallback",
    "PromptTuningCallback",
    "SlimCheckpoint",
    "SurgeryCallback",
    "VeRACallback",
    "VisualPromptCallback",
]
