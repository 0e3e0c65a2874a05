"""LoRACallback under Lightning precision plugins, and when training diverges."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks import LoRACallback, lora_layers


class TinyTask(L.LightningModule):
    """An MLP classifier whose loss turns NaN from global step ``nan_from`` on (to simulate divergence)."""

    def __init__(self, nan_from: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))
        self.nan_from = nan_from
        self.output_dtypes: set[torch.dtype] = set()

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        self.output_dtypes.add(out.dtype)
        loss = nn.functional.cross_entropy(out.float(), y)
        if self.nan_from is not None and self.global_step >= self.nan_from:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, eps=1e-4)


def _data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 8, generator=generator), torch.arange(16) % 3), batch_size=4)


def _trainer(max_steps: int, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


PRECISIONS = [
    pytest.param("bf16-mixed", torch.float32, torch.bfloat16, id="bf16-mixed"),
    pytest.param("bf16-true", torch.bfloat16, torch.bfloat16, id="bf16-true"),
    pytest.param("16-true", torch.float16, torch.float16, id="16-true"),
    pytest.param(
        "16-mixed",
        torch.float32,
        torch.float16,
        id="16-mixed",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler needs a CUDA device"
        ),
    ),
]


@pytest.mark.parametrize(("precision", "param_dtype", "compute_dtype"), PRECISIONS)
def test_lora_callback_under_precision_plugin(precision, param_dtype, compute_dtype):
    task = TinyTask()
    base_before = task.net[0].weight.detach().clone()
    lora = LoRACallback(rank=4)
    _trainer(4, [lora], precision=precision, enable_checkpointing=False).fit(task, _data())
    assert task.output_dtypes == {compute_dtype}
    assert not lora_layers(task)  # merged at the end: plain layers again
    assert isinstance(task.net[0], nn.Linear)
    assert {p.dtype for p in task.parameters()} == {param_dtype}
    merged = task.net[0].weight.detach()
    assert torch.isfinite(merged).all()
    assert not torch.equal(merged.float(), base_before.to(param_dtype).float())  # LoRA trained, then merged


def _finite(state_dict: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())


@pytest.mark.filterwarnings("ignore:.*ckpt_path.*", "ignore:.*resuming from a checkpoint.*")
def test_nan_loss_fails_the_merge_clearly_and_leaves_checkpoints_usable(tmp_path):
    task = TinyTask(nan_from=3)
    base_before = {name: p.detach().clone() for name, p in task.net.named_parameters()}
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    with pytest.raises(ValueError, match=r"Refusing to merge LoRA into 'net\.\d'.*NaN or Inf"):
        _trainer(5, [LoRACallback(rank=4), checkpoints]).fit(task, _data())

    # the in-memory model is left unmerged: its frozen base weights are the originals, never a NaN merge
    assert lora_layers(task)
    for name, layer in lora_layers(task).items():
        assert torch.equal(layer.base_layer.weight, base_before[f"{name.removeprefix('net.')}.weight"])

    saved = {int(p.stem.split("=")[1]): torch.load(p, weights_only=False)["state_dict"] for p in tmp_path.iterdir()}
    assert sorted(saved) == [1, 2, 3, 4, 5]
    assert all(_finite(saved[step]) for step in (1, 2, 3))  # written before the divergence: intact
    assert not _finite(saved[5])

    # the last good checkpoint resumes into a clean run that merges
    resumed = TinyTask()
    _trainer(5, [LoRACallback(rank=4)], enable_checkpointing=False).fit(
        resumed, _data(), ckpt_path=tmp_path / "step=3.ckpt"
    )
    assert not lora_layers(resumed)
    assert all(torch.isfinite(p).all() for p in resumed.parameters())
