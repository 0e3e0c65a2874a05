"""Slim checkpoints that change strategy (``tests/test_strategy_change.py``): a LoRA fit writes a ``SlimCheckpoint``
after 2 steps (2 epochs of one step) under one strategy, and a new fit resumes it under another to step 4.

* ``first_fsdp2`` / ``first_ddp``: the first 2 steps on two processes, FSDP2 (a distributed folder) or DDP (a file);
* ``fsdp2_to_ddp`` / ``ddp_to_fsdp2``: the last 2 steps on two processes under the other strategy;
* ``llama_fsdp2_to_fsdp2``: the FSDP2 folder of two ranks resumed on four;
* :func:`resume` on one process (the test process) resumes the FSDP2 folder; :func:`uninterrupted` is the reference.

Each comes for a float32 Llama (``llama``) and for the same Llama loaded 4-bit (``qlora``, bitsandbytes NF4 with its
storage type the model's dtype, as PEFT's FSDP + QLoRA guide sets ``bnb_4bit_quant_storage``), whose weights are
saved by the test beforehand under ``out/tiny_llama``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import transformers as hf
from fsdp2_jobs import LanguageModel, Record, _folder, make_trainer, tiny_llama, token_data
from lightning.pytorch.callbacks import ModelCheckpoint

from peft_callbacks import LoRACallback, SlimCheckpoint
from peft_callbacks.core.sharding import is_writer

BASES = ("llama", "qlora")


def save_base(out: str) -> None:
    """The Llama's weights, saved for ``from_pretrained`` (no model hub)."""
    tiny_llama().save_pretrained(Path(out) / "tiny_llama")


class QuantizedLanguageModel(LanguageModel):
    """The same module with its Llama loaded 4-bit, as users load large models."""

    def __init__(self, out: str) -> None:
        super().__init__(build_in="later")
        config = hf.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=torch.float32,  # FSDP shards the packed weights as the model's dtype
        )
        hf.logging.set_verbosity_error()
        self.model = hf.AutoModelForCausalLM.from_pretrained(
            Path(out) / "tiny_llama", quantization_config=config, dtype=torch.float32
        )


def module(base: str, out: str) -> LanguageModel:
    return QuantizedLanguageModel(out) if base == "qlora" else LanguageModel()


def _strategy(strategy: str, devices: int) -> dict:
    return {"strategy": "ddp"} if strategy == "ddp" and devices > 1 else {}


def _lora(base: str, folder: Path | None = None) -> LoRACallback:
    """LoRA r = 8; with a ``folder``, the adapter saved and the model merged (a 4-bit base into a float32 model) and
    saved at the end."""
    if folder is None:
        return LoRACallback(rank=8, merge_on_train_end=False)
    merged = {"merged_dtype": "float32"} if base == "qlora" else {}
    saved = {"save_adapter_to": str(folder / "adapter"), "save_merged_to": str(folder / "merged")}
    return LoRACallback(rank=8, **saved, **merged)


def first(base: str, strategy: str, out: str, devices: int) -> None:
    """Two steps and a slim checkpoint after the second."""
    folder = _folder(out, f"{base}_first_{strategy}", devices)
    checkpoints = ModelCheckpoint(dirpath=str(folder / "checkpoints"), every_n_epochs=1, save_on_train_epoch_end=True)
    callbacks = [Record(), _lora(base), SlimCheckpoint(), checkpoints]
    trainer = make_trainer(
        devices, callbacks, folder, max_steps=2, enable_checkpointing=True, **_strategy(strategy, devices)
    )
    trainer.fit(module(base, out), data(devices))


def data(devices: int):
    """One step per epoch (one global batch of 4 sequences): the checkpoint after the second epoch resumes at the
    start of the third, and every run sees the same batch at every step (Lightning restarts a resumed epoch that a
    plain DataLoader cannot resume)."""
    return token_data(devices, n=4)


def checkpoint_of(out: str, base: str, strategy: str) -> Path:
    (path,) = (Path(out) / f"{base}_first_{strategy}" / "devices2" / "checkpoints").iterdir()
    return path


def resume(base: str, source: str, strategy: str, out: str, devices: int) -> None:
    """Steps 3 and 4 from the checkpoint ``source`` wrote, under ``strategy`` on ``devices`` processes."""
    folder = _folder(out, f"{base}_{source}_to_{strategy}", devices)
    record = Record()
    trainer = make_trainer(
        devices, [record, _lora(base, folder), SlimCheckpoint()], folder, max_steps=4, **_strategy(strategy, devices)
    )
    trainer.fit(module(base, out), data(devices), ckpt_path=str(checkpoint_of(out, base, source)))
    _figures(folder, record, global_step=trainer.global_step)


def uninterrupted(base: str, out: str) -> None:
    """The reference: four steps on one process, no checkpoint."""
    folder = _folder(out, f"{base}_uninterrupted", 1)
    record = Record()
    make_trainer(1, [record, _lora(base, folder)], folder, max_steps=4).fit(module(base, out), data(1))
    _figures(folder, record, global_step=4)


def _figures(folder: Path, record: Record, **extra) -> None:
    if is_writer():
        (folder / "figures.json").write_text(json.dumps({"losses": record.losses, **extra}))


SCENARIOS = {}
for _base in BASES:
    SCENARIOS[f"{_base}_first_fsdp2"] = functools.partial(first, _base, "fsdp2")
    SCENARIOS[f"{_base}_first_ddp"] = functools.partial(first, _base, "ddp")
    SCENARIOS[f"{_base}_fsdp2_to_ddp"] = functools.partial(resume, _base, "fsdp2", "ddp")
    SCENARIOS[f"{_base}_ddp_to_fsdp2"] = functools.partial(resume, _base, "ddp", "fsdp2")
SCENARIOS["llama_fsdp2_to_fsdp2"] = functools.partial(resume, "llama", "fsdp2", "fsdp2")  # 2 ranks' folder on 4
# first the checkpoints, then the resumes that read them (same processes, in this order; four after two)
SPAWNED = {
    2: [f"{b}_{name}" for b in BASES for name in ("first_fsdp2", "first_ddp", "fsdp2_to_ddp", "ddp_to_fsdp2")],
    4: ["llama_fsdp2_to_fsdp2"],
}
