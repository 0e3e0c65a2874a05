"""Training step time, ours / HF peft, for VeRA, AdaLoRA and LoRA with PiSSA init; trainable share and adapter-file
size per method on all-MiniLM-L6-v2.

* Speed: one process per (model, repeat) holds every (method, library) pair and alternates single training steps
  between them (the order rotates every round), so a change in machine load hits all of them alike. Each library's
  step is what it prescribes: forward, loss, backward, AdamW step, and for AdaLoRA the orthogonality regulariser (PEFT:
  inside ``AdaLoraModel.forward`` for models that return a loss, its own loop otherwise; ours: the gradient
  ``AdaLoRACallback`` adds in ``on_after_backward``) and the rank allocation after the step (``update_and_allocate``;
  ``tinit=0``, ``deltaT=1``: a masking every step, the costliest phase). The figure is the median step time per
  process, then the median over ``--repeats`` processes.
* Size: every method injected into all-MiniLM-L6-v2 (real weights) on the same layers, its adapter file written with
  ``save_adapter`` (the task head is left frozen, so the file holds the method's own tensors).

Models: timm ``vit_small_patch16_224`` at 96 px, batch 16 (random init), and all-MiniLM-L6-v2 (real weights, via
``peft_callbacks.demo.minilm_path``) with a 2-class head, sequence 64, batch 16. Layers: every attention and MLP
projection of every block (one regex, read the same way by both libraries).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/methods_vera_adalora.py --rounds 8 --repeats 3
    python benchmarks/methods_vera_adalora.py --sizes-only
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

METHODS = ["vera", "adalora", "pissa"]
LIBRARIES = ["peft", "ours"]
TOTAL_STEP = 1000
ORTH = 0.5


def _minilm():
    import torch
    import transformers as hf

    from peft_callbacks.demo import minilm_path

    torch.manual_seed(0)
    hf.logging.set_verbosity_error()
    hf.utils.logging.disable_progress_bar()
    return hf.BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).train()


def _bench(name: str):
    from benchmarks.common import BENCHES

    bench = BENCHES[name]
    return (_minilm if name == "minilm" else bench.build), bench


def _peft_model(model, method: str, bench):
    import peft

    head = bench.head or None
    if method == "vera":
        config = peft.VeraConfig(r=256, target_modules=bench.targets, modules_to_save=head)
    elif method == "adalora":
        config = peft.AdaLoraConfig(
            init_r=12, target_r=8, total_step=TOTAL_STEP, target_modules=bench.targets, modules_to_save=head
        )
    else:
        config = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights="pissa", target_modules=bench.targets)
        config.modules_to_save = head
    return peft.get_peft_model(model, config)


def _our_model(model, method: str, bench):
    from peft_callbacks import AdaLoRAConfig, LoRAConfig, VeRAConfig, inject

    common = dict(target_modules=bench.targets, train_head=bool(bench.head))
    if method == "vera":
        config = VeRAConfig(rank=256, **common)
    elif method == "adalora":
        config = AdaLoRAConfig(init_r=12, target_r=8, total_step=TOTAL_STEP, **common)
    else:
        config = LoRAConfig(rank=8, alpha=16, init="pissa", **common)
    return inject(model, config)


def _peft_orth(model):
    """PEFT's regulariser, as ``AdaLoraModel.forward`` computes it (for models whose output carries no loss)."""
    import torch

    total, count = 0, 0
    for n, p in model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and "default" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            total = total + torch.norm(cov - torch.eye(*cov.size(), out=torch.empty_like(cov)), p="fro")
            count += 1
    return total / count


def _stepper(name: str, method: str, library: str):
    import torch

    from peft_callbacks.methods.adalora import RankAllocator, adalora_adapters, orthogonal_regularization

    build, bench = _bench(name)
    model = build()
    model = _peft_model(model, method, bench) if library == "peft" else _our_model(model, method, bench)
    inputs, target = bench.batch()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    allocator = RankAllocator(model) if (method, library) == ("adalora", "ours") else None
    state = {"step": 0}

    def loss_of() -> torch.Tensor:
        if method == "adalora" and library == "peft":
            if isinstance(inputs, dict):  # AdaLoraModel.forward adds the regulariser to an output's loss
                return model.base_model(**inputs, labels=target).loss
            return bench.loss(model, inputs, target) + ORTH * _peft_orth(model)
        if isinstance(inputs, dict):
            return model(**inputs, labels=target).loss
        return bench.loss(model, inputs, target)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_of().backward()
        if allocator is not None:  # what AdaLoRACallback.on_after_backward does
            adapters = adalora_adapters(model).values()
            weights = [p for a in adapters for p in (a.lora_A, a.lora_B)]
            grads = torch.autograd.grad(ORTH * orthogonal_regularization(model), weights)
            with torch.no_grad():
                for p, g in zip(weights, grads):
                    p.grad.add_(g)
        optimizer.step()
        if method == "adalora":
            if library == "peft":
                model.base_model.update_and_allocate(state["step"])
            else:
                allocator.update_and_allocate(model, state["step"])
        state["step"] += 1
        return time.perf_counter() - start

    return step


def speed_worker(name: str, rounds: int, warmup: int) -> dict:
    pairs = [(m, lib) for m in METHODS for lib in LIBRARIES]
    steps = {pair: _stepper(name, *pair) for pair in pairs}
    times: dict[tuple, list[float]] = {pair: [] for pair in pairs}
    for r in range(warmup + rounds):
        order = pairs[r % len(pairs) :] + pairs[: r % len(pairs)]
        for pair in order:
            t = steps[pair]()
            if r >= warmup:
                times[pair].append(t)
    return {"model": name, "median_s": {f"{m}/{lib}": statistics.median(t) for (m, lib), t in times.items()}}


def sizes() -> list[tuple[str, int, int, int]]:
    """``(method, trainable, total, adapter file bytes)`` on all-MiniLM-L6-v2."""
    from benchmarks.common import BENCHES
    from peft_callbacks import AdaLoRAConfig, IA3Config, LoRAConfig, VeRAConfig, count_parameters, inject, save_adapter

    targets = BENCHES["minilm"].targets
    configs = {
        "LoRA r=8": LoRAConfig(rank=8, alpha=16),
        "LoRA r=8, PiSSA init": LoRAConfig(rank=8, alpha=16, init="pissa"),
        "VeRA r=256": VeRAConfig(rank=256),
        "AdaLoRA init_r=12 (target_r=8)": AdaLoRAConfig(init_r=12, target_r=8),
        "IA3": IA3Config(),
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, config in configs.items():
            model = inject(_minilm(), config.replace(target_modules=targets, train_head=False))
            count = count_parameters(model)
            path = save_adapter(model, os.path.join(folder, label.split()[0]))
            rows.append((label, count.trainable, count.total, os.path.getsize(path)))
    return rows


def _run(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error")
    cmd = [sys.executable, __file__, "--threads", str(threads), *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_s16", "minilm"])
    parser.add_argument("--rounds", type=int, default=8, help="measured steps per (method, library) in a process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="speed processes per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes-only", action="store_true")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--speed-worker", metavar="MODEL")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.speed_worker:
        print(json.dumps(speed_worker(args.speed_worker, args.rounds, args.warmup)))
        return
    if not args.sizes_only:
        print(f"load before: {os.getloadavg()}")
        print("| model | method | peft step | ours step | ours / peft |")
        print("|---|---|---:|---:|---:|")
        for name in args.models:
            runs = [
                _run(["--speed-worker", name, "--rounds", str(args.rounds), "--warmup", str(args.warmup)], args.threads)
                for _ in range(args.repeats)
            ]
            for method in METHODS:
                peft_s = statistics.median(r["median_s"][f"{method}/peft"] for r in runs)
                ours_s = statistics.median(r["median_s"][f"{method}/ours"] for r in runs)
                print(f"| {name} | {method} | {peft_s * 1e3:.0f} ms | {ours_s * 1e3:.0f} ms | {ours_s / peft_s:.2f} |")
        print(f"load after: {os.getloadavg()}")
    if not args.speed_only:
        print("| method (all-MiniLM-L6-v2, attention + MLP projections) | trainable | share | adapter file |")
        print("|---|---:|---:|---:|")
        for label, trainable, total, size in sizes():
            print(f"| {label} | {trainable:,} | {trainable / total:.3%} | {size / 1024:.1f} KiB |")


if __name__ == "__main__":
    main()
