"""Save and load fine-tunes: adapter files, slim checkpoints, full weights and HF PEFT directories (plain PyTorch)."""

from peft_callbacks.io.adapter_file import AdapterFileError, load_adapter, read_adapter_config, save_adapter
from peft_callbacks.io.fingerprint import base_fingerprint, compare_fingerprints
from peft_callbacks.io.peft_format import export_peft, import_peft
from peft_callbacks.io.slim import SlimCheckpointError, fill_slim_state_dict, slim_state_dict
from peft_callbacks.io.state import base_state, trained_state
from peft_callbacks.io.weights import save_state_dict, save_weights

__all__ = [
    "AdapterFileError",
    "SlimCheckpointError",
    "base_fingerprint",
    "base_state",
    "compare_fingerprints",
    "export_peft",
    "fill_slim_state_dict",
    "import_peft",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
    "save_state_dict",
    "save_weights",
    "slim_state_dict",
    "trained_state",
]
