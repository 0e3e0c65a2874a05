"""Adapter file size versus base checkpoint size at r = 4, 8, 16.

The adapter file is a safetensors file of the LoRA tensors only (every ``lora_A``/``lora_B`` weight, found with
``lora_layers``); the base checkpoint is the model's state dict as safetensors. Files are really written for
all-MiniLM-L6-v2 (real weights) and ViT-S/16; for a 7B Llama (meta device, bf16 checkpoint as distributed) the
sizes are computed from the tensor shapes (bytes of the tensors, header excluded). A trainable task head would be
saved beside the LoRA tensors; it is left out here so the figures show LoRA itself.

Usage::

    python benchmarks/adapter_size.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from safetensors.torch import save_file, save_model  # noqa: E402

from benchmarks.common import BENCHES  # noqa: E402
from peft_callbacks import inject_lora, lora_layers  # noqa: E402

TARGETS = {"minilm": BENCHES["minilm"].targets, "vit_s16": BENCHES["vit_s16"].targets}


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in lora_layers(model).items():
        out[f"{path}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        out[f"{path}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
    return out


def file_sizes(name: str, rank: int, folder: str) -> tuple[int, int]:
    base_path = os.path.join(folder, f"{name}_base.safetensors")
    model = BENCHES[name].build()
    if not os.path.exists(base_path):
        save_model(model, base_path)
    inject_lora(model, rank=rank, target_modules=TARGETS[name])
    adapter_path = os.path.join(folder, f"{name}_r{rank}.safetensors")
    save_file(lora_tensors(model), adapter_path)
    return os.path.getsize(adapter_path), os.path.getsize(base_path)


def llama_sizes(rank: int) -> tuple[int, int]:
    from benchmarks.surgery import meta_llama

    model = meta_llama()
    base = sum(p.numel() for p in model.parameters()) * 2  # bf16
    inject_lora(model, rank=rank, target_modules="all-linear")
    adapter = sum(t.numel() for t in lora_tensors(model).values()) * 2
    return adapter, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, label in [("vit_s16", "ViT-S/16 (fp32, files)"), ("minilm", "all-MiniLM-L6-v2 (fp32, files)")]:
            for r in args.ranks:
                adapter, base = file_sizes(name, r, folder)
                rows.append((label, r, adapter, base))
    for r in args.ranks:
        adapter, base = llama_sizes(r)
        rows.append(("Llama-2-7B shapes (bf16, computed), all-linear", r, adapter, base))
    print("| model | r | adapter | base checkpoint | adapter / base |")
    print("|---|---:|---:|---:|---:|")
    for label, r, adapter, base in rows:
        print(f"| {label} | {r} | {_size(adapter)} | {_size(base)} | {adapter / base:.4%} |")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


if __name__ == "__main__":
    main()
