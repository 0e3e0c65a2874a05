"""Per-rank memory and step time of a LoRA fit: one process vs DDP vs FSDP2 (``ModelParallelStrategy``), on CPU.

The model is Llama-shaped (transformers ``LlamaForCausalLM``, about 100M parameters by default), built the way
Lightning's FSDP2 docs show: ``fully_shard`` on each decoder layer and on the model in ``configure_model`` (FSDP2
only). ``LoRACallback(rank=8)`` adapts every linear layer of the decoder. Each configuration runs in fresh processes
(gloo, ``--threads`` threads each) and reports, per rank:

* parameter bytes this rank holds, frozen base and trained tensors apart (a ``DTensor`` counts its local shard);
* gradient bytes after the first backward, and optimizer (AdamW) state bytes after the first step;
* the median step time over the steps after ``--warmup``.

Usage::

    python benchmarks/scale_out.py                       # all three, ~100M parameters, table on stdout
    python benchmarks/scale_out.py --layers 2 --steps 4  # a quick run
    python benchmarks/scale_out.py --json results.json   # also write the figures

The machine's load average is printed before and after: on a shared machine step times move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CONFIGS = {"single": 1, "ddp": 2, "fsdp2": 2}


def build_model(args):
    import torch
    import transformers as hf

    torch.manual_seed(0)
    config = hf.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    return hf.LlamaForCausalLM(config)


def make_module(args, shard: bool):
    import lightning as L
    import torch

    class LanguageModel(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model(args)

        def configure_model(self):
            if not shard:
                return
            from torch.distributed.fsdp import fully_shard

            for layer in self.model.model.layers:
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    return LanguageModel()


def _local_bytes(tensor) -> int:
    from peft_callbacks.core.sharding import is_dtensor

    local = tensor.to_local() if is_dtensor(tensor) else tensor
    return local.numel() * local.element_size()


def make_probe(args):
    import lightning as L

    class Probe(L.Callback):
        """Bytes held per rank and step times."""

        def __init__(self):
            self.figures = {}
            self.times = []
            self._start = 0.0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if "grad_bytes" not in self.figures:
                self.figures["grad_bytes"] = sum(
                    _local_bytes(p.grad) for p in pl_module.parameters() if p.grad is not None
                )

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._start)
            if "optimizer_bytes" not in self.figures:
                optimizer = trainer.optimizers[0]
                self.figures["optimizer_bytes"] = sum(
                    _local_bytes(v) for state in optimizer.state.values() for v in state.values() if hasattr(v, "numel")
                )
                params = list(pl_module.parameters())
                self.figures["frozen_bytes"] = sum(_local_bytes(p) for p in params if not p.requires_grad)
                self.figures["trained_bytes"] = sum(_local_bytes(p) for p in params if p.requires_grad)
                self.figures["parameters"] = sum(p.numel() for p in params)

    return Probe()


def run(config: str, rank: int, args, port: int) -> dict | None:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from peft_callbacks import LoRACallback

    devices = CONFIGS[config]
    if devices > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2"
        )
    torch.set_num_threads(args.threads)
    strategy = {"single": "auto", "ddp": "ddp", "fsdp2": None}[config]
    if config == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    g = torch.Generator().manual_seed(rank)
    steps = args.warmup + args.steps
    ids = torch.randint(0, args.vocab, (args.batch * steps, args.seq), generator=g)
    probe = make_probe(args)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        callbacks=[LoRACallback(rank=8, merge_on_train_end=False), probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(make_module(args, shard=config == "fsdp2"), DataLoader(TensorDataset(ids), batch_size=args.batch))
    mine = {**probe.figures, "step_s": statistics.median(probe.times[args.warmup :])}
    if devices == 1:
        return {"ranks": [mine]}
    gathered = [None] * devices
    torch.distributed.all_gather_object(gathered, mine)
    return {"ranks": gathered} if rank == 0 else None


def _child(rank: int, config: str, args, port: int, out: str) -> None:
    import torch

    result = run(config, rank, args, port)
    if result is not None:
        with open(out, "w") as f:
            json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def measure(config: str, args) -> dict:
    import tempfile

    import torch

    out = os.path.join(tempfile.mkdtemp(), f"{config}.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_child, args=(config, args, port, out), nprocs=CONFIGS[config], join=True)
    with open(out) as f:
        return json.load(f)


def _mb(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="sequences per process and step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    print(f"load average before: {os.getloadavg()}")
    results = {config: measure(config, args) for config in args.configs}
    print(f"load average after:  {os.getloadavg()}")
    rows = []
    for config, result in results.items():
        for rank, r in enumerate(result["ranks"]):
            total = r["frozen_bytes"] + r["trained_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
            rows.append(
                f"{config:7s} {rank:4d} {r['parameters'] / 1e6:8.1f} {_mb(r['frozen_bytes']):>10s} "
                f"{_mb(r['trained_bytes']):>9s} {_mb(r['grad_bytes']):>8s} {_mb(r['optimizer_bytes']):>9s} "
                f"{_mb(total):>9s} {r['step_s']:8.3f}"
            )
    print("config  rank  params M  frozen MB  train MB  grad MB  optim MB  total MB  step s")
    print("\n".join(rows))
    if "ddp" in results and "fsdp2" in results:
        ddp = statistics.mean(r["step_s"] for r in results["ddp"]["ranks"])
        fsdp2 = statistics.mean(r["step_s"] for r in results["fsdp2"]["ranks"])
        frozen = results["fsdp2"]["ranks"][0]["frozen_bytes"] / results["ddp"]["ranks"][0]["frozen_bytes"]
        print(f"FSDP2 / DDP: step time x{fsdp2 / ddp:.2f}, frozen base per rank x{frozen:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
