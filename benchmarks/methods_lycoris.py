"""LoHa, LoKr and OFT: training step time of peft_callbacks vs HF peft, and trainable share / adapter-file size.

* Speed: for each model and method, one process holds our adapted model and PEFT's (same network, same targets: the
  regex of :mod:`benchmarks.common`, a full match on the module path in both libraries; same settings; the task head
  trained in full by both) and runs separate rounds, alternating which library goes first; a round is ``--steps``
  AdamW steps of one library, timed as a whole. The figure per library is the median over ``--rounds`` rounds of
  the mean step time; ``ours/peft`` is the ratio of these medians, by the wall clock and by this process's CPU time
  (which other processes on a shared machine disturb less).
* Size (all-MiniLM-L6-v2, real weights): trainable parameters of the method alone (no head) as a share of the
  model, and the size of its adapter file (``save_adapter``: safetensors of the trained tensors + the recipe) and
  of its HF PEFT directory (``export_peft``).

Run by hand (not part of the test suite); it prints the load of the machine (``uptime``) before and after::

    OMP_NUM_THREADS=1 python benchmarks/methods_lycoris.py --models vit_s16 minilm --rounds 3 --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from benchmarks.common import BENCHES  # noqa: E402

METHODS = ["loha", "lokr", "oft"]
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def configs(method: str, targets: str, train_head: bool):
    """``(our config, PEFT's config)`` with the same settings (each library's defaults for the method)."""
    import peft

    from peft_callbacks import LoHaConfig, LoKrConfig, OFTConfig

    if method == "loha":
        return LoHaConfig(target_modules=targets, train_head=train_head), peft.LoHaConfig(r=8, alpha=8)
    if method == "lokr":
        return LoKrConfig(target_modules=targets, train_head=train_head), peft.LoKrConfig(r=8, alpha=8)
    return OFTConfig(target_modules=targets, train_head=train_head), peft.OFTConfig(r=0, oft_block_size=32)


def prepare(name: str, method: str, library: str) -> torch.nn.Module:
    """A fresh model of benchmark ``name`` with ``method`` injected by ``library`` (``ours`` or ``peft``)."""
    import peft

    from peft_callbacks import inject

    bench = BENCHES[name]
    model = bench.build()
    ours, theirs = configs(method, bench.targets, train_head=bool(bench.head))
    if library == "ours":
        return inject(model, ours)
    theirs.target_modules = bench.targets
    theirs.modules_to_save = bench.head or None
    return peft.get_peft_model(model, theirs)


def stepper(name: str, model: torch.nn.Module):
    bench = BENCHES[name]
    inputs, target = bench.batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        bench.loss(model, inputs, target).backward()
        optimizer.step()

    return step


def speed(name: str, method: str, rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Median over rounds of the mean step time (seconds), per clock (``wall``, and ``cpu``: this process's CPU
    time, which other processes on a busy machine disturb less) and library; rounds alternate which library goes
    first."""
    runs = {library: stepper(name, prepare(name, method, library)) for library in ("ours", "peft")}
    for run in runs.values():  # warm-up: allocator, autograd graph, first-call dispatch
        run()
    times: dict[str, dict[str, list[float]]] = {clock: {library: [] for library in runs} for clock in CLOCKS}
    for r in range(rounds):
        for library in ("ours", "peft") if r % 2 == 0 else ("peft", "ours"):
            start = {clock: read() for clock, read in CLOCKS.items()}
            for _ in range(steps):
                runs[library]()
            for clock, read in CLOCKS.items():
                times[clock][library].append((read() - start[clock]) / steps)
    return {clock: {lib: statistics.median(t) for lib, t in by_lib.items()} for clock, by_lib in times.items()}


def sizes(method: str) -> dict[str, float]:
    """Trainable share and file sizes of ``method`` alone (no head) on all-MiniLM-L6-v2."""
    from peft_callbacks import count_parameters, export_peft, inject, save_adapter

    bench = BENCHES["minilm"]
    model = bench.build()
    ours, _ = configs(method, bench.targets, train_head=False)
    inject(model, ours)
    count = count_parameters(model)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(model, os.path.join(folder, "adapter"))
        export_peft(model, os.path.join(folder, "peft"))
        files = {kind: _folder_bytes(os.path.join(folder, kind)) for kind in ("adapter", "peft")}
    return {"trainable": count.trainable, "total": count.total, **files}


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_s16", "minilm"], choices=["vit_s16", "minilm"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-sizes", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"load before: {uptime()}", flush=True)
    lines = [
        "| model | method | ours (ms/step) | peft (ms/step) | ours/peft | ours/peft, CPU time |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in args.models:
        for method in args.methods:
            wall, cpu = speed(name, method, args.rounds, args.steps).values()
            ours, theirs = wall["ours"] * 1000, wall["peft"] * 1000
            figures = f"{ours:.0f} | {theirs:.0f} | {ours / theirs:.3f} | {cpu['ours'] / cpu['peft']:.3f}"
            lines.append(f"| {name} | {method} | {figures} |")
            print(lines[-1], flush=True)
    print(f"load after: {uptime()}\n")
    print("\n".join(lines))
    print("\n".join(f"- {m}: {BENCHES[m].describe}" for m in args.models))
    if args.skip_sizes:
        return
    rows = ["| method | trainable (share of model) | adapter file | PEFT directory |", "|---|---:|---:|---:|"]
    for method in args.methods:
        s = sizes(method)
        share = 100 * s["trainable"] / s["total"]
        files = f"{s['adapter'] / 1024:.1f} KB | {s['peft'] / 1024:.1f} KB"
        rows.append(f"| {method} | {s['trainable']:,} ({share:.2f}%) | {files} |")
    print("\nall-MiniLM-L6-v2, every encoder Linear (the method's tensors only, no head):\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
