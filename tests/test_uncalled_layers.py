"""Layers whose parent reads ``.weight`` instead of calling them (longcat_flash's MoE router:
``F.linear(h, self.classifier.weight)``): their adapters never run, so they are never merged (HF PEFT merges them and
changes the routing), and the callbacks leave them out after the first step, also when resuming."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks import LoRACallback, inject_lora, lora_layers, merge
from peft_callbacks.core.recipe import surgery_records
from peft_callbacks.engine.adapters import merge_adapter, unmerge_adapter

TARGETS = ["proj", "classifier", "experts.0", "experts.1", "experts.2", "spare"]


class Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(8, 3, bias=False)

    def forward(self, h):
        return F.linear(h.float(), self.classifier.weight.float())  # as longcat_flash: the layer is never called


class Routed(nn.Module):
    """A dense mixture of three experts weighted by a router that reads its weight; ``spare`` is never used."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.router = Router()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.spare = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        weights = self.router(h).softmax(-1)  # (B, 3)
        return self.head(sum(weights[:, i : i + 1] * expert(h) for i, expert in enumerate(self.experts)))


def moved(model: nn.Module, scale: float = 0.5) -> nn.Module:
    """LoRA factors away from their start (B = 0 would hide a wrong merge)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model


def inputs() -> torch.Tensor:
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(1))


def test_peft_merges_the_router_adapter_and_changes_the_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(Routed(), peft.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    x = inputs()
    adapted = model(x)
    merged = model.merge_and_unload()(x)
    assert not torch.allclose(merged, adapted, atol=1e-3)  # PEFT's bug: the adapter never ran, its merge counts


def test_our_merge_leaves_an_uncalled_layer_out(caplog):
    model = moved(inject_lora(Routed(), rank=2, target_modules=TARGETS))
    router = model.router.classifier.base_layer.weight.detach().clone()
    x = inputs()
    with torch.no_grad():
        adapted = model(x)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        merge(model)
    assert "never called (router.classifier)" in caplog.text
    merged = model(x)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5 * float(adapted.abs().max()))
    assert type(model.router.classifier) is nn.Linear and torch.equal(model.router.classifier.weight, router)


def test_merge_adapter_skips_it_too():
    model = moved(inject_lora(Routed(), rank=2, target_modules=TARGETS))
    x = inputs()
    with torch.no_grad():
        adapted = model(x)
    merge_adapter(model)
    assert model.router.classifier.merged_adapters == [] and model.proj.merged_adapters == ["default"]
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5 * float(adapted.abs().max()))
    unmerge_adapter(model)


def test_without_any_forward_nothing_is_known_and_everything_merges():
    model = moved(inject_lora(Routed(), rank=2, target_modules=TARGETS))
    before = model.router.classifier.base_layer.weight.detach().clone()
    merge(model)  # an adapter loaded from a file and merged at once: it is folded as before
    assert not torch.equal(model.router.classifier.weight, before)


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = Routed()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.model(batch[0]), batch[1])
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(2)
    return DataLoader(TensorDataset(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)), 4)


def fit(root, epochs: int, callbacks=(), **kwargs) -> tuple[L.Trainer, Module]:
    module = Module()
    torch.manual_seed(0)  # the same initial factors in every run
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[LoRACallback(rank=2, target_modules=TARGETS, merge_on_train_end=False), *callbacks],
        default_root_dir=root,
        logger=False,
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data(), **kwargs)
    return trainer, module


def test_the_callback_leaves_the_router_out_after_the_first_step(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        trainer, module = fit(tmp_path, epochs=1)
    assert "left out 1 layer(s) the model never calls (model.router.classifier)" in caplog.text
    assert type(module.model.router.classifier) is nn.Linear
    assert set(lora_layers(module)) == {
        "model.proj",
        "model.experts.0",
        "model.experts.1",
        "model.experts.2",
        "model.spare",
    }
    torch.testing.assert_close(module.model.router.classifier.weight, Routed().router.classifier.weight)
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held and held <= {id(p) for p in module.parameters()}  # the dropped adapter's tensors are not optimized
    (record,) = surgery_records(module)  # a generic model: the LightningModule itself carries the record
    assert "model.router.classifier" not in record["config"]["targets"]
    assert record["dropped"] == ["model.router.classifier"]
    assert "no gradient" not in caplog.text or "router" not in caplog.text.split("no gradient")[1][:300]


def test_a_resumed_run_leaves_it_out_again_and_ends_where_an_uninterrupted_one_does(tmp_path):
    _, straight = fit(tmp_path / "straight", epochs=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "first", epochs=1, callbacks=[checkpoint])
    _, resumed = fit(
        tmp_path / "resumed", epochs=2, callbacks=[ModelCheckpoint()], ckpt_path=checkpoint.last_model_path
    )
    assert type(resumed.model.router.classifier) is nn.Linear
    assert resumed.losses == pytest.approx(straight.losses[4:], rel=1e-5)
    mine = resumed.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in straight.state_dict().items())


def longcat():
    hf = pytest.importorskip("transformers")
    if not hasattr(hf, "LongcatFlashConfig"):
        pytest.skip("this transformers has no longcat_flash")
    torch.manual_seed(0)
    config = hf.LongcatFlashConfig(
        vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=2, num_key_value_heads=2, ffn_hidden_size=32,
        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=8,
        moe_topk=2, n_routed_experts=4, zero_expert_num=2, expert_ffn_hidden_size=16, max_position_embeddings=64,
        pad_token_id=0,
    )  # fmt: skip
    return hf.LongcatFlashForCausalLM(config)


def test_longcat_flash_router():
    peft = pytest.importorskip("peft")
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    theirs = peft.get_peft_model(longcat(), peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    theirs.eval()
    with torch.no_grad():
        adapted = theirs(ids).logits
        merged = theirs.merge_and_unload()(ids).logits
    assert not torch.allclose(merged, adapted, atol=1e-4)  # PEFT: the router's LoRA never ran, yet it is merged

    ours = moved(inject_lora(longcat(), rank=2), scale=0.05).eval()
    assert "model.layers.0.mlp.router.classifier" in lora_layers(ours)
    with torch.no_grad():
        adapted = ours(ids).logits
        merge(ours)
        merged = ours(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4 * float(adapted.abs().max()))
