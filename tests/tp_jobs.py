"""Fits that ``tests/test_tensor_parallel.py`` runs in one process, in two CPU processes under tensor parallelism
(``ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)``) and in four under TP × FSDP2
(``data_parallel_size=2, tensor_parallel_size=2``), gloo.

The module applies the plan of Lightning's tensor-parallel example in ``configure_model``
(:func:`tp_model.parallelize`) and knows nothing about PEFT. Each scenario writes what the test compares under
``out/<scenario>/devices<N>/`` (rank 0 writes); the one-process references are the scenarios' methods run on one
process. :func:`fsdp2_jobs.spawn` starts the processes (``registry="tp_jobs"``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from fsdp2_jobs import Record, _folder, _write, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset
from tp_model import SEQ, VOCAB, parallelize, tiny_transformer

from peft_callbacks import AdapterCallback, IA3Config, LoHaConfig, LoRACallback, PEFTCallback, SlimCheckpoint

GLOBAL_BATCH, STEPS = 4, 3


class TransformerModule(L.LightningModule):
    """Lightning's tensor-parallel example module: the plan applied in ``configure_model``, nothing about PEFT."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_transformer()

    def configure_model(self) -> None:
        torch.manual_seed(1)  # the adapters drawn right after this: the same numbers on every rank
        if self.device_mesh is not None:
            parallelize(self.model, self.device_mesh)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self.model(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5, momentum=0.9)


def data(data_parallel: int) -> DataLoader:
    """The same samples on any mesh: the ranks of one tensor-parallel group read the same batch, data-parallel
    groups split it (one process reads all of it)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH * STEPS, SEQ), generator=g)
    tensor_parallel = max(int(os.environ.get("WORLD_SIZE", 1)) // data_parallel, 1)
    group = int(os.environ.get("LOCAL_RANK", 0)) // tensor_parallel if data_parallel > 1 else 0
    return DataLoader(TensorDataset(ids[group::data_parallel]), batch_size=GLOBAL_BATCH // data_parallel)


METHODS = {  # on the transformer inside the module: its adapter file loads into a plain Transformer
    "lora": lambda **kw: LoRACallback(rank=8, module="model", **kw),
    "dora": lambda **kw: LoRACallback(rank=4, use_dora=True, module="model", **kw),
    "ia3": lambda **kw: PEFTCallback(IA3Config(), module="model", **kw),
}


def _strategy(devices: int, data_parallel: int) -> dict:
    if devices == 1:
        return {}
    tensor_parallel = devices // data_parallel
    return {"strategy": ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=tensor_parallel)}


def fit(method: str, data_parallel: int, out: str, devices: int) -> None:
    """``method`` with an adapter file (and for LoRA merged weights and a slim checkpoint), merged at the end; on one
    process the reference every mesh is compared with."""
    data_parallel = 1 if devices == 1 else data_parallel
    folder = _folder(out, method if devices == 1 else f"{method}_dp{data_parallel}", devices)
    record = Record()
    merged = {"save_merged_to": str(folder / "merged")} if method == "lora" else {}
    callbacks = [record, METHODS[method](save_adapter_to=str(folder / "adapter"), **merged)]
    if method == "lora":  # and a slim checkpoint after the last step (optimizer state in the adapters' layout)
        callbacks += [SlimCheckpoint(), ModelCheckpoint(str(folder / "checkpoints"), every_n_train_steps=STEPS)]
    module = TransformerModule()
    trainer = make_trainer(
        devices, callbacks, folder, max_steps=STEPS, enable_checkpointing=True, **_strategy(devices, data_parallel)
    )
    trainer.fit(module, data(data_parallel))
    with torch.no_grad():  # the merged model, its parallel styles' hooks back on the base layers
        outputs = module.model(torch.arange(2 * SEQ).reshape(2, SEQ) % VOCAB)
    _write(folder, record, module, merged_outputs=outputs.tolist())


REFUSED = {  # methods that cannot follow a tensor-parallel split
    # LoHa's Hadamard product of two low-rank factors: no split follows a column- or row-parallel base
    "loha_refused": lambda: PEFTCallback(LoHaConfig(rank=4, alpha=4), module="model"),
    # bottleneck adapters would train on each rank's slice of the activations, with no reduction of their gradients
    "bottleneck_refused": lambda: AdapterCallback(bottleneck=4, modules=["feed_forward"], module="model"),
}


def fit_refused(name: str, out: str, devices: int) -> None:
    """A method of :data:`REFUSED`: refused before the first step, naming the layer and the method."""
    folder = _folder(out, name, devices)
    callback = REFUSED[name]()
    trainer = make_trainer(devices, [callback], folder, max_steps=1, **_strategy(devices, 1))
    try:
        trainer.fit(TransformerModule(), data(1))
        message = ""
    except ValueError as err:
        message = str(err)
    _write_refusal_text(folder, message)


def _write_refusal_text(folder: Path, message: str) -> None:
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        (folder / "error.txt").write_text(message)


SCENARIOS = {
    **{name: functools.partial(fit, name, 1) for name in METHODS},
    **{f"{name}_2d": functools.partial(fit, name, 2) for name in METHODS},
    **{name: functools.partial(fit_refused, name) for name in REFUSED},
}
SPAWNED = {2: [*METHODS, *REFUSED], 4: [f"{name}_2d" for name in METHODS]}
