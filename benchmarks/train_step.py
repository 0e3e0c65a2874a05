"""Training step time and peak memory: full fine-tuning, the floor, HF peft LoRA and peft_callbacks LoRA.

The floor is the least any adapter method can cost: the forward pass plus the input-gradient backward through the
frozen network, with no weight gradient and no adapter. ``plain`` is peft_callbacks' LoRA with its fused autograd node
switched off (the plain path), to show what the fused node gains.

* Speed: one process per model holds the variants and alternates single training steps between them (full, floor,
  peft, plain, ours; the order rotates every round), so a change in machine load hits all of them alike. The figure
  is the median step time per variant; ratios are taken from these medians. ``--repeats`` runs that many such
  processes and reports the median of their medians. ``--ref-fused FILE`` adds ``ref``: ours with the fused node of
  another version of ``fused.py``, so two versions of the node are compared in the same processes.
* Memory: one process per (model, variant), so nothing is shared. Peak memory is the rise of the process's peak RSS
  (``VmHWM``, reset right before the first step) over its RSS once the model is built: gradients, optimizer state and
  activations. The exact bytes of gradients + AdamW state are counted too (independent of the allocator).

Usage::

    python benchmarks/train_step.py --models vit_s16 minilm gpt2 --rounds 10 --repeats 2 --threads 1
    python benchmarks/train_step.py --dora --models vit_s16 minilm --skip-memory --threads 2   # DoRA instead
    python benchmarks/train_step.py --dropout 0.1 --models vit_s16 minilm --threads 2          # LoRA dropout
    git show main:peft_callbacks/methods/lora/fused.py > /tmp/fused_main.py   # before/after a change of the node:
    python benchmarks/train_step.py --ref-fused /tmp/fused_main.py --models vit_s16 minilm --skip-memory --threads 2
    python benchmarks/train_step.py --speed-worker vit_s16 --rounds 10    # one speed process, JSON on stdout
    python benchmarks/train_step.py --memory-worker vit_s16 ours           # one memory process, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODES = ["full", "floor", "peft", "plain", "ours"]
REF = "ref"  # with --ref-fused: ours, with the fused node of another version of fused.py, in the same process


def _use_fused_node_from(model, path: str) -> None:
    """Make the LoRA layers of ``model`` run ``lora_linear`` from the file ``path`` (another version of
    ``peft_callbacks/methods/lora/fused.py``) instead of this checkout's, with everything else unchanged."""
    import importlib.util

    import peft_callbacks.methods.lora.layers as layers
    from peft_callbacks.methods.lora.method import lora_adapters

    spec = importlib.util.spec_from_file_location("reference_fused", path)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)

    def fused_with_reference(own_fused):
        def fused(layer, x):
            current, layers.lora_linear = layers.lora_linear, reference.lora_linear
            try:
                return own_fused(layer, x)
            finally:
                layers.lora_linear = current

        return fused

    for adapter in lora_adapters(model).values():
        adapter.fused = fused_with_reference(adapter.fused)  # an instance attribute: this model only


def _trainer(bench, mode: str, dora: bool = False, dropout: float = 0.0, ref_fused: str | None = None):
    import torch

    from benchmarks.common import prepare

    model = prepare(bench, "ours" if mode == REF else mode, dora=dora, dropout=dropout)
    if mode == REF:
        _use_fused_node_from(model, ref_fused)
    inputs, target = bench.batch()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None  # the floor trains nothing

    def step() -> float:
        start = time.perf_counter()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        bench.loss(model, inputs, target).backward()
        if optimizer is not None:
            optimizer.step()
        return time.perf_counter() - start

    return model, optimizer, params, step


def speed_worker(
    model_name: str, rounds: int, warmup: int, dora: bool = False, dropout: float = 0.0, ref_fused: str | None = None
) -> dict:
    from benchmarks.common import BENCHES

    bench = BENCHES[model_name]
    modes = MODES + ([REF] if ref_fused else [])
    steps = {mode: _trainer(bench, mode, dora, dropout, ref_fused)[3] for mode in modes}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(warmup + rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for mode in order:
            t = steps[mode]()
            if r >= warmup:
                times[mode].append(t)
    return {"model": model_name, "median_s": {m: statistics.median(t) for m, t in times.items()}, "times": times}


def memory_worker(model_name: str, mode: str, steps: int, dora: bool = False, dropout: float = 0.0) -> dict:
    from benchmarks.common import BENCHES, peak_rss_bytes, reset_peak_rss, rss_bytes

    model, optimizer, params, step = _trainer(BENCHES[model_name], mode, dora, dropout)
    base = rss_bytes()
    reset_peak_rss()
    for _ in range(steps):
        step()
    states = optimizer.state.values() if optimizer is not None else []
    state = sum(t.nbytes for s in states for t in s.values() if hasattr(t, "nbytes"))
    grads = sum(p.grad.nbytes for p in params if p.grad is not None)
    unique = {id(p): p for p in model.parameters()}.values()
    return {
        "model": model_name,
        "mode": mode,
        "peak_rise_mb": (peak_rss_bytes() - base) / 2**20,
        "grad_and_optimizer_mb": (state + grads) / 2**20,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in unique),
    }


def _run(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error")
    cmd = [sys.executable, __file__, "--threads", str(threads), *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_s16", "minilm", "gpt2"])
    parser.add_argument("--rounds", type=int, default=10, help="measured steps per variant in a speed process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="speed processes per model")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-worker", metavar="MODEL")
    parser.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "MODE"))
    parser.add_argument("--dora", action="store_true", help="DoRA instead of LoRA in the peft, plain and ours variants")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout in the peft, plain and ours variants")
    parser.add_argument(
        "--ref-fused",
        metavar="FILE",
        help="another version of peft_callbacks/methods/lora/fused.py: adds the variant `ref` (ours with that file's "
        "fused node) to each speed process, to compare two versions of the node side by side",
    )
    parser.add_argument("--out", help="write the raw results as JSON here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.speed_worker:
        res = speed_worker(args.speed_worker, args.rounds, args.warmup, args.dora, args.dropout, args.ref_fused)
        print(json.dumps(res))
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker, args.memory_steps, args.dora, args.dropout)))
        return

    variant = (["--dora"] if args.dora else []) + ["--dropout", str(args.dropout)]
    speed, memory = [], []
    for name in args.models:
        for r in range(0 if args.skip_speed else args.repeats):
            worker = ["--speed-worker", name, "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
            worker += variant + (["--ref-fused", os.path.abspath(args.ref_fused)] if args.ref_fused else [])
            res = _run(worker, args.threads)
            speed.append(res)
            shown = ", ".join(f"{m} {t * 1000:.0f} ms" for m, t in res["median_s"].items())
            print(f"{name} speed repeat {r}: {shown}", file=sys.stderr, flush=True)
        for mode in [] if args.skip_memory else MODES:
            worker = ["--memory-worker", name, mode, "--memory-steps", str(args.memory_steps)]
            res = _run(worker + variant, args.threads)
            memory.append(res)
            print(f"{name} memory {mode}: {res['peak_rise_mb']:.0f} MB", file=sys.stderr, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"speed": speed, "memory": memory}, f, indent=1)
    print(table(speed, memory, args.models))


def table(speed: list[dict], memory: list[dict], models: list[str]) -> str:
    from benchmarks.common import BENCHES

    lines = [
        "| model | variant | trainable params | step (ms) | peak RSS rise (MB) | grads + AdamW state (MB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    ratios, ref_ratios = [], []
    for name in models:
        runs = [s["median_s"] for s in speed if s["model"] == name]
        modes = MODES + ([REF] if runs and all(REF in s for s in runs) else [])
        med = {m: statistics.median(s[m] for s in runs) * 1000 if runs else float("nan") for m in modes}
        mem = {r["mode"]: r for r in memory if r["model"] == name}
        for m in modes:
            row = mem.get(m)
            figures = f"{row['peak_rise_mb']:.0f} | {row['grad_and_optimizer_mb']:.1f}" if row else "– | –"
            params = f"{row['trainable']:,}" if row else "–"
            lines.append(f"| {name} | {m} | {params} | {med[m]:.0f} | {figures} |")
        both = {"ours", "full"} <= mem.keys()
        mem_ratio = f"{mem['ours']['peak_rise_mb'] / mem['full']['peak_rise_mb']:.2f}" if both else "–"
        ratios.append(
            f"| {name} | {med['floor'] / med['full']:.3f} | {med['ours'] / med['full']:.3f} | "
            f"{med['ours'] / med['floor']:.3f} | {med['ours'] / med['peft']:.3f} | {med['ours'] / med['plain']:.3f} | "
            f"{med['peft'] / med['floor']:.3f} | {mem_ratio} |"
        )
        if REF in med:
            ref_ratios.append(
                f"| {name} | {med[REF] / med['peft']:.3f} | {med['ours'] / med['peft']:.3f} | "
                f"{med[REF] / med['floor']:.3f} | {med['ours'] / med['floor']:.3f} | {med['ours'] / med[REF]:.3f} |"
            )
    lines += [
        "",
        "| model | floor/full | ours/full | ours/floor | ours/peft | fused/plain | peft/floor | ours/full RSS rise |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *ratios,
        "",
    ]
    if ref_ratios:
        lines += [
            "| model | ref/peft | ours/peft | ref/floor | ours/floor | ours/ref |",
            "|---|---:|---:|---:|---:|---:|",
            *ref_ratios,
            "",
        ]
    lines += [
        *[f"- {m}: {BENCHES[m].describe}" for m in models],
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
