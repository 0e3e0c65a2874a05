"""Check LoRACallback under Lightning's sharding strategies on a CUDA machine: FSDP1, FSDP2 and DeepSpeed ZeRO-3.

``FSDPStrategy`` and ``DeepSpeedStrategy`` need CUDA in Lightning, so the test suite (CPU) cannot run them; this
script does, on every GPU of the machine (one is enough: the sharded code paths run with one rank too). For each
strategy it runs, each step in fresh processes (Lightning launches the ranks):

1. **fit**: a Llama-shaped model (transformers ``LlamaForCausalLM``) + ``LoRACallback(rank=8, save_adapter_to=...,
   save_merged_to=...)``, 4 steps, a checkpoint after each epoch (2 steps); the losses must equal a single-GPU fit
   on the same samples;
2. **adapter file**: written by rank 0; loaded into a plain CPU model it must give the single-GPU adapter's outputs;
3. **merge**: the merged weights written by rank 0 must equal the single-GPU merge;
4. **resume**: a new fit from the checkpoint written after the first epoch must match the same resume on one GPU
   (losses and the final adapter).

It ends with a PASS/FAIL/SKIP table and exits non-zero if a check failed. DeepSpeed is installed with pip when
missing (SKIP if that fails). ``--accelerator cpu --strategies fsdp2`` runs the FSDP2 part on CPU (gloo), which is
how the script itself is tested where no GPU is at hand.

Usage::

    python benchmarks/check_cuda_strategies.py                          # all three, every GPU
    python benchmarks/check_cuda_strategies.py --strategies fsdp1 --devices 2
    python benchmarks/check_cuda_strategies.py --accelerator cpu --strategies fsdp2 --devices 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

STRATEGIES = ["fsdp1", "fsdp2", "deepspeed"]
VOCAB, SEQ, HIDDEN, LAYERS = 512, 32, 256, 4
GLOBAL_BATCH, STEPS_PER_EPOCH = 8, 2
TOLERANCE = 2e-4  # float32 on GPU, TF32 off: sharded and single-GPU reductions differ in order only


def build_model():
    import torch
    import transformers as hf

    torch.manual_seed(0)
    config = hf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HIDDEN // 64,
        num_key_value_heads=HIDDEN // 64,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    return hf.LlamaForCausalLM(config)


def make_module(strategy: str):
    import lightning as L
    import torch

    class LanguageModel(L.LightningModule):
        """Built in __init__ (as DeepSpeed ZeRO-3 with surgery needs); FSDP2 shards in configure_model."""

        def __init__(self):
            super().__init__()
            self.model = build_model()

        def configure_model(self):
            if strategy != "fsdp2":
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
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5, momentum=0.9)

    return LanguageModel()


def make_strategy(strategy: str, devices: int):
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if strategy == "fsdp1":
        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})  # use_orig_params=True, Lightning's default
    if strategy == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    if strategy == "deepspeed":
        return DeepSpeedStrategy(stage=3)
    return "auto"


def data(devices: int):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH * STEPS_PER_EPOCH, SEQ), generator=g)
    rank = int(os.environ.get("LOCAL_RANK", 0)) if devices > 1 else 0
    return DataLoader(TensorDataset(ids[rank::devices]), batch_size=GLOBAL_BATCH // devices)


def worker(args) -> None:
    """One phase of one strategy; Lightning starts the other ranks by running this script again."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from peft_callbacks import LoRACallback

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    devices = 1 if args.worker == "reference" else args.devices
    losses: list[float] = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))

    resume = args.phase == "resume"
    lora = LoRACallback(
        rank=8,
        save_adapter_to=str(out / ("adapter_resumed" if resume else "adapter")),
        save_merged_to=None if resume else str(out / "merged"),
        merge_on_train_end=not resume,
    )
    callbacks = [Losses(), lora]
    if not resume:
        callbacks.append(ModelCheckpoint(str(out / "checkpoints"), every_n_epochs=1, save_top_k=-1))
    else:
        callbacks.append(ModelCheckpoint(str(out / "resumed_checkpoints")))  # keeps the first fit's folder as it was
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        strategy=make_strategy(args.worker, devices),
        precision="32-true",
        max_steps=2 * STEPS_PER_EPOCH,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=str(out),
    )
    checkpoint = None
    if resume:
        (checkpoint,) = [str(p) for p in (out / "checkpoints").iterdir() if p.name.startswith("epoch=0-")]
    trainer.fit(make_module(args.worker), data(devices), ckpt_path=checkpoint)
    if trainer.is_global_zero:
        (out / f"{args.phase}.json").write_text(
            json.dumps({"losses": losses, "trainable": lora.parameter_count.trainable})
        )


def run_worker(strategy: str, phase: str, out: Path, args) -> tuple[bool, str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", strategy, "--phase", phase]
    command += ["--out", str(out), "--devices", str(args.devices), "--accelerator", args.accelerator]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    (out / f"{phase}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return False, f"exit {done.returncode}; last lines:\n" + "\n".join(
            (done.stdout + done.stderr).splitlines()[-15:]
        )
    return True, ""


def adapter_outputs(folder: Path):
    import torch

    from peft_callbacks import load_adapter

    model = load_adapter(build_model(), folder).eval()
    ids = torch.arange(2 * SEQ).reshape(2, SEQ) % VOCAB
    with torch.no_grad():
        return model(input_ids=ids).logits


def largest_difference(a: dict, b: dict) -> float:
    if sorted(a) != sorted(b):
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def ensure_deepspeed() -> str | None:
    """``None`` when DeepSpeed imports (installing it with pip if needed), else why not."""
    try:
        import deepspeed  # noqa: F401

        return None
    except ImportError:
        pass
    done = subprocess.run([sys.executable, "-m", "pip", "install", "deepspeed"], capture_output=True, text=True)
    if done.returncode != 0:
        return "DeepSpeed is not installed and `pip install deepspeed` failed: " + done.stderr.strip()[-300:]
    return None


def check(args) -> int:
    from safetensors.torch import load_file

    root = Path(args.out or tempfile.mkdtemp(prefix="check_strategies_"))
    rows: list[tuple[str, str, str, str]] = []
    reference = root / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    reference.mkdir(parents=True)
    for phase in ("fit", "resume"):
        ok, why = run_worker("reference", phase, reference, args)
        if not ok:
            print(f"The single-device reference {phase} failed ({why}); see {reference}/{phase}.log.")
            return 2
    ref = json.loads((reference / "fit.json").read_text())
    ref_resume = json.loads((reference / "resume.json").read_text())
    ref_outputs = adapter_outputs(reference / "adapter")
    ref_resumed_outputs = adapter_outputs(reference / "adapter_resumed")
    ref_merged = load_file(str(reference / "merged" / "model.safetensors"))
    for strategy in args.strategies:
        out = root / strategy
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        missing = ensure_deepspeed() if strategy == "deepspeed" else None
        if missing or (args.accelerator == "cpu" and strategy != "fsdp2"):
            why = missing or "needs CUDA in Lightning"
            rows += [(strategy, name, "SKIP", why) for name in ("fit", "adapter file", "merge", "resume")]
            continue
        ok, why = run_worker(strategy, "fit", out, args)
        if not ok:
            rows.append((strategy, "fit", "FAIL", why))
            rows += [(strategy, name, "SKIP", "the fit failed") for name in ("adapter file", "merge", "resume")]
            continue
        fit = json.loads((out / "fit.json").read_text())
        gap = max(abs(a - b) for a, b in zip(fit["losses"], ref["losses"]))
        same = len(fit["losses"]) == len(ref["losses"]) and gap <= TOLERANCE and fit["trainable"] == ref["trainable"]
        rows.append((strategy, "fit", "PASS" if same else "FAIL", f"losses {fit['losses']} vs {ref['losses']}"))
        rows.append(_compare(strategy, "adapter file", lambda o=out: adapter_outputs(o / "adapter"), ref_outputs))
        merged = lambda o=out: load_file(str(o / "merged" / "model.safetensors"))  # noqa: E731
        rows.append(_compare_dicts(strategy, "merge", merged, ref_merged))
        ok, why = run_worker(strategy, "resume", out, args)
        if not ok:
            rows.append((strategy, "resume", "FAIL", why))
            continue
        resume = json.loads((out / "resume.json").read_text())
        row = _compare(strategy, "resume", lambda o=out: adapter_outputs(o / "adapter_resumed"), ref_resumed_outputs)
        gap = max(abs(a - b) for a, b in zip(resume["losses"], ref_resume["losses"]))
        if row[2] == "PASS" and (len(resume["losses"]) != len(ref_resume["losses"]) or gap > TOLERANCE):
            row = (strategy, "resume", "FAIL", f"losses {resume['losses']} vs {ref_resume['losses']}")
        rows.append(row)
    width = max(len(r[3].splitlines()[0]) for r in rows) if rows else 0
    print(f"\n{'strategy':10s} {'check':13s} result  detail")
    for strategy, name, result, detail in rows:
        print(f"{strategy:10s} {name:13s} {result:6s}  {detail.splitlines()[0][:width]}")
        for line in detail.splitlines()[1:]:
            print(f"{'':32s}{line}")
    failed = [r for r in rows if r[2] == "FAIL"]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed or skipped; {len(failed)} failed. Logs: {root}")
    return 1 if failed else 0


def _compare(strategy: str, name: str, produce, expected) -> tuple[str, str, str, str]:
    try:
        value = produce()
    except Exception:
        return strategy, name, "FAIL", traceback.format_exc(limit=2)
    gap = float((value - expected).abs().max())
    return strategy, name, "PASS" if gap <= TOLERANCE * 10 else "FAIL", f"largest output difference {gap:.2e}"


def _compare_dicts(strategy: str, name: str, produce, expected) -> tuple[str, str, str, str]:
    try:
        value = produce()
    except Exception:
        return strategy, name, "FAIL", traceback.format_exc(limit=2)
    gap = largest_difference(value, expected)
    return strategy, name, "PASS" if gap <= TOLERANCE else "FAIL", f"largest weight difference {gap:.2e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    parser.add_argument("--devices", type=int, default=0, help="GPUs (processes) per strategy; 0: all GPUs")
    parser.add_argument("--accelerator", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", help="folder for checkpoints, files and logs (default: a new temporary folder)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per fit")
    parser.add_argument("--worker", choices=[*STRATEGIES, "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["fit", "resume"], default="fit", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.devices == 0:
        import torch

        args.devices = max(torch.cuda.device_count(), 1) if args.accelerator == "cuda" else 2
    if args.worker:
        worker(args)
        return 0
    if args.accelerator == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("No CUDA device here: run with `--accelerator cpu --strategies fsdp2` to check the FSDP2 part.")
            return 2
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
