"""QLoRA with a plain ``ModelCheckpoint``: the checkpoints it writes load back for ``validate(ckpt_path=...)`` and for
resuming, the 4-bit base with its quantization statistics (``absmax``, ``quant_map``, ``quant_state``, …), and the
resumed run ends where the uninterrupted one does."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

from test_quantized import load_quantized, logits, quantized_state, save_tiny_llama  # noqa: E402
from test_quantized_lightning import CausalLM, token_data  # noqa: E402

from peft_callbacks import LoRACallback, load_checkpoint  # noqa: E402
from peft_callbacks.core import quantized  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory)


class Validated(CausalLM):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss)


def fit(llama_dir, fmt, root, epochs, checkpoint=None, **kwargs) -> tuple[L.Trainer, Validated]:
    module = Validated(load_quantized(llama_dir, fmt))
    torch.manual_seed(0)  # the same initial factors in every run
    callbacks = [LoRACallback(rank=8)] + ([checkpoint] if checkpoint is not None else [])
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=checkpoint is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, token_data(), token_data(1), **kwargs)
    return trainer, module


@pytest.mark.parametrize("fmt", ["nf4-dq", "int8"])
def test_plain_model_checkpoint_validates_and_resumes_on_a_quantized_base(llama_dir, fmt, tmp_path):
    _, straight = fit(llama_dir, fmt, tmp_path / "straight", epochs=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)
    first, module = fit(llama_dir, fmt, tmp_path / "first", epochs=1, checkpoint=checkpoint)
    best, last = checkpoint.best_model_path, checkpoint.last_model_path
    assert best and last
    logged = float(first.callback_metrics["val_loss"])

    before = quantized_state(module.model)
    validated = first.validate(module, token_data(1), ckpt_path=best, verbose=False)
    assert validated[0]["val_loss"] == pytest.approx(logged, rel=1e-5)
    after = quantized_state(module.model)
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    loaded = load_checkpoint(Validated(load_quantized(llama_dir, fmt)), best, merged=False)  # outside a Trainer
    ids = token_data(1).dataset.tensors[0]
    torch.testing.assert_close(logits(loaded.model, ids), logits(module.model, ids), rtol=0, atol=1e-6)

    _, resumed = fit(llama_dir, fmt, tmp_path / "resumed", epochs=2, ckpt_path=last)
    assert len(resumed.losses) == 2 and resumed.losses == pytest.approx(straight.losses[2:], rel=1e-5)
    factors = {k: v for k, v in straight.state_dict().items() if ".lora_" in k}
    mine = resumed.state_dict()
    assert factors and all(torch.equal(mine[k], v) for k, v in factors.items())  # as if never interrupted


def test_the_stored_statistics_are_the_ones_loaded(llama_dir, tmp_path):
    """Loading puts the checkpoint's packed weights and scales into the layer, not whatever it held before."""
    source = load_quantized(llama_dir)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    target = load_quantized(llama_dir)
    layer_path, layer = next(iter(quantized.quantized_layers(target).items()))
    with torch.no_grad():
        layer.weight.quant_state.absmax.mul_(2)  # the target's own scales differ from the stored ones
    loaded = quantized.load_quantized_states(target, state)
    assert layer_path in loaded and not any(".absmax" in k or ".quant_state." in k for k in state)
    target.load_state_dict(state)  # strict: nothing unexpected is left
    torch.testing.assert_close(quantized.dequantize(layer), quantized.dequantize(source.get_submodule(layer_path)))
