"""Where a LoRA training step spends the time it adds over its floor: a ``torch.profiler`` table per mode.

For one model of :mod:`benchmarks.common`, each mode (``floor``, ``ours``, ``peft``) is built in this process, warmed
up, and then profiled over ``--steps`` training steps (zero_grad, forward, loss, backward, AdamW). Printed per mode:
the total self CPU time per step, and per operator the self CPU time per step and the number of calls per step;
then the operators whose time grows most from the floor to ``ours``: what the adapter costs, op by op.

With ``--products``, it times instead the two rank-r products of LoRA's backward each way, on the shapes of ViT-S's
layers (592 tokens; qkv 384→1152, proj 384→384, fc1 384→1536, fc2 1536→384; r = 8): ``g·B`` against ``(Bᵀ·gᵀ)ᵀ``
and ``gᵀ·h`` against ``(hᵀ·g)ᵀ``. CPU BLAS runs a product with r output columns much slower than the same product
with r output rows, which is why the fused node takes the second form.

Usage::

    python benchmarks/profile_step.py --model vit_s16 --steps 5 --threads 2
    python benchmarks/profile_step.py --products --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def profile(model_name: str, mode: str, steps: int) -> dict[str, tuple[float, float]]:
    """``{operator: (self CPU ms per step, calls per step)}`` for ``mode``."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from benchmarks.common import BENCHES, prepare

    bench = BENCHES[model_name]
    model = prepare(bench, mode)
    inputs, target = bench.batch()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        bench.loss(model, inputs, target).backward()
        if optimizer is not None:
            optimizer.step()

    for _ in range(3):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    table: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in prof.key_averages():
        table[event.key][0] += event.self_cpu_time_total / 1000 / steps
        table[event.key][1] += event.count / steps
    return {k: (v[0], v[1]) for k, v in table.items()}


def products(rank: int = 8, tokens: int = 592, repeats: int = 400) -> None:
    """Print the time of each backward product both ways (see the module docstring)."""
    import time

    import torch

    def timed(fn) -> float:
        for _ in range(30):
            fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e3

    print("| layer (in→out) | g·B | (Bᵀ·gᵀ)ᵀ | gᵀ·h | (hᵀ·g)ᵀ |\n|---|---:|---:|---:|---:|")
    totals = [0.0, 0.0]
    for name, d_in, d_out in [("qkv", 384, 1152), ("proj", 384, 384), ("fc1", 384, 1536), ("fc2", 1536, 384)]:
        g, b, h = torch.randn(tokens, d_out), torch.randn(d_out, rank), torch.randn(tokens, rank)
        forms = [
            lambda g=g, b=b: g @ b,
            lambda g=g, b=b: (b.t() @ g.t()).t(),
            lambda g=g, h=h: g.t() @ h,
            lambda g=g, h=h: (h.t() @ g).t(),
        ]
        times = [timed(form) for form in forms]
        totals[0] += times[0] + times[2]
        totals[1] += times[1] + times[3]
        print(f"| {name} ({d_in}→{d_out}) | " + " | ".join(f"{t:.3f} ms" for t in times) + " |")
    print(f"per block: {totals[0]:.2f} ms the first way, {totals[1]:.2f} ms the second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--modes", nargs="+", default=["floor", "ours", "peft"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--products", action="store_true", help="time the backward's rank-r products both ways")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.products:
        products()
        return
    results = {mode: profile(args.model, mode, args.steps) for mode in args.modes}
    for mode, table in results.items():
        total = sum(ms for ms, _ in table.values())
        print(f"\n{args.model} {mode}: {total:.0f} ms self CPU per step")
        for name, (ms, calls) in sorted(table.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {name:<45} {ms:8.1f} ms  {calls:6.0f} calls")
    if "floor" in results and "ours" in results:
        floor, ours = results["floor"], results["ours"]
        added = {k: ours.get(k, (0, 0))[0] - floor.get(k, (0, 0))[0] for k in set(floor) | set(ours)}
        calls = {k: ours.get(k, (0, 0))[1] - floor.get(k, (0, 0))[1] for k in added}
        total = sum(added.values())
        print(f"\nours − floor: {total:+.0f} ms self CPU per step; the operators that add most:")
        for name, ms in sorted(added.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {name:<45} {ms:+8.1f} ms  {calls[name]:+6.0f} calls")


if __name__ == "__main__":
    main()
