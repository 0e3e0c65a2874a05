"""rsLoRA, DoRA and LoRA+: scaling, agreement with HF peft, merge, recipe replay, optimizer groups, callback options."""

from __future__ import annotations

import copy
import math
import pickle

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from transformers.pytorch_utils import Conv1D
from zoo import HF_MODELS, TIMM_MODELS, run

from peft_callbacks import LoRACallback
from peft_callbacks.core.modules import PEFTModule
from peft_callbacks.core.recipe import surgery_records
from peft_callbacks.engine import adapt_layer
from peft_callbacks.engine import replay as replay_surgery
from peft_callbacks.methods.lora import (
    DoRAConv,
    DoRAConv1D,
    DoRALinear,
    LoRAConfig,
    inject_lora,
    lora_B_parameters,
    lora_layers,
    loraplus_param_groups,
    merge_lora,
    split_loraplus_groups,
)
from peft_callbacks.methods.lora.method import lora_adapters


# -- rsLoRA -------------------------------------------------------------------------------------------------------
def test_rslora_scaling_value():
    net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=4, alpha=8, use_rslora=True)
    assert net[0].adapters["default"].scaling == pytest.approx(8 / math.sqrt(4))
    plain = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=4, alpha=8)
    assert plain[0].adapters["default"].scaling == pytest.approx(8 / 4)


def _copy_factors_to_peft(ours: nn.Module, peft_model: nn.Module, seed: int = 0) -> None:
    """Give our LoRA layers non-identity factors and copy A, B (and DoRA's m) into peft's layers at the same paths."""
    gen = torch.Generator().manual_seed(seed)
    reference = peft_model.base_model.model
    with torch.no_grad():
        for path, layer in lora_layers(ours).items():
            layer = layer.adapters["default"]
            theirs = reference.get_submodule(path)
            for mine, other in ((layer.lora_A, theirs.lora_A["default"]), (layer.lora_B, theirs.lora_B["default"])):
                mine.weight.copy_(torch.randn(mine.weight.shape, generator=gen) * 0.3)
                other.weight.copy_(mine.weight)
            if isinstance(layer, (DoRALinear, DoRAConv, DoRAConv1D)):
                m = layer.lora_magnitude_vector
                m.mul_(torch.rand(m.shape, generator=gen) + 0.5)
                target = theirs.lora_magnitude_vector["default"].weight
                target.copy_(m.view_as(target))


def test_rslora_matches_peft():
    model, inputs = HF_MODELS["bert"]()
    targets = ["query", "value"]
    reference = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=True)
    )
    ours = inject_lora(copy.deepcopy(model), rank=4, alpha=8, target_modules=targets, use_rslora=True)
    _copy_factors_to_peft(ours, reference)
    torch.testing.assert_close(run(ours, inputs), run(reference, inputs), atol=1e-5, rtol=1e-5)


# -- DoRA ---------------------------------------------------------------------------------------------------------
class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


_DORA_CASES = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6), DoRALinear),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 5, 5), DoRAConv),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2), lambda: torch.randn(2, 3, 9), DoRAConv),
    "hf_conv1d": (lambda: Conv1D(5, 6), lambda: torch.randn(3, 6), DoRAConv1D),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("case", list(_DORA_CASES))
def test_dora_matches_peft_outputs_and_gradients(case, dropout):
    make_layer, make_x, expected_type = _DORA_CASES[case]
    torch.manual_seed(0)
    model, x = _Holder(make_layer()), make_x()
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["layer"], use_dora=True, lora_dropout=dropout)
    if case == "hf_conv1d":
        config.fan_in_fan_out = True
    reference = get_peft_model(copy.deepcopy(model), config)
    ours = inject_lora(
        copy.deepcopy(model),
        rank=2,
        alpha=3,
        dropout=dropout,
        target_modules=["layer"],
        train_head=False,
        use_dora=True,
    )
    assert type(ours.layer.adapters["default"]) is expected_type
    _copy_factors_to_peft(ours, reference)
    torch.manual_seed(1)
    out = ours(x)
    torch.manual_seed(1)
    ref = reference(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    theirs = reference.base_model.model.layer
    pairs = [
        (ours.layer.adapters["default"].lora_A.weight, theirs.lora_A["default"].weight),
        (ours.layer.adapters["default"].lora_B.weight, theirs.lora_B["default"].weight),
        (ours.layer.adapters["default"].lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight),
    ]
    for mine, other in pairs:  # the norm is a constant in backward in both
        torch.testing.assert_close(mine.grad, other.grad.view_as(mine.grad), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["vit", "resnet", "gpt2"])
def test_dora_starts_as_identity_and_merges_into_a_plain_model(family):
    build = TIMM_MODELS.get(family) or HF_MODELS[family]
    model, inputs = build()
    model.eval()  # frozen BatchNorm layers normalise with their running statistics after injection
    before = run(model, inputs)
    ours = inject_lora(model, rank=2, use_dora=True)
    torch.testing.assert_close(run(ours, inputs), before, atol=1e-5, rtol=1e-5)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_adapters(ours).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
            layer.lora_magnitude_vector.mul_(1.1)
    adapted = run(ours, inputs)
    assert not torch.allclose(adapted, before, atol=1e-3)
    keys = set(ours.state_dict())
    merged = merge_lora(ours)
    assert not lora_layers(merged)
    torch.testing.assert_close(run(merged, inputs), adapted, atol=1e-4, rtol=1e-4)
    assert not any(k.endswith("lora_magnitude_vector") for k in merged.state_dict())
    assert any(k.endswith("lora_magnitude_vector") for k in keys)
    weights = {k: v.clone() for k, v in merged.state_dict().items()}
    merge_lora(merged)  # idempotent
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in weights.items())


def test_dora_merge_refuses_non_finite_and_leaves_model_unmerged():
    net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2, use_dora=True)
    with torch.no_grad():
        net[0].adapters["default"].lora_magnitude_vector[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge_lora(net)
    assert isinstance(net[0].adapters["default"], DoRALinear)


def _dora_merge_by_hand(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``m · (W₀ + s·B·A) / ‖W₀ + s·B·A‖_c`` computed here in ``dtype`` from the layer's own tensors."""
    dora = layer.adapters["default"]
    w = layer.base_layer.weight.to(dtype) + dora.scaling * (dora.lora_B.weight.to(dtype) @ dora.lora_A.weight.to(dtype))
    return dora.lora_magnitude_vector.to(dtype)[:, None] * w / w.norm(dim=1, keepdim=True)


def test_dora_bf16_merge_is_computed_in_float32():
    torch.manual_seed(0)
    net = inject_lora(nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 2)), rank=8, use_dora=True)
    with torch.no_grad():
        nn.init.normal_(net[0].adapters["default"].lora_B.weight, std=0.05)
        net[0].adapters["default"].lora_magnitude_vector.mul_(torch.rand(256) + 0.5)
    net = net.to(torch.bfloat16)
    with torch.no_grad():
        exact = _dora_merge_by_hand(net[0], torch.float64)  # from the very bf16 tensors the merge sees
        in_bf16 = _dora_merge_by_hand(net[0], torch.bfloat16)  # what a merge computed in bf16 would give
    merged = merge_lora(net)[0].weight.detach()
    assert merged.dtype == torch.bfloat16

    def error(w):
        return (w.double() - exact).abs()

    one_rounding = error(exact.to(torch.bfloat16))
    assert error(merged).max() <= one_rounding.max()  # the merge is one rounding of the exact value,
    assert error(merged).mean() <= 1.001 * one_rounding.mean()  # up to the odd tie
    assert error(in_bf16).max() > 2 * one_rounding.max()  # which a merge computed in bf16 is not
    assert error(in_bf16).mean() > 1.5 * one_rounding.mean()


def test_dora_zero_row_stays_finite():
    base = nn.Linear(4, 3)
    with torch.no_grad():
        base.weight[1] = 0
    layer = adapt_layer(base, LoRAConfig(rank=2, alpha=2, use_dora=True))
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer(x), base(x))  # m = 0 on that row: 0 / floor, not 0 / 0
    assert torch.isfinite(layer.merged_weight()).all()


def test_dora_magnitude_is_a_trainable_param_of_the_peft_module_and_replays():
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    fresh = copy.deepcopy(base)
    net = inject_lora(base, rank=2, use_dora=True)
    assert isinstance(net[0], PEFTModule)
    assert net[0].adapters["default"].lora_magnitude_vector.requires_grad
    assert "0.adapters.default.lora_magnitude_vector" in net.state_dict()
    records = surgery_records(net)
    assert records[0]["config"]["use_dora"] is True
    with torch.no_grad():
        net[0].adapters["default"].lora_B.weight.normal_()
        net[0].adapters["default"].lora_magnitude_vector.mul_(2)
    replay_surgery(fresh, records)
    assert isinstance(fresh[0].adapters["default"], DoRALinear)
    fresh.load_state_dict(net.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), net(x))


# -- LoRA+ --------------------------------------------------------------------------------------------------------
def _lora_net():
    torch.manual_seed(0)
    return inject_lora(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)), rank=2)


def test_loraplus_param_groups_by_identity():
    net = _lora_net()
    groups = loraplus_param_groups(net, lr=1e-3, ratio=8, weight_decay=0.1)
    b_ids = {id(layer.lora_B.weight) for layer in lora_adapters(net).values()}
    assert {id(p) for p in groups[1]["params"]} == b_ids
    assert not b_ids & {id(p) for p in groups[0]["params"]}
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert groups[1]["lr"] == pytest.approx(8e-3) and groups[0]["weight_decay"] == groups[1]["weight_decay"] == 0.1


@pytest.mark.parametrize("ratio", [0, -1.0, float("nan")])
def test_loraplus_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        loraplus_param_groups(_lora_net(), lr=1e-3, ratio=ratio)
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        LoRACallback(loraplus_lr_ratio=ratio)


def test_loraplus_needs_lora_b():
    with pytest.raises(ValueError, match="lora_B"):
        loraplus_param_groups(nn.Linear(3, 3), lr=1e-3)


def _schedulers(kind, optimizer):
    if kind == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=20)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[3])


@pytest.mark.parametrize("kind", ["lambda", "onecycle", "sequential"])
def test_split_keeps_the_ratio_through_schedulers(kind):
    net = _lora_net()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.01, weight_decay=0.05)
    scheduler = _schedulers(kind, optimizer)
    assert split_loraplus_groups(optimizer, lora_B_parameters(net), ratio=4, schedulers=[scheduler]) == 2
    assert split_loraplus_groups(optimizer, lora_B_parameters(net), ratio=4, schedulers=[scheduler]) == 0
    first, second = optimizer.param_groups
    assert second["weight_decay"] == 0.05 and len(second["params"]) == 2
    for _ in range(8):
        net(torch.randn(4, 6)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        assert second["lr"] == pytest.approx(4 * first["lr"], rel=1e-6, abs=1e-12)
    assert scheduler.get_last_lr()[1] == pytest.approx(4 * scheduler.get_last_lr()[0], rel=1e-6)


class _Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _data():
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 6, generator=gen), torch.randint(0, 2, (16,), generator=gen)), 4)


def _trainer(tmp_path, callbacks, max_steps):
    return L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_callback_loraplus_splits_the_configured_optimizer_and_resumes(tmp_path):
    module = _Module()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callback = LoRACallback(rank=2, loraplus_lr_ratio=16, merge_on_train_end=False)
    trainer = _trainer(tmp_path, [callback, checkpoint], max_steps=3)
    trainer.fit(module, _data())
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and len(groups[1]["params"]) == 1
    assert groups[1]["params"][0] is module.net[0].adapters["default"].lora_B.weight
    assert all(p is not module.net[0].adapters["default"].lora_B.weight for p in groups[0]["params"])
    assert any(p is module.net[0].adapters["default"].lora_A.weight for p in groups[0]["params"])
    assert groups[1]["lr"] == pytest.approx(16 * groups[0]["lr"]) and groups[0]["lr"] == pytest.approx(0.01 / 8)

    resumed = _Module()
    callback = LoRACallback(rank=2, loraplus_lr_ratio=16, merge_on_train_end=False)
    trainer = _trainer(tmp_path, [callback], max_steps=5)
    trainer.fit(resumed, _data(), ckpt_path=str(tmp_path / "last.ckpt"))
    groups = trainer.optimizers[0].param_groups
    assert groups[1]["lr"] == pytest.approx(16 * groups[0]["lr"]) and groups[0]["lr"] == pytest.approx(0.01 / 32)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([0.01, 0.16])


def test_callback_dora_trains_merges_and_reloads_its_checkpoint(tmp_path):
    module = _Module()
    callback = LoRACallback(rank=2, use_dora=True)
    trainer = _trainer(tmp_path, [callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_steps=2)
    trainer.fit(module, _data(), _data())
    assert isinstance(module.net[0], nn.Linear) and not lora_layers(module)
    merged_loss = trainer.validate(module, _data())[0]["val_loss"]
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "net.0.weight" in checkpoint["state_dict"]  # the plain model, DoRA folded in; the magnitude beside it
    assert "net.0.adapters.default.lora_magnitude_vector" in checkpoint["peft_callbacks"]["tensors"]
    reloaded = trainer.validate(module, _data(), ckpt_path=str(tmp_path / "last.ckpt"))[0]["val_loss"]
    assert reloaded == pytest.approx(merged_loss, abs=1e-5)
    assert isinstance(module.net[0], nn.Linear)
    plain = _trainer(tmp_path, [LoRACallback(rank=2)], max_steps=1)  # the plain model loads as it is
    assert plain.validate(_Module(), _data(), ckpt_path=str(tmp_path / "last.ckpt"))[0]["val_loss"] == pytest.approx(
        merged_loss, abs=1e-5
    )


def test_callback_conflicting_variants_and_pickle():
    with pytest.raises(ValueError, match="use_dora"):
        LoRACallback(use_dora=True, lora_pro=True)
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        LoRACallback(lora_pro=True, loraplus_lr_ratio=16)
    with pytest.raises(TypeError, match="lora_pro"):
        LoRACallback(lora_pro="yes")
    callback = pickle.loads(pickle.dumps(LoRACallback(use_dora=True, loraplus_lr_ratio=4.0, use_rslora=True)))
    config = callback.state_dict()["config"]
    assert config["use_dora"] is True and config["loraplus_lr_ratio"] == 4.0 and config["lora_pro"] is False
