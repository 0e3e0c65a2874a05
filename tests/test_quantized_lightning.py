"""QLoRA with Lightning: the callbacks on a base loaded quantized, the end-of-training merge policy, checkpoints,
the forgetting monitor, and Lightning's own ``BitsandbytesPrecision`` plugin (which quantizes a plain model)."""

from __future__ import annotations

import logging
import os

import lightning as L
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

bnb = pytest.importorskip("bitsandbytes")
hf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lightning.pytorch.plugins.precision import BitsandbytesPrecision  # noqa: E402
from test_quantized import (  # noqa: E402
    LAYERS,
    assert_bit_identical,
    load_quantized,
    logits,
    quantized_state,
    save_tiny_llama,
    token_ids,
)

from peft_callbacks import ForgettingMonitor, LoRACallback, SlimCheckpoint, export_peft, load_adapter  # noqa: E402
from peft_callbacks.core import quantized  # noqa: E402
from peft_callbacks.io.checkpoint import strip_loader_key  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory)


class CausalLM(L.LightningModule):
    """An ordinary LightningModule around a transformers causal LM: nothing in it knows about LoRA or quantization."""

    def __init__(self, model: nn.Module, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def token_data(batches: int = 2) -> DataLoader:
    ids = torch.randint(3, 99, (2 * batches, 8), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids), batch_size=2)


def trainer(tmp_path, steps: int = 12, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,  # -1: by epochs (`max_epochs`)
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("fmt", ["nf4-dq", "int8"])
def test_qlora_fit_trains_lora_only_and_keeps_the_adapter(llama_dir, fmt, tmp_path, caplog):
    module = CausalLM(load_quantized(llama_dir, fmt))
    before = quantized_state(module.model)
    lora = LoRACallback(rank=8)
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, callbacks=[lora]).fit(module, token_data())
    assert module.losses[-1] < module.losses[0] - 0.1
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)  # a causal LM has no task head
    assert len({n.partition(".adapters")[0] for n in trainable}) == LAYERS
    assert_bit_identical(before, module.model)
    # not merged (rounding into 4/8 bits would lose the update), saved, and said so
    assert len([m for m in module.modules() if hasattr(m, "adapters")]) == LAYERS
    saved = tmp_path / "adapter"
    assert (saved / "adapter_model.safetensors").is_file()
    assert "stays unmerged" in caplog.text and str(saved) in caplog.text
    ids = token_ids()
    trained = logits(module.model, ids)
    reloaded = load_adapter(load_quantized(llama_dir, fmt), saved)
    torch.testing.assert_close(logits(reloaded, ids), trained, rtol=0, atol=1e-6)
    # HF PEFT's QLoRA with the trained factors (loaded from our export) computes the same
    export_peft(module.model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(load_quantized(llama_dir, fmt), tmp_path / "peft")
    torch.testing.assert_close(logits(theirs, ids), trained, rtol=0, atol=1e-5)


def test_merged_dtype_writes_a_plain_merged_model(llama_dir, tmp_path):
    module = CausalLM(load_quantized(llama_dir))
    merged_dir = tmp_path / "merged"
    lora = LoRACallback(rank=8, merged_dtype="float32", save_merged_to=str(merged_dir), save_adapter_to=str(tmp_path))
    trainer(tmp_path, steps=4, callbacks=[lora]).fit(module, token_data())
    ids = token_ids()
    adapted = logits(load_adapter(load_quantized(llama_dir), tmp_path), ids)
    assert not quantized.quantized_layers(module) and not any(hasattr(m, "adapters") for m in module.modules())
    reloaded = hf.AutoModelForCausalLM.from_pretrained(merged_dir)
    assert "quantization_config" not in reloaded.config.to_dict()
    # merged from the dequantized weights: equal to the adapted 4-bit model up to float32 rounding
    torch.testing.assert_close(logits(reloaded, ids), adapted, rtol=0, atol=1e-5)


def test_save_merged_to_on_a_quantized_base_needs_a_dtype(llama_dir, tmp_path):
    module = CausalLM(load_quantized(llama_dir))
    lora = LoRACallback(rank=8, save_merged_to=str(tmp_path / "merged"))
    with pytest.raises(ValueError, match=r"save_merged_to=.* on a quantized base needs `merged_dtype`"):
        trainer(tmp_path, steps=1, callbacks=[lora]).fit(module, token_data())
    assert not any(hasattr(m, "adapters") for m in module.modules())  # refused before the surgery


def test_slim_checkpoints_resume_on_a_quantized_base(llama_dir, tmp_path):
    def fit(epochs: int, **kwargs) -> tuple[L.Trainer, CausalLM]:
        module = CausalLM(load_quantized(llama_dir))
        torch.manual_seed(0)  # the same initial factors in every run
        callbacks = [LoRACallback(rank=8), SlimCheckpoint()]
        fitter = trainer(tmp_path, steps=-1, max_epochs=epochs, callbacks=callbacks)
        fitter.fit(module, token_data(), **kwargs)
        return fitter, module

    _, straight = fit(2)
    first, _ = fit(1)
    path = tmp_path / "slim.ckpt"
    first.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert strip_loader_key(state)  # a plain load is told to use load_checkpoint: the base is not in the file
    assert state and all(".lora_" in k for k in state)  # no 4-bit weight, no quantization statistics
    _, resumed = fit(2, ckpt_path=str(path))  # onto a freshly quantized base, its fingerprint checked
    assert len(resumed.losses) == 2
    factors = {k: v for k, v in straight.state_dict().items() if ".lora_" in k}
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in factors.items())  # as if never interrupted


def test_forgetting_monitor_on_a_quantized_base(llama_dir, tmp_path):
    module = CausalLM(load_quantized(llama_dir))
    before = quantized_state(module.model)
    base_set = [{"input_ids": batch[0]} for batch in token_data()]  # next-token labels come from the ids
    monitor = ForgettingMonitor(dataloader=base_set, metric="perplexity", every_n_steps=2, plot=False)
    trainer(tmp_path, steps=4, callbacks=[LoRACallback(rank=8), monitor]).fit(module, token_data())
    assert [row["step"] for row in monitor.history][0] == 0 and len(monitor.history) >= 3
    assert monitor.latest["kl_to_baseline"] > 0
    assert_bit_identical(before, module.model)  # evaluation passes did not re-lay out the 4-bit weights


# -- Lightning's BitsandbytesPrecision: it quantizes a plain model in `convert_module` ---------------------------
class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.net(batch[0]).float(), batch[1])
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def regression_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4] * 2), batch_size=8)


def on_cpu(fitter: L.Trainer, plugin: BitsandbytesPrecision) -> L.Trainer:
    """``fitter`` with ``plugin`` as its precision plugin. Lightning's Trainer accepts ``BitsandbytesPrecision`` only
    with a CUDA accelerator ("Bitsandbytes is only supported on CUDA GPUs"), although bitsandbytes quantizes and
    computes on CPU too; set after construction, the plugin runs the same code on CPU as on a GPU: layers replaced in
    ``convert_module``, weights quantized when the strategy moves the model to its device."""
    fitter.strategy.precision_plugin = plugin
    return fitter


@pytest.mark.parametrize("mode", ["nf4-dq", "fp4"])
def test_lora_under_bitsandbytes_precision_plugin(mode, tmp_path, caplog):
    module = Regressor()
    plugin = BitsandbytesPrecision(mode, dtype=torch.float32, ignore_modules={"net.4"})  # the head stays trainable
    with caplog.at_level(logging.INFO):
        on_cpu(trainer(tmp_path, steps=15, callbacks=[LoRACallback(rank=8)]), plugin).fit(module, regression_data())
    assert module.losses[-1] < module.losses[0]
    layers = quantized.quantized_layers(module)
    assert sorted(layers) == ["net.0.base_layer", "net.2.base_layer"]
    assert all(quantized.stores_quantized(m) for m in layers.values())  # quantized when moved to the device
    factors = [p for m in module.modules() if hasattr(m, "adapters") for p in m.adapters.parameters()]
    assert len(factors) == 4  # the LoRA factors are plain float32 layers: not replaced, not quantized
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 and p.requires_grad for p in factors)
    assert module.net[4].weight.requires_grad and module.net[4].weight.dtype == torch.float32
    assert "stays unmerged" in caplog.text


def test_lora_under_the_plugin_in_int8(tmp_path):
    module = Regressor()
    plugin = BitsandbytesPrecision("int8", dtype=torch.float16)  # the plugin allows int8 with float16 only
    lora = LoRACallback(rank=8, train_head=False, target_modules=["net.0", "net.2", "net.4"])
    on_cpu(trainer(tmp_path, steps=15, callbacks=[lora]), plugin).fit(module, regression_data())
    assert module.losses[-1] < module.losses[0]
    assert all(quantized.quantized_kind(module.net[i].base_layer) == "linear_8bit" for i in (0, 2, 4))
    assert all(quantized.stores_quantized(module.net[i].base_layer) for i in (0, 2, 4))


def test_a_quantized_head_cannot_train_and_says_how_to_keep_it(tmp_path):
    plugin = BitsandbytesPrecision("nf4", dtype=torch.float32)
    fitter = on_cpu(trainer(tmp_path, steps=1, callbacks=[LoRACallback(rank=8)]), plugin)
    with pytest.raises(ValueError, match=r"task head .*\(net.4\) is a quantized bitsandbytes layer.*ignore_modules"):
        fitter.fit(Regressor(), regression_data())
    module = Regressor()
    lora = LoRACallback(rank=8, train_head=False, target_modules=["net.0", "net.2", "net.4"])
    on_cpu(trainer(tmp_path, steps=2, callbacks=[lora]), BitsandbytesPrecision("nf4", dtype=torch.float32)).fit(
        module, regression_data()
    )
    assert all(hasattr(module.net[i], "adapters") for i in (0, 2, 4))  # a frozen quantized head can get LoRA


def test_resuming_under_the_plugin_is_refused_clearly(tmp_path):
    plugin = BitsandbytesPrecision("nf4", dtype=torch.float32)
    fitter = on_cpu(trainer(tmp_path, steps=1, callbacks=[LoRACallback(rank=4)]), plugin)
    path = tmp_path / "last.ckpt"
    first = trainer(tmp_path, steps=1, callbacks=[LoRACallback(rank=4, merge_on_train_end=False)])
    first.fit(Regressor(), regression_data())
    first.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"cannot resume from `ckpt_path` under BitsandbytesPrecision"):
        fitter.fit(Regressor(), regression_data(), ckpt_path=os.fspath(path))
