"""Quantized bases (QLoRA): peak memory of a LoRA fit by base precision, and step time ours vs HF peft on 4 bits.

* Memory: a Llama-shaped model with random weights (``--size``; 0.5b is ~0.48B parameters) is saved once in float32,
  then loaded by transformers as each base (``fp32``, ``bf16``, ``int8``, ``nf4``: NF4 with double quantization,
  bfloat16 compute), one process per base, so nothing is shared. In each process LoRA (r=8 on every attention and MLP
  projection) is injected and AdamW trains for ``--steps`` steps on one batch. Reported per base: the bytes of the
  model's tensors as torch counts them (weights, quantization statistics, LoRA factors), the process's peak resident
  set during the fit (``VmHWM``, reset once the model is built; the whole process: weights, activations, gradients,
  optimizer state, allocator slack and the Python/torch runtime), and both as ratios to the float32 base.
* Speed: one process holds the same 4-bit model twice, one with ``peft_callbacks`` LoRA and one with HF peft's
  QLoRA (``get_peft_model``; float32 everywhere so both run the same arithmetic), and alternates single AdamW steps
  between them (the order swaps every round), so a change in machine load hits both alike. The figure is the median
  step time of each; ``--repeats`` processes are run and the median of their ratios reported.
* Re-quantizing: LoRA trains for ``--steps`` AdamW steps on one batch of the 4-bit model (NF4, double quant, float32
  compute); then the model is merged three ways (float32, bfloat16, re-quantized into NF4). Reported: the loss on
  that batch for the base, the adapted model and each merge, the share of the base→adapted loss drop each merge
  keeps, the largest logit difference to the adapted model, and ``requantization_error`` per layer.

Usage::

    python -m benchmarks.quantized memory --size 0.5b --steps 3 --threads 2
    python -m benchmarks.quantized speed --size 60m --rounds 10 --repeats 3 --threads 1
    python -m benchmarks.quantized requantize --size 60m --steps 30 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SIZES = {  # Llama shapes: hidden, intermediate, layers, heads, kv heads, vocab
    "0.5b": (1024, 2816, 32, 16, 16, 32000),
    "60m": (512, 1408, 8, 8, 8, 32000),
    "tiny": (64, 128, 2, 4, 2, 99),
}
BASES = ["fp32", "bf16", "int8", "nf4"]
EXTRA_BASES = ["nf4-bf16-rest"]  # NF4, with the float32 upcast of the other tensors undone (see memory_worker)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, BATCH, SEQ = 8, 16.0, 4, 128


def model_dir(size: str) -> str:
    """The saved random-weight model of ``size`` (built once, kept in the temp folder)."""
    import torch
    import transformers as hf

    folder = os.path.join(tempfile.gettempdir(), f"peft_callbacks_bench_llama_{size}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    config = hf.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=2 * SEQ,
    )
    torch.manual_seed(0)
    hf.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(size: str, base: str):
    import torch
    import transformers as hf

    hf.logging.set_verbosity_error()
    folder = model_dir(size)
    if base == "fp32":
        return hf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if base == "bf16":
        return hf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    if base == "int8":
        config = hf.BitsAndBytesConfig(load_in_8bit=True)
        return hf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16)
    if base in ("nf4", "nf4-fp32"):
        compute = torch.bfloat16 if base == "nf4" else torch.float32
        config = hf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
        return hf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=compute)
    raise ValueError(f"unknown base {base!r}")


def batch(size: str):
    import torch

    vocab = SIZES[size][-1]
    return torch.randint(3, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def tensor_bytes(model) -> int:
    """Bytes of every tensor of the model, bitsandbytes' quantization statistics included (its ``state_dict``)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def memory_worker(size: str, base: str, steps: int) -> dict:
    import torch

    from benchmarks.common import peak_rss_bytes, reset_peak_rss, rss_bytes
    from peft_callbacks import inject_lora

    model = inject_lora(load(size, base.removesuffix("-bf16-rest")), rank=RANK, alpha=ALPHA, target_modules=PROJECTIONS)
    model.train()
    if base.endswith("-bf16-rest"):  # what the float32 upcast of norms, embeddings and LM head costs
        for p in model.parameters():
            if p.dtype == torch.float32 and not p.requires_grad:
                p.data = p.data.bfloat16()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = batch(size)
    built = rss_bytes()
    reset_peak_rss()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "size": size,
        "base": base,
        "parameters": sum(p.numel() for p in load_shapes(size)),
        "trainable": sum(p.numel() for p in params),
        "tensor_mb": tensor_bytes(model) / 2**20,
        "built_rss_mb": built / 2**20,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "step_s": statistics.median(times),
    }


def load_shapes(size: str):
    """The parameters of the model in float32 on ``meta`` (for the parameter count; nothing allocated)."""
    import torch
    import transformers as hf

    with torch.device("meta"):
        return list(hf.LlamaForCausalLM(hf.AutoConfig.from_pretrained(model_dir(size))).parameters())


def speed_worker(size: str, rounds: int, warmup: int) -> dict:
    import peft
    import torch

    from peft_callbacks import inject_lora

    ids = batch(size)
    ours = inject_lora(load(size, "nf4-fp32"), rank=RANK, alpha=ALPHA, target_modules=PROJECTIONS).train()
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PROJECTIONS, lora_dropout=0.0)
    theirs = peft.get_peft_model(load(size, "nf4-fp32"), config).train()

    def stepper(model):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step() -> float:
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        return step

    steps = {"ours": stepper(ours), "peft": stepper(theirs)}
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    for r in range(warmup + rounds):
        for name in ["ours", "peft"] if r % 2 == 0 else ["peft", "ours"]:
            t = steps[name]()
            if r >= warmup:
                times[name].append(t)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"size": size, "median_s": medians, "ratio": medians["ours"] / medians["peft"], "times": times}


def requantize_worker(size: str, steps: int) -> dict:
    import copy

    import torch

    from peft_callbacks import disabled, inject_lora, merge, requantization_error

    torch.manual_seed(0)
    model = inject_lora(load(size, "nf4-fp32"), rank=RANK, alpha=ALPHA, target_modules=PROJECTIONS).train()
    ids = batch(size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def measure(m) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            out = m(input_ids=ids, labels=ids)
        return out.loss.item(), out.logits.float()

    with disabled(model):
        base_loss, _ = measure(model)
    adapted_loss, adapted = measure(model)
    errors = requantization_error(model)
    merges = {
        "float32": lambda m: merge(m, dtype="float32"),
        "bfloat16": lambda m: merge(m, dtype="bfloat16"),
        "nf4 (requantize)": lambda m: merge(m, requantize=True),
    }
    rows = {}
    for name, fn in merges.items():
        loss, out = measure(fn(copy.deepcopy(model)).train())
        rows[name] = {
            "loss": loss,
            "kept": (base_loss - loss) / (base_loss - adapted_loss),
            "max_logit_diff": (out - adapted).abs().max().item(),
        }
    values = sorted(errors.values())
    return {
        "size": size,
        "steps": steps,
        "base_loss": base_loss,
        "adapted_loss": adapted_loss,
        "merges": rows,
        "requantization_error": {"min": values[0], "median": statistics.median(values), "max": values[-1]},
    }


def requantize_table(r: dict) -> str:
    e = r["requantization_error"]
    lines = [
        f"LoRA r={RANK} trained {r['steps']} AdamW steps (lr 1e-3) on one batch of the {r['size']} model in NF4: loss "
        f"{r['base_loss']:.3f} (base) -> {r['adapted_loss']:.3f} (adapted). requantization_error per layer: min "
        f"{e['min']:.2f}, median {e['median']:.2f}, max {e['max']:.2f}.",
        "",
        "| merged as | loss | share of the loss drop kept | max logit diff to the adapted model |",
        "|---|---:|---:|---:|",
    ]
    for name, row in r["merges"].items():
        lines.append(f"| {name} | {row['loss']:.4f} | {100 * row['kept']:.1f}% | {row['max_logit_diff']:.2e} |")
    return "\n".join(lines)


def _run(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error")
    cmd = [sys.executable, "-m", "benchmarks.quantized", *args, "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _uptime() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def memory_table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["base"] == "fp32"), rows[0])  # ratios to float32, else to the first base
    lines = [
        f"Llama-shaped, {ref['parameters'] / 1e6:.0f}M parameters (random weights), LoRA r={RANK} on every "
        f"projection ({ref['trainable']:,} trainable), AdamW, batch {BATCH} x {SEQ} tokens.",
        "",
        "| base | model tensors (MB) | ratio | peak RSS during the fit (MB) | ratio | step (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['base']} | {r['tensor_mb']:.0f} | {r['tensor_mb'] / ref['tensor_mb']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f} | {r['step_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "speed", "requantize", "memory-worker", "speed-worker"])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--base", choices=BASES + EXTRA_BASES)
    parser.add_argument("--bases", nargs="+", choices=BASES + EXTRA_BASES, default=BASES)
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps per memory process / before merging")
    parser.add_argument("--rounds", type=int, default=10, help="measured steps per variant in a speed process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="speed processes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the raw results as JSON here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.what == "memory-worker":
        print(json.dumps(memory_worker(args.size, args.base, args.steps)))
        return
    if args.what == "speed-worker":
        print(json.dumps(speed_worker(args.size, args.rounds, args.warmup)))
        return
    if args.what == "requantize":
        result = requantize_worker(args.size, args.steps)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        print(requantize_table(result))
        return
    model_dir(args.size)  # build and save once, before the workers
    print(f"load average before: {_uptime()}", file=sys.stderr, flush=True)
    if args.what == "memory":
        rows = []
        for base in args.bases:
            rows.append(
                _run(["memory-worker", "--size", args.size, "--base", base, "--steps", str(args.steps)], args.threads)
            )
            print(f"{base}: {rows[-1]['peak_rss_mb']:.0f} MB peak, load {_uptime()}", file=sys.stderr, flush=True)
        result, text = rows, memory_table(rows)
    else:
        runs = []
        for r in range(args.repeats):
            runs.append(
                _run(
                    ["speed-worker", "--size", args.size, "--rounds", str(args.rounds), "--warmup", str(args.warmup)],
                    args.threads,
                )
            )
            shown = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in runs[-1]["median_s"].items())
            print(f"repeat {r}: {shown}; ratio {runs[-1]['ratio']:.3f}; load {_uptime()}", file=sys.stderr, flush=True)
        result = runs
        text = (
            f"ours/peft step time on the 4-bit (NF4, double quant, float32 compute) {args.size} model: median of "
            f"{args.repeats} processes {statistics.median(r['ratio'] for r in runs):.3f} "
            f"(each {', '.join(format(r['ratio'], '.3f') for r in runs)})"
        )
    print(f"load average after: {_uptime()}", file=sys.stderr, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
