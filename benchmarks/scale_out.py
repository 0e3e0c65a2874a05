"""Per-rank memory and step time of a LoRA fit on CPU: one process, DDP×2, FSDP2×2, TP×2 and TP×2 × FSDP2×2, beside
what the memory model of ``peft_callbacks.core.memory`` predicts for the same shape.

The model is Llama-shaped (transformers ``LlamaForCausalLM``, about 100M parameters by default). Under
``ModelParallelStrategy`` the module applies, in ``configure_model``, transformers' own tensor-parallel plan for
Llama (``q/k/v/gate/up_proj`` column-parallel, ``o/down_proj`` row-parallel; embeddings row-parallel, the output
layer column-parallel with replicated logits) and ``fully_shard`` on each decoder layer and on the model when the
data-parallel size is above one, as Lightning's docs show. ``LoRACallback(rank=8)`` adapts every projection. Each
configuration runs in fresh processes (gloo, ``--threads`` threads each) and reports, per rank:

* bytes of the frozen base and of the trained tensors this rank holds (a ``DTensor`` counts its local slice);
* gradient bytes after the first backward, and AdamW state bytes after the first step;
* activations: the bytes autograd keeps for backward during one step (storages saved by the forward pass, the
  weights excluded), measured with ``torch.autograd.graph.saved_tensors_hooks``;
* the process's peak resident memory growth over the fit (``ru_maxrss`` minus the resident size before the model);
* the median step time over the steps after ``--warmup``.

Usage::

    python benchmarks/scale_out.py                             # all five, ~100M parameters, tables on stdout
    python benchmarks/scale_out.py --layers 2 --steps 2        # a quick run
    python benchmarks/scale_out.py --configs ddp tp2 --json r.json

All configurations run in one invocation, so their step times are comparable with each other (ratios to one
process); the machine's load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CONFIGS = {  # name: (processes, data-parallel size, tensor-parallel size, strategy)
    "single": (1, 1, 1, "auto"),
    "ddp": (2, 2, 1, "ddp"),
    "fsdp2": (2, 2, 1, "model_parallel"),
    "tp2": (2, 1, 2, "model_parallel"),
    "tp2_fsdp2": (4, 2, 2, "model_parallel"),
}
MODEL_STRATEGY = {"single": "ddp", "ddp": "ddp", "fsdp2": "fsdp2", "tp2": "tp_fsdp2", "tp2_fsdp2": "tp_fsdp2"}


def llama_config(args):
    import transformers as hf

    heads = args.hidden // 64
    return hf.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )


def parallelize(model, mesh, data_parallel: int, tensor_parallel: int) -> None:
    """transformers' tensor-parallel plan for Llama, then FSDP2 across the data-parallel ranks."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if tensor_parallel > 1:
        tp = mesh["tensor_parallel"]
        parallelize_module(
            model,
            tp,
            {
                "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
                "lm_head": ColwiseParallel(output_layouts=Replicate()),
            },
        )
        plan = {f"self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")}
        plan |= {"self_attn.o_proj": RowwiseParallel(), "mlp.down_proj": RowwiseParallel()}
        plan |= {f"mlp.{p}": ColwiseParallel() for p in ("gate_proj", "up_proj")}
        for layer in model.model.layers:
            parallelize_module(layer, tp, plan)
    if data_parallel > 1:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(model, mesh=mesh["data_parallel"])


def make_module(args, config: str):
    import lightning as L
    import torch
    import transformers as hf

    _, data_parallel, tensor_parallel, _ = CONFIGS[config]

    class LanguageModel(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = hf.LlamaForCausalLM(llama_config(args))

        def configure_model(self):
            if self.device_mesh is not None:
                parallelize(self.model, self.device_mesh, data_parallel, tensor_parallel)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    return LanguageModel()


def _local(tensor):
    from peft_callbacks.core.sharding import is_dtensor

    return tensor.to_local() if is_dtensor(tensor) else tensor


def _bytes(tensor) -> int:
    local = _local(tensor)
    return local.numel() * local.element_size()


class SavedForBackward:
    """Bytes of the storages the forward pass saves for backward (each storage once), weights excluded: every
    module's parameters, as they are when it runs (FSDP2's gathered ones, tensor-parallel slices), are skipped."""

    def __init__(self, model) -> None:
        self.model, self.weights, self.saved = model, set(), {}

    def _record_weights(self, module, args) -> None:
        self.weights.update(
            _local(p).untyped_storage().data_ptr() for p in module._parameters.values() if p is not None
        )

    def _pack(self, tensor):
        storage = _local(tensor).untyped_storage()
        if storage.data_ptr() not in self.weights:
            self.saved[storage.data_ptr()] = max(self.saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    def __enter__(self):
        import torch

        self.handles = [m.register_forward_pre_hook(self._record_weights) for m in self.model.modules()]
        self.context = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self.context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.context.__exit__(*exc)
        for handle in self.handles:
            handle.remove()

    @property
    def total(self) -> int:
        return sum(self.saved.values())


def make_probe(args):
    import lightning as L

    class Probe(L.Callback):
        """Bytes held per rank, the activations of one step, and step times."""

        def __init__(self):
            self.figures, self.times, self._start, self._meter = {}, [], 0.0, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._start = time.perf_counter()
            if batch_idx == args.warmup - 1:  # a step after the first: every lazy set-up done
                self._meter = SavedForBackward(pl_module).__enter__()

        def on_before_backward(self, trainer, pl_module, loss):
            if self._meter is not None:
                self._meter.__exit__(None, None, None)
                self.figures["activation_bytes"] = self._meter.total
                self._meter = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if "grad_bytes" not in self.figures:
                grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
                self.figures["grad_bytes"] = sum(_bytes(g) for g in grads)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._start)
            if "optimizer_bytes" not in self.figures:
                states = trainer.optimizers[0].state.values()
                self.figures["optimizer_bytes"] = sum(_bytes(v) for s in states for v in s.values() if v.dim())
                params = list(pl_module.parameters())
                self.figures["frozen_bytes"] = sum(_bytes(p) for p in params if not p.requires_grad)
                self.figures["trained_bytes"] = sum(_bytes(p) for p in params if p.requires_grad)

    return Probe()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(config: str, rank: int, args, port: int) -> dict | None:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from peft_callbacks import LoRACallback

    processes, data_parallel, tensor_parallel, strategy = CONFIGS[config]
    if processes > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            LOCAL_RANK=str(rank),
            NODE_RANK="0",
            WORLD_SIZE=str(processes),
        )
    if strategy == "model_parallel":
        strategy = ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=tensor_parallel)
    torch.set_num_threads(args.threads)
    before = _resident_bytes()
    group = rank // tensor_parallel  # the ranks of one tensor-parallel group read the same batch
    steps = args.warmup + args.steps
    ids = torch.randint(0, args.vocab, (args.batch * steps, args.seq), generator=torch.Generator().manual_seed(group))
    probe = make_probe(args)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=processes,
        strategy=strategy,
        max_steps=steps,
        callbacks=[LoRACallback(rank=8, merge_on_train_end=False), probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(make_module(args, config), DataLoader(TensorDataset(ids), batch_size=args.batch))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = {
        **probe.figures,
        "peak_growth_bytes": peak - before,
        "step_s": statistics.median(probe.times[args.warmup :]),
    }
    if processes == 1:
        return {"ranks": [mine]}
    gathered = [None] * processes
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
    import torch

    out = os.path.join(tempfile.mkdtemp(), f"{config}.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_child, args=(config, args, port, out), nprocs=CONFIGS[config][0], join=True)
    with open(out) as f:
        return json.load(f)


def predict(config: str, args):
    """The memory model's per-rank bytes for this configuration (float32 everywhere, as these CPU runs)."""
    from peft_callbacks.core.memory import LlamaShape, estimate_memory

    c = llama_config(args)
    shape = LlamaShape(
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
    )
    processes, _, tensor_parallel, _ = CONFIGS[config]
    return estimate_memory(
        shape,
        MODEL_STRATEGY[config],
        ranks=processes,
        tensor_parallel=tensor_parallel,
        rank=8,
        micro_batch=args.batch,
        sequence=args.seq,
        base_bytes=4,
        adapter_bytes=4,
        activation_bytes=4,
        sequence_parallel=False,  # transformers' plan: the norms run whole on every rank
        loss_parallel=False,  # and the logits are replicated (ColwiseParallel(output_layouts=Replicate()))
    )


def _mb(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def report(results: dict, args) -> None:
    print("\nMeasured per rank (MB; activations: saved for backward in one step; peak: RSS growth over the fit)")
    print(
        "| config | rank | frozen base | LoRA | gradients | AdamW | activations | peak | step s | step / one process |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    single = statistics.mean(r["step_s"] for r in results["single"]["ranks"]) if "single" in results else None
    for config, result in results.items():
        for rank, r in enumerate(result["ranks"]):
            ratio = f"{r['step_s'] / single:.2f}" if single else "-"
            cells = [r["frozen_bytes"], r["trained_bytes"], r["grad_bytes"], r["optimizer_bytes"]]
            cells += [r["activation_bytes"], r["peak_growth_bytes"]]
            print(f"| {config} | {rank} | " + " | ".join(map(_mb, cells)) + f" | {r['step_s']:.3f} | {ratio} |")
    print("\nModel (peft_callbacks.core.memory) against rank 0 (MB, measured / model)")
    print("| config | frozen base | gathered to compute | LoRA | gradients | AdamW | activations |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for config, result in results.items():
        r, e = result["ranks"][0], predict(config, args)
        pairs = [
            (r["frozen_bytes"], e.frozen_base),
            (None, e.gathered),
            (r["trained_bytes"], e.adapter),
            (r["grad_bytes"], e.gradients),
            (r["optimizer_bytes"], e.optimizer),
            (r["activation_bytes"], e.activations),
        ]
        cells = [_mb(m) if a is None else f"{_mb(a)} / {_mb(m)} ({a / m:.2f})" for a, m in pairs]
        print(f"| {config} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="sequences per data-parallel group and step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    print(f"load average before: {os.getloadavg()}")
    results = {config: measure(config, args) for config in args.configs}
    print(f"load average after:  {os.getloadavg()}")
    report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
