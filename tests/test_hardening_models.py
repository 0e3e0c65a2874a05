"""Models that broke, or silently did the wrong thing, when tried from outside (hardening issue, items 6-17).

Tied weights are never merged into twice; every adapted layer has a gradient path (Reformer's reversible layers,
Mamba's directly-read ``dt_proj``); Falcon's own Linear class and DaViT's attribute reads work; merged equals adapted
on SwinV2 and Zamba2; a second callback with other settings is refused; an adapter that cannot train is named after
the first step; the plain surgery freezes BatchNorm statistics as the callback does.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import lightning as L
import pytest
import timm
import torch
import torch.nn as nn
import transformers as hf
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks import LoRACallback, LoRAConfig, PEFTCallback, inject_lora, lora_layers, merge_lora
from peft_callbacks.core.params import has_frozen_batchnorm_stats
from peft_callbacks.demo import ImageClassifier
from peft_callbacks.methods.lora.method import lora_adapters


def _randomize(model: nn.Module, std: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in lora_adapters(model).values():
            lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=generator) * std)


def _merge_matches(model: nn.Module, run, atol: float = 1e-5) -> None:
    _randomize(model)
    with torch.no_grad():
        adapted = run(model)
        merged = run(merge_lora(model))
    torch.testing.assert_close(merged, adapted, atol=atol, rtol=1e-4)


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    return hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30)).eval()


# -- 6. tied weights ----------------------------------------------------------------------------------------------
def test_lora_on_a_tied_head_is_refused_naming_the_tie():
    with pytest.raises(ValueError, match=r"'lm_head'.*same tensor as 'transformer\.wte'.*tied weights"):
        inject_lora(_gpt2(), rank=2, target_modules=["lm_head"], train_head=False)


def test_two_layers_sharing_one_weight_are_refused_when_named_and_left_out_by_default(caplog):
    def net():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
        model[2].weight = model[0].weight
        return model

    with pytest.raises(ValueError, match=r"'0'.*same tensor as '2'"):
        inject_lora(net(), rank=2, target_modules=["0", "2"])
    with caplog.at_level(logging.INFO):
        model = inject_lora(net(), rank=2)
    assert not lora_layers(model) or set(lora_layers(model)).isdisjoint({"0", "2"})
    assert "tied to another layer" in caplog.text


def test_zamba2_shared_blocks_merge_exactly():
    torch.manual_seed(0)
    config = hf.Zamba2Config(
        vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
        mamba_d_state=8, mamba_headdim=8, n_mamba_heads=8, intermediate_size=48, mamba_expand=2,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], hybrid_layer_ids=[1, 3], num_mem_blocks=1,
        use_shared_attention_adapter=False, use_shared_mlp_adapter=False,
    )  # fmt: skip
    model = inject_lora(hf.Zamba2ForCausalLM(config).eval(), rank=4)
    ids = torch.randint(1, 50, (2, 6))
    _merge_matches(model, lambda m: m(input_ids=ids).logits)


# -- 7. every adapted layer trains ----------------------------------------------------------------------------------
def _grads_reach_every_lora(model: nn.Module, loss) -> list[str]:
    _randomize(model, std=0.5)
    loss(model).backward()
    return [
        p for p, a in lora_adapters(model).items() if a.lora_A.weight.grad is None or not a.lora_A.weight.grad.any()
    ]


def test_reformer_reversible_layers_train_their_lora():
    torch.manual_seed(0)
    config = hf.ReformerConfig(
        vocab_size=50, hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=32,
        axial_pos_shape=[2, 4], axial_pos_embds_dim=[8, 8], attn_layers=["local", "local"], num_labels=2,
        is_decoder=False, local_attn_chunk_length=4, max_position_embeddings=8, pad_token_id=0,
    )  # fmt: skip
    model = inject_lora(hf.ReformerForSequenceClassification(config).train(), rank=2)
    ids = torch.randint(1, 50, (2, 8))
    assert len(lora_layers(model)) == 12
    assert _grads_reach_every_lora(model, lambda m: m(input_ids=ids, labels=torch.tensor([0, 1])).loss) == []


def _mamba() -> nn.Module:
    torch.manual_seed(0)
    config = hf.MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3)
    return hf.MambaForCausalLM(config)


def test_mamba_dt_proj_is_left_out_by_default_and_refused_by_name():
    model = inject_lora(_mamba(), rank=2)
    assert not any(p.endswith("dt_proj") for p in lora_layers(model))
    ids = torch.randint(0, 50, (2, 6))
    assert _grads_reach_every_lora(model, lambda m: m(input_ids=ids, labels=ids).loss) == []
    with pytest.raises(ValueError, match="its parent never calls"):
        inject_lora(_mamba(), rank=2, target_modules=["dt_proj"])


# -- 9. a second callback with other settings -------------------------------------------------------------------------
def _image_data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=4)


def _trainer(callbacks, steps: int = 1) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def test_a_second_fit_with_another_rank_is_refused_and_the_same_rank_continues():
    module = ImageClassifier("test_resnet", num_classes=3)
    _trainer([LoRACallback(rank=8, merge_on_train_end=False)]).fit(module, _image_data())
    with pytest.raises(ValueError, match=r"rank: 8 there, 2 here"):
        _trainer([LoRACallback(rank=2)]).fit(module, _image_data())
    _trainer([LoRACallback(rank=8)]).fit(module, _image_data())  # same settings: training continues
    assert not lora_layers(module)  # and ends merged


# -- 10-12. Falcon's own Linear, DaViT's attribute reads, SwinV2's merge ------------------------------------------
def test_falcon_linear_subclass_is_adapted_and_merges_exactly():
    torch.manual_seed(0)
    config = hf.FalconConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    model = hf.FalconForCausalLM(config).eval()
    assert type(model.transformer.h[0].self_attention.query_key_value).__name__ == "FalconLinear"
    inject_lora(model, rank=2)
    assert len(lora_layers(model)) == 8  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h in both blocks
    ids = torch.randint(0, 50, (2, 6))
    _merge_matches(model, lambda m: m(input_ids=ids).logits)


def test_a_linear_subclass_that_is_not_linear_in_its_weight_is_left_out():
    class Standardised(nn.Linear):
        def forward(self, x):
            w = self.weight
            return nn.functional.linear(x, (w - w.mean()) / w.std(), self.bias)

    model = nn.Sequential(Standardised(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    assert list(lora_layers(inject_lora(model, rank=2))) == ["1"]


def test_davit_reads_attributes_of_the_layers_it_calls():
    torch.manual_seed(0)
    model = timm.create_model(
        "davit_tiny", pretrained=False, num_classes=3, depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128),
        num_heads=(1, 2, 4, 8),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    inject_lora(model, rank=2)
    assert any(type(m.base_layer).__name__ == "Conv2d" for m in lora_layers(model).values())
    _merge_matches(model, lambda m: m(x))


def test_swinv2_merged_equals_adapted():
    torch.manual_seed(0)
    model = timm.create_model(
        "swinv2_tiny_window8_256", pretrained=False, num_classes=3, depths=(1, 1, 1, 1), embed_dim=16,
        num_heads=(1, 2, 2, 4),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 256, 256)
    inject_lora(model, rank=4)
    _merge_matches(model, lambda m: m(x))


# -- 15. an adapter that cannot train is named after the first step -------------------------------------------------
def test_lora_behind_zero_scale_batchnorm_is_named_after_the_first_step():
    module = ImageClassifier("test_resnet", num_classes=3)  # timm zeroes the last BatchNorm scale of each block
    with pytest.warns(UserWarning, match=r"got no gradient and will not train: model\.layer1\.0\.conv1"):
        _trainer([LoRACallback(rank=2)], steps=2).fit(module, _image_data())


def _no_gradient_warnings(callback, module=None, steps: int = 2) -> list[str]:
    import warnings

    # from scratch: timm zeroes the last BatchNorm scale of each residual block
    module = module or ImageClassifier("resnet10t", num_classes=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer([callback], steps=steps).fit(module, _image_data())
    return [str(w.message) for w in caught if "got no gradient" in str(w.message)]


def test_the_no_gradient_warning_names_train_bn_when_a_frozen_zero_batchnorm_blocks_the_adapters():
    (message,) = _no_gradient_warnings(LoRACallback(rank=2))
    assert "model.layer1.0.conv1" in message and "all-zero, frozen scale" in message
    assert "LoRACallback(train_bn=True)" in message
    (message,) = _no_gradient_warnings(PEFTCallback(LoRAConfig(rank=2)))  # no train_bn argument: the config has it
    assert "PEFTCallback(LoRAConfig(..., train_bn=True))" in message


def test_with_train_bn_the_adapters_behind_zero_scale_batchnorm_train_and_no_warning():
    module = ImageClassifier("resnet10t", num_classes=3)
    # the zero scale moves at the first step, so the adapters get gradients from the second: nothing to warn about
    assert _no_gradient_warnings(LoRACallback(rank=2, train_bn=True, merge_on_train_end=False), module) == []
    blocked = lora_adapters(module.model)["layer1.0.conv1.adapters.default"]
    assert blocked.lora_B.weight.abs().max() > 0  # it trained (B starts at zero)
    assert _no_gradient_warnings(LoRACallback(rank=2, train_bn=True), steps=1) == []  # nothing said before it could


def test_an_adapter_the_model_never_calls_gets_the_usual_causes_not_train_bn():
    module = ImageClassifier("resnet10t", num_classes=3)
    module.model.spare = nn.Linear(4, 4)  # adapted, never called
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer([LoRACallback(rank=2, train_bn=True)], steps=2).fit(module, _image_data())
    (message,) = [str(w.message) for w in caught if "got no gradient" in str(w.message)]
    assert "after the first step, 1 adapted module(s) got no gradient and will not train: model.spare." in message
    assert "the model never calls the layer" in message and "train_bn=True" not in message


# -- 16. one BatchNorm rule with or without a Trainer -----------------------------------------------------------------
def test_plain_surgery_freezes_batchnorm_statistics_like_the_callback():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    bn = model.bn1
    stats = bn.running_mean.clone()
    inject_lora(model, rank=2)
    model.train()(torch.randn(2, 3, 32, 32))
    assert has_frozen_batchnorm_stats(bn) and torch.equal(bn.running_mean, stats)
    merge_lora(model)
    assert not has_frozen_batchnorm_stats(bn)  # a plain model again
    trained = inject_lora(timm.create_model("test_resnet", pretrained=False, num_classes=3), rank=2, train_bn=True)
    assert trained.bn1.weight.requires_grad and not has_frozen_batchnorm_stats(trained.bn1)


# -- 17. a bad callback argument is the last line the CLI prints ---------------------------------------------------
def test_cli_argument_error_is_the_last_line(tmp_path):
    command = [
        sys.executable, "-m", "peft_callbacks.cli", "fit", "--model=peft_callbacks.demo.ImageClassifier",
        "--data=peft_callbacks.demo.DigitsDataModule", "--trainer.callbacks+=peft_callbacks.LoRACallback",
        "--trainer.callbacks.rank=0", f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1]
    assert "`rank` must be an int >= 1, got 0" in last, done.stderr[-2000:]


def test_the_unfreezing_log_line_names_as_many_layers_as_it_counts(caplog):
    import re

    from peft_callbacks import HeadThenFull

    module = ImageClassifier("test_resnet", num_classes=3)
    trainer = L.Trainer(
        max_epochs=2, callbacks=[HeadThenFull(head_epochs=1)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer.fit(module, _image_data())
    line = next(r.getMessage() for r in caplog.records if "unfroze" in r.getMessage())
    count = int(re.search(r"unfroze (\d+) layer", line).group(1))
    assert count > 1 and len(re.findall(r"layer \d+: ", line)) == count
