"""Check LoRACallback under Lightning's sharding strategies on a CUDA machine: FSDP1, FSDP2, DeepSpeed ZeRO-3,
tensor parallelism (TP, and TP × FSDP2), and QLoRA under FSDP2.

``FSDPStrategy`` and ``DeepSpeedStrategy`` need CUDA in Lightning, so the test suite (CPU) cannot run them; this
script does, on every GPU of the machine (one is enough: the sharded code paths run with one rank too; TP × FSDP2
needs four). TP and QLoRA + FSDP2 run on CPU in the test suite; here they run with NCCL and bitsandbytes' CUDA
kernels. TP applies transformers' tensor-parallel plan for Llama in ``configure_model``
(``benchmarks/scale_out.py``); QLoRA loads the same Llama 4-bit (NF4, float32 storage and compute, as PEFT's FSDP +
QLoRA guide sets ``bnb_4bit_quant_storage`` to the model's dtype) and is compared with a single-GPU QLoRA run. For
each strategy it runs, each step in fresh processes (Lightning launches the ranks):

1. **fit**: a Llama-shaped model (transformers ``LlamaForCausalLM``) + ``LoRACallback(rank=8, save_adapter_to=...,
   save_merged_to=...)``, 4 steps, a checkpoint after each epoch (2 steps); the losses must equal a single-GPU fit
   on the same samples;
2. **adapter file**: written by rank 0; loaded into a plain CPU model it must give the single-GPU adapter's outputs;
3. **merge**: the merged weights written by rank 0 must equal the single-GPU merge;
4. **resume**: a new fit from the checkpoint written after the first epoch must match the same resume on one GPU
   (losses and the final adapter).

It ends with a PASS/FAIL/SKIP table and exits non-zero if a check failed. DeepSpeed is installed with pip when
missing (SKIP if that fails). ``--accelerator cpu --strategies fsdp2 tp qlora_fsdp2`` runs those parts on CPU
(gloo), which is how the script itself is tested where no GPU is at hand.

Usage::

    python benchmarks/check_cuda_strategies.py                          # all six, every GPU
    python benchmarks/check_cuda_strategies.py --strategies fsdp1 --devices 2
    python benchmarks/check_cuda_strategies.py --strategies tp tp_fsdp2 qlora_fsdp2 --devices 4
    python benchmarks/check_cuda_strategies.py --accelerator cpu --strategies fsdp2 tp qlora_fsdp2 --devices 2
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

STRATEGIES = ["fsdp1", "fsdp2", "deepspeed", "tp", "tp_fsdp2", "qlora_fsdp2"]
CPU_STRATEGIES = ("fsdp2", "tp", "tp_fsdp2", "qlora_fsdp2")  # what Lightning also runs on CPU
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


def load_quantized(base: str):
    """The Llama saved in ``base``, loaded 4-bit (NF4, double quantization; storage and compute in float32)."""
    import torch
    import transformers as hf

    config = hf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,
    )
    return hf.AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.float32)


def make_module(strategy: str, base: str):
    import lightning as L
    import torch

    from benchmarks.scale_out import parallelize

    class LanguageModel(L.LightningModule):
        """Built in __init__ (as DeepSpeed ZeRO-3 with surgery needs); ModelParallelStrategy's plans are applied in
        configure_model (FSDP2, TP, both)."""

        def __init__(self):
            super().__init__()
            self.model = load_quantized(base) if strategy.startswith("qlora") else build_model()

        def configure_model(self):
            torch.manual_seed(1)  # LoRA's A is drawn right after this: the same numbers in every run and rank
            if self.device_mesh is None:
                return
            sizes = self.device_mesh.shape  # (data_parallel, tensor_parallel)
            parallelize(self.model, self.device_mesh, sizes[0], sizes[1])

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
    if strategy in ("fsdp2", "qlora_fsdp2"):
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    if strategy == "tp":
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=devices)
    if strategy == "tp_fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=devices // 2)
    if strategy == "deepspeed":
        return DeepSpeedStrategy(stage=3)
    return "auto"


def data(devices: int, data_parallel: int):
    """The same samples on any mesh: a tensor-parallel group reads one batch, data-parallel groups split it."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH * STEPS_PER_EPOCH, SEQ), generator=g)
    group = int(os.environ.get("LOCAL_RANK", 0)) // (devices // data_parallel) if devices > 1 else 0
    return DataLoader(TensorDataset(ids[group::data_parallel]), batch_size=GLOBAL_BATCH // data_parallel)


def data_parallel_size(strategy: str, devices: int) -> int:
    return {"tp": 1, "tp_fsdp2": 2}.get(strategy, devices)


def worker(args) -> None:
    """One phase of one strategy; Lightning starts the other ranks by running this script again."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from peft_callbacks import LoRACallback, SlimCheckpoint

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    devices = 1 if args.worker.endswith("reference") else args.devices
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
        merged_dtype="float32" if args.worker.startswith("qlora") else None,  # a plain model from the 4-bit base
    )
    callbacks = [Losses(), lora]
    if args.worker.startswith("qlora"):  # a 4-bit base resumes from slim checkpoints (its statistics stay out)
        callbacks.append(SlimCheckpoint())
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
    loader = data(devices, data_parallel_size(args.worker, devices))
    trainer.fit(make_module(args.worker, args.base), loader, ckpt_path=checkpoint)
    if trainer.is_global_zero:
        (out / f"{args.phase}.json").write_text(
            json.dumps({"losses": losses, "trainable": lora.parameter_count.trainable})
        )


def run_worker(strategy: str, phase: str, out: Path, args) -> tuple[bool, str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", strategy, "--phase", phase]
    command += ["--out", str(out), "--devices", str(args.devices), "--accelerator", args.accelerator]
    command += ["--base", args.base]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    (out / f"{phase}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return False, f"exit {done.returncode}; last lines:\n" + "\n".join(
            (done.stdout + done.stderr).splitlines()[-15:]
        )
    return True, ""


def adapter_outputs(folder: Path, base: str | None = None):
    """Outputs of the adapter in ``folder`` loaded onto a plain CPU model (``base``: onto the 4-bit Llama)."""
    import torch

    from peft_callbacks import load_adapter

    model = load_adapter(load_quantized(base) if base else build_model(), folder).eval()
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


def run_reference(name: str, root: Path, args) -> dict | None:
    """The single-device fit and resume every strategy is compared with (``None`` if they failed)."""
    from safetensors.torch import load_file

    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for phase in ("fit", "resume"):
        ok, why = run_worker(name, phase, folder, args)
        if not ok:
            print(f"The single-device {name} {phase} failed ({why}); see {folder}/{phase}.log.")
            return None
    quantized = name.startswith("qlora")
    return {
        "fit": json.loads((folder / "fit.json").read_text()),
        "resume": json.loads((folder / "resume.json").read_text()),
        "outputs": adapter_outputs(folder / "adapter", args.base if quantized else None),
        "resumed_outputs": adapter_outputs(folder / "adapter_resumed", args.base if quantized else None),
        "merged": load_file(str(folder / "merged" / "model.safetensors")),
    }


def skipped(strategy: str, args) -> str | None:
    """Why ``strategy`` cannot run here, or ``None``."""
    if args.accelerator == "cpu" and strategy not in CPU_STRATEGIES:
        return "needs CUDA in Lightning"
    if strategy == "tp_fsdp2" and (args.devices < 4 or args.devices % 2):
        return f"needs an even number of devices, at least 4 (got {args.devices})"
    return ensure_deepspeed() if strategy == "deepspeed" else None


def check_strategy(strategy: str, out: Path, ref: dict, args) -> list[tuple[str, str, str, str]]:
    from safetensors.torch import load_file

    base = args.base if strategy.startswith("qlora") else None
    ok, why = run_worker(strategy, "fit", out, args)
    if not ok:
        return [(strategy, "fit", "FAIL", why)] + [
            (strategy, name, "SKIP", "the fit failed") for name in ("adapter file", "merge", "resume")
        ]
    fit = json.loads((out / "fit.json").read_text())
    gap = max(abs(a - b) for a, b in zip(fit["losses"], ref["fit"]["losses"]))
    same = len(fit["losses"]) == len(ref["fit"]["losses"]) and gap <= TOLERANCE
    same = same and fit["trainable"] == ref["fit"]["trainable"]
    rows = [(strategy, "fit", "PASS" if same else "FAIL", f"losses {fit['losses']} vs {ref['fit']['losses']}")]
    rows.append(_compare(strategy, "adapter file", lambda: adapter_outputs(out / "adapter", base), ref["outputs"]))
    merged = lambda: load_file(str(out / "merged" / "model.safetensors"))  # noqa: E731
    rows.append(_compare_dicts(strategy, "merge", merged, ref["merged"]))
    ok, why = run_worker(strategy, "resume", out, args)
    if not ok:
        return [*rows, (strategy, "resume", "FAIL", why)]
    resume = json.loads((out / "resume.json").read_text())
    row = _compare(strategy, "resume", lambda: adapter_outputs(out / "adapter_resumed", base), ref["resumed_outputs"])
    expected = ref["resume"]["losses"]
    gap = max(abs(a - b) for a, b in zip(resume["losses"], expected))
    if row[2] == "PASS" and (len(resume["losses"]) != len(expected) or gap > TOLERANCE):
        row = (strategy, "resume", "FAIL", f"losses {resume['losses']} vs {expected}")
    return [*rows, row]


def check(args) -> int:
    root = Path(args.out or tempfile.mkdtemp(prefix="check_strategies_"))
    args.base = str(root / "base")  # the Llama's weights, for the quantized runs (loaded 4-bit)
    build_model().save_pretrained(args.base)
    rows: list[tuple[str, str, str, str]] = []
    references: dict[str, dict] = {}
    for strategy in args.strategies:
        why = skipped(strategy, args)
        if why:
            rows += [(strategy, name, "SKIP", why) for name in ("fit", "adapter file", "merge", "resume")]
            continue
        name = "qlora_reference" if strategy.startswith("qlora") else "reference"
        if name not in references:
            ref = run_reference(name, root, args)
            if ref is None:
                return 2
            references[name] = ref
        out = root / strategy
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        rows += check_strategy(strategy, out, references[name], args)
    width = max(len(r[3].splitlines()[0]) for r in rows) if rows else 0
    print(f"\n{'strategy':12s} {'check':13s} result  detail")
    for strategy, name, result, detail in rows:
        print(f"{strategy:12s} {name:13s} {result:6s}  {detail.splitlines()[0][:width]}")
        for line in detail.splitlines()[1:]:
            print(f"{'':34s}{line}")
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
    parser.add_argument("--worker", choices=[*STRATEGIES, "reference", "qlora_reference"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
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
            print("No CUDA device here: `--accelerator cpu --strategies fsdp2 tp qlora_fsdp2` checks those on CPU.")
            return 2
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
