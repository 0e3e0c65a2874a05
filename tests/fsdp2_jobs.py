"""Fits that ``tests/test_scale_out.py`` runs in one process and in two CPU processes under FSDP2 (gloo).

The module is written the way Lightning's FSDP2 docs show: ``fully_shard`` on each decoder layer and on the model,
inside ``configure_model``; it knows nothing about PEFT. Each ``fit_*`` function runs one scenario on ``devices``
processes and writes what the test compares under ``out/<scenario>/devices<N>/`` (rank 0 writes; each rank checks
its own shards). :func:`spawn` starts the two processes (spawn, not fork) and runs several scenarios in them, so a
test pays the start-up once. Imports stay light: each spawned process imports this module.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import socket
import time
from pathlib import Path

import lightning as L
import torch
import transformers as hf
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks import (
    AdaLoRACallback,
    AdapterCallback,
    ForgettingMonitor,
    FreezeBackbone,
    LayerwiseUnfreezing,
    LoRACallback,
    PEFTCallback,
    SlimCheckpoint,
)
from peft_callbacks.core.sharding import full_tensor, gather_state_dict, is_dtensor, is_writer
from peft_callbacks.engine import get_method, registered_methods

VOCAB, SEQ, BATCH = 64, 8, 2  # BATCH per process of two; one process takes 2 * BATCH


def tiny_llama() -> hf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = hf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,  # a task head of its own, trained beside LoRA
    )
    return hf.LlamaForCausalLM(config)


class LanguageModel(L.LightningModule):
    """A plain FSDP2 module: nothing in it knows about PEFT."""

    def __init__(self, build_in: str = "init", head_dtype=None) -> None:
        super().__init__()
        self.build_in, self.head_dtype = build_in, head_dtype
        self.model = tiny_llama() if build_in == "init" else None

    def configure_model(self) -> None:
        # the surgery right after this draws LoRA's A and the adapters' weights: the same numbers in every process,
        # whatever seeded the RNG before (Lightning re-seeds distributed processes from PL_GLOBAL_SEED if it is set)
        torch.manual_seed(1)
        if self.model is None:
            self.model = tiny_llama()
        if self.head_dtype is not None:
            self.model.lm_head.to(self.head_dtype)
        if self.device_mesh is None:  # one process: nothing to shard
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        # SGD with momentum: a state to resume, and updates that follow the gradient closely enough to compare
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5, momentum=0.9)


def token_data(devices: int, n: int = 16, seed: int = 1) -> DataLoader:
    """The same samples for any ``devices``: one process's batch = the two processes' batches together."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    rank = int(os.environ.get("LOCAL_RANK", 0)) if devices > 1 else 0
    return DataLoader(TensorDataset(ids[rank::devices]), batch_size=2 * BATCH // devices)


class Record(Callback):
    """Losses (averaged over ranks), the trainable set, and whether every frozen shard stayed bit-identical."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.trainable: list[str] = []
        self.frozen: dict[str, torch.Tensor] = {}
        self.frozen_identical: bool | None = None

    def on_fit_start(self, trainer, pl_module):
        self.trainable = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)
        self.frozen = {n: _local(p).clone() for n, p in pl_module.named_parameters() if not p.requires_grad}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))

    def on_train_end(self, trainer, pl_module):  # before the PEFT callback's merge: listed first
        params = dict(pl_module.named_parameters())
        self.frozen_identical = all(torch.equal(_local(params[n]), t) for n, t in self.frozen.items())


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if is_dtensor(p) else p.detach()


def make_trainer(devices: int, callbacks: list, root: Path, max_steps: int = 3, **kwargs) -> L.Trainer:
    if devices > 1:
        os.environ["WORLD_SIZE"] = str(devices)  # Lightning's environment drops it at teardown
        strategy = kwargs.pop("strategy", None) or ModelParallelStrategy(
            data_parallel_size=devices, tensor_parallel_size=1
        )
    else:
        strategy = "auto"
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("use_distributed_sampler", False)  # token_data gives each rank its share
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        **kwargs,
    )


def _folder(out: str, scenario: str, devices: int) -> Path:
    folder = Path(out) / scenario / f"devices{devices}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write(folder: Path, record: Record, module: L.LightningModule, **extra) -> None:
    """Rank 0 writes the figures; every rank must join the gather of the merged model."""
    merged = gather_state_dict(module.model)
    identical = torch.tensor(float(bool(record.frozen_identical)))
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(identical, op=torch.distributed.ReduceOp.MIN)  # every rank's shards
    if is_writer():
        torch.save(merged, folder / "merged.pt")
        figures = {"losses": record.losses, "trainable": record.trainable, "frozen_identical": bool(identical)}
        (folder / "figures.json").write_text(json.dumps({**figures, **extra}))


def base_loader() -> DataLoader:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (10, SEQ), generator=g)
    return DataLoader(TensorDataset(ids, ids), batch_size=2)  # 5 batches: next-token loss on a base set


def fit_lora(out: str, devices: int) -> None:
    """LoRA (rank 8) with an adapter file and merged weights, and a ForgettingMonitor on a base set."""
    folder = _folder(out, "lora", devices)
    record = Record()
    lora = LoRACallback(rank=8, save_adapter_to=str(folder / "adapter"), save_merged_to=str(folder / "merged"))
    monitor = ForgettingMonitor(base_loader(), metric="loss", every_n_steps=2, every_n_epochs=None, plot=False)
    module = LanguageModel()
    make_trainer(devices, [record, lora, monitor], folder).fit(module, token_data(devices))
    history = [{k: row[k] for k in ("step", "value", "kl_to_baseline", "feature_cosine")} for row in monitor.history]
    _write(folder, record, module, forgetting=history)


def fit_dora_frozen(out: str, devices: int) -> None:
    """DoRA on a model built inside configure_model, with the embeddings and first layer frozen."""
    folder = _folder(out, "dora", devices)
    record = Record()
    lora = LoRACallback(rank=4, use_dora=True, save_adapter_to=str(folder / "adapter"))
    module = LanguageModel(build_in="configure_model")
    make_trainer(devices, [record, lora, FreezeBackbone(freeze=2)], folder).fit(module, token_data(devices))
    _write(folder, record, module)


def fit_unfreezing(out: str, devices: int) -> None:
    """Layer-wise unfreezing of the base itself: the head first, then a layer more (a new param group) each epoch;
    then the same run resumed from its checkpoint after epoch 2 (two groups by then)."""
    folder = _folder(out, "unfreezing", devices)
    checkpoints = folder / "checkpoints"
    record = Record()
    callbacks = [record, LayerwiseUnfreezing(every_n_epochs=1, lr_decay=0.5)]
    callbacks.append(ModelCheckpoint(str(checkpoints), every_n_epochs=1, save_top_k=-1))
    trainer = make_trainer(devices, callbacks, folder, max_steps=-1, max_epochs=3, enable_checkpointing=True)
    trainer.fit(LanguageModel(), token_data(devices, n=8))
    groups = [len(g["params"]) for g in trainer.optimizers[0].param_groups]
    (path,) = [p for p in checkpoints.iterdir() if p.name.startswith("epoch=1-")]
    resumed_record = Record()
    resumed = make_trainer(
        devices,
        [resumed_record, LayerwiseUnfreezing(every_n_epochs=1, lr_decay=0.5)],
        folder,
        max_steps=-1,
        max_epochs=3,
    )
    module = LanguageModel()
    resumed.fit(module, token_data(devices, n=8), ckpt_path=str(path))
    resumed_groups = [len(g["params"]) for g in resumed.optimizers[0].param_groups]
    _write(folder, record, module, groups=groups, resumed_groups=resumed_groups, resumed_losses=resumed_record.losses)


def fit_bottleneck_slim(out: str, devices: int) -> None:
    """Bottleneck adapters with slim checkpoints: 2 steps, a checkpoint, then a new run resumed to 4 steps."""
    folder = _folder(out, "slim", devices)
    checkpoints = folder / "checkpoints"
    first = make_trainer(
        devices,
        [
            AdapterCallback(bottleneck=4),
            SlimCheckpoint(),
            ModelCheckpoint(dirpath=str(checkpoints), every_n_train_steps=2),
        ],
        folder,
        max_steps=2,
        enable_checkpointing=True,
    )
    trained = LanguageModel()
    first.fit(trained, token_data(devices))
    saved = _trained_values(trained)
    (path,) = [p for p in checkpoints.iterdir() if "step=2" in p.name]
    record, loaded = Record(), Loaded()
    callbacks = [record, AdapterCallback(bottleneck=4), SlimCheckpoint(), loaded]
    resumed = make_trainer(devices, callbacks, folder, max_steps=4)
    module = LanguageModel()
    resumed.fit(module, token_data(devices), ckpt_path=str(path))
    same = sorted(saved) == sorted(loaded.values) and all(torch.equal(saved[k], loaded.values[k]) for k in saved)
    _write(folder, record, module, checkpoint=str(path), global_step=resumed.global_step, resumed_weights=same)


def _trained_values(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The full values of the trained tensors (every rank joins each gather)."""
    return {n: full_tensor(p).detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class Loaded(Callback):
    """The trained tensors' values as a resumed fit starts (sharding strategies restore after ``on_fit_start``)."""

    def on_train_start(self, trainer, pl_module):
        self.values = _trained_values(pl_module)


def _write_refusal(folder: Path, trainer: L.Trainer, module: L.LightningModule, devices: int) -> None:
    """Fit, expecting a ValueError; rank 0 writes its message (empty: nothing was refused) to ``error.txt``."""
    try:
        trainer.fit(module, token_data(devices))
        message = ""
    except ValueError as err:
        message = str(err)
    if is_writer():
        (folder / "error.txt").write_text(message)


def fit_adalora(out: str, devices: int) -> None:
    """AdaLoRA's rank allocator needs every triplet and gradient whole: refused under FSDP2, naming what works."""
    folder = _folder(out, "adalora", devices)
    trainer = make_trainer(devices, [AdaLoRACallback(init_r=4, target_r=2, total_step=3)], folder, max_steps=1)
    _write_refusal(folder, trainer, LanguageModel(), devices)


def fit_mixed_dtypes(out: str, devices: int) -> None:
    """A root unit that would train a bfloat16 head beside float32 norms: refused before FSDP2 asserts."""
    folder = _folder(out, "mixed_dtypes", devices)
    trainer = make_trainer(devices, [FreezeBackbone(freeze=1)], folder, max_steps=1)
    _write_refusal(folder, trainer, LanguageModel(head_dtype=torch.bfloat16), devices)


def _plain_form(method: str, **kwargs) -> PEFTCallback:
    """``method`` in its plain form (the first example config it declares), through :class:`PEFTCallback`."""
    return PEFTCallback(next(iter(get_method(method).example_configs().values())), **kwargs)


# every other mergeable method of the registry that trains sharded: the same sharding path as LoRA's
METHODS = {
    name: functools.partial(_plain_form, name)
    for name in registered_methods()
    if name != "lora" and get_method(name).mergeable and get_method(name).shardable
}


def fit_method(method: str, out: str, devices: int) -> None:
    """One of :data:`METHODS` with an adapter file, merged at the end."""
    folder = _folder(out, method, devices)
    record = Record()
    callback = METHODS[method](save_adapter_to=str(folder / "adapter"))
    module = LanguageModel()
    make_trainer(devices, [record, callback], folder).fit(module, token_data(devices))
    _write(folder, record, module)


SCENARIOS = {
    **{name: functools.partial(fit_method, name) for name in METHODS},
    "lora": fit_lora,
    "dora": fit_dora_frozen,
    "unfreezing": fit_unfreezing,
    "slim": fit_bottleneck_slim,
    "adalora": fit_adalora,
    "mixed_dtypes": fit_mixed_dtypes,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, scenarios: list[str], out: str, world_size: int, port: int, registry: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    for name in scenarios:
        module, _, scenario = name.rpartition(":")  # "registry:scenario", or a scenario of `registry`
        importlib.import_module(module or registry).SCENARIOS[scenario](out, world_size)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def spawn(
    scenarios: list[str], out: str, world_size: int = 2, timeout: float = 900, registry: str = "fsdp2_jobs"
) -> None:
    """Run ``scenarios`` (names in the module ``registry``'s ``SCENARIOS``, or ``"module:name"``) in order in
    ``world_size`` fresh processes (gloo); raise if one fails or all take over ``timeout`` s."""
    context = torch.multiprocessing.spawn(
        _child, args=(scenarios, out, world_size, _free_port(), registry), nprocs=world_size, join=False
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{scenarios} did not finish in {timeout} s on {world_size} processes.")


# the scenarios `spawned_runs.py` runs on two processes: the last two are refusals that only sharding raises
SPAWNED = {2: ["lora", "dora", "unfreezing", "slim", *METHODS, "mixed_dtypes", "adalora"]}
