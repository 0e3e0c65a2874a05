"""LoRA ``init="loftq"`` (peft_callbacks.methods.lora.loftq) against HF PEFT: the same quantized weights and factors
as PEFT's ``loftq_init`` / ``replace_lora_weights_loftq``, a lower error than QLoRA's start, ``LoRACallback`` fits on
the quantized base it makes, files reload and cross to PEFT. Tiny Llama from a config, on CPU."""

from __future__ import annotations

import copy
import json
import logging

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
hf = pytest.importorskip("transformers")

from peft.utils.loftq_utils import loftq_init as peft_loftq_init  # noqa: E402
from peft.utils.loftq_utils import replace_lora_weights_loftq  # noqa: E402
from test_quantized import PROJECTIONS, load_quantized, logits, move_trained, save_tiny_llama, token_ids  # noqa: E402
from test_quantized_lightning import CausalLM, token_data, trainer  # noqa: E402

from peft_callbacks import (  # noqa: E402
    LoRACallback,
    SlimCheckpoint,
    export_peft,
    import_peft,
    inject,
    load_adapter,
    merge,
    save_adapter,
)
from peft_callbacks.core import quantized  # noqa: E402
from peft_callbacks.io.checkpoint import strip_loader_key  # noqa: E402
from peft_callbacks.methods.lora import LoRAConfig  # noqa: E402
from peft_callbacks.methods.lora.loftq import (  # noqa: E402
    LoftQOptions,
    loftq_decompose,
    loftq_init,
    loftq_quantize,
)

RANK = 8
CONFIG = LoRAConfig(rank=RANK, alpha=RANK, target_modules=PROJECTIONS)  # scaling 1: LoftQ's intended one


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory)


@pytest.fixture(autouse=True)
def peft_on_cpu(monkeypatch):
    """PEFT's LoftQ computes on its default accelerator, ours on the weight's device: compare both on the CPU."""
    monkeypatch.setattr(peft.utils.loftq_utils, "infer_device", lambda: "cpu")


def full_precision(folder: str) -> nn.Module:
    hf.logging.set_verbosity_error()
    return hf.AutoModelForCausalLM.from_pretrained(folder)


def peft_loftq(folder: str, bits: int, iters: int = 1) -> nn.Module:
    loftq = peft.LoftQConfig(loftq_bits=bits, loftq_iter=iters)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=RANK, target_modules=PROJECTIONS, init_lora_weights="loftq", loftq_config=loftq
    )
    return peft.get_peft_model(full_precision(folder), config)


def adapters(model: nn.Module) -> dict[str, nn.Module]:
    return {p.removesuffix(".adapters.default"): m for p, m in model.named_modules() if p.endswith("adapters.default")}


# -- the maths: PEFT's loftq_init, bit for bit -------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("iters", [1, 2])
def test_decomposition_equals_peft_loftq_init(bits, iters):
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(bits + iters))
    theirs_q, theirs_A, theirs_B = peft_loftq_init(weight, bits, RANK, iters)
    q, first, lora_A, lora_B = loftq_decompose(weight, bits, RANK, iters)
    dequantized = (
        bnb.functional.dequantize_4bit(q.data, q.quant_state)
        if bits == 4
        else bnb.functional.int8_vectorwise_dequant(q.data, q.SCB)
    )
    assert torch.equal(dequantized, theirs_q)
    assert torch.equal(lora_A, theirs_A) and torch.equal(lora_B, theirs_B)
    if iters == 1:
        assert torch.equal(first, dequantized)  # the first quantization is QLoRA's plain one


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_quantize_equals_peft_loftq_on_a_full_precision_model(llama_dir, bits):
    theirs = peft_loftq(llama_dir, bits)
    ours = full_precision(llama_dir)
    report = loftq_quantize(ours, CONFIG, LoftQOptions(loftq_bits=bits))
    kind = "linear_4bit" if bits == 4 else "linear_8bit"
    layers = adapters(ours)
    assert len(layers) == len(report.layers) == 2 * len(PROJECTIONS)
    for path, lora in layers.items():
        base = ours.get_submodule(path).base_layer
        assert quantized.quantized_kind(base) == kind and not base.weight.requires_grad
        their_layer = theirs.base_model.model.get_submodule(path)
        assert torch.equal(quantized.dequantize(base), their_layer.base_layer.weight)  # PEFT's new base weight
        assert torch.equal(lora.lora_A.weight, their_layer.lora_A["default"].weight)
        assert torch.equal(lora.lora_B.weight, their_layer.lora_B["default"].weight)
    ids = token_ids()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-5)


def test_per_layer_ranks_decompose_at_each_layers_rank_as_peft(llama_dir):
    patterns = dict(rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 4})
    their_config = peft.LoraConfig(
        r=RANK,
        lora_alpha=RANK,
        target_modules=PROJECTIONS,
        init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=4),
        **patterns,
    )
    theirs = peft.get_peft_model(full_precision(llama_dir), their_config)
    ours = full_precision(llama_dir)
    loftq_quantize(ours, CONFIG.replace(**patterns))
    for path, lora in adapters(ours).items():
        assert lora.r == (4 if path.endswith("q_proj") else RANK)
        their_layer = theirs.base_model.model.get_submodule(path)
        assert torch.equal(lora.lora_A.weight, their_layer.lora_A["default"].weight)
        assert torch.equal(lora.lora_B.weight, their_layer.lora_B["default"].weight)


def test_loftq_init_equals_replace_lora_weights_loftq_on_a_quantized_model(llama_dir):
    theirs = peft.get_peft_model(
        load_quantized(llama_dir, "nf4"), peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=PROJECTIONS)
    )
    replace_lora_weights_loftq(theirs, model_path=llama_dir)
    ours = load_quantized(llama_dir, "nf4")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    report = loftq_init(ours, llama_dir, CONFIG)
    for path, lora in adapters(ours).items():
        their_layer = theirs.base_model.model.get_submodule(path)
        assert torch.equal(lora.lora_A.weight, their_layer.lora_A["default"].weight)
        assert torch.equal(lora.lora_B.weight, their_layer.lora_B["default"].weight)
    now = {k.replace(".base_layer", ""): v for k, v in ours.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(now[k], v) for k, v in before.items())  # the quantized base untouched
    assert sorted(report.kept) == sorted(report.layers)
    ids = token_ids()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-5)


def test_gpt2_conv1d_layers_are_read_transposed_as_peft_reads_them():
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # the logits are compared in train mode
    config = hf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=99, n_positions=32, **no_dropout)
    torch.manual_seed(0)
    original = hf.GPT2LMHeadModel(config)
    targets = ["c_attn", "c_proj", "c_fc"]
    their_config = peft.LoraConfig(
        r=RANK,
        lora_alpha=RANK,
        target_modules=targets,
        fan_in_fan_out=True,
        init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=4),
    )
    theirs = peft.get_peft_model(copy.deepcopy(original), their_config)
    ours = copy.deepcopy(original)
    loftq_quantize(ours, LoRAConfig(rank=RANK, alpha=RANK, target_modules=targets))
    layers = adapters(ours)
    assert len(layers) == 2 * len(targets) + 2  # c_proj: attention's and the MLP's
    for path, lora in layers.items():
        their_layer = theirs.base_model.model.get_submodule(path)
        assert torch.equal(quantized.dequantize(ours.get_submodule(path).base_layer), their_layer.base_layer.weight.T)
        assert torch.equal(lora.lora_A.weight, their_layer.lora_A["default"].weight)
        assert torch.equal(lora.lora_B.weight, their_layer.lora_B["default"].weight)
    ids = token_ids()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-5)


def test_original_weights_from_a_file_a_sharded_folder_or_a_state_dict_agree(llama_dir, tmp_path):
    full_precision(llama_dir).save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sources = [f"{llama_dir}/model.safetensors", str(tmp_path), full_precision(llama_dir).state_dict()]
    reports = [loftq_init(load_quantized(llama_dir), source, CONFIG) for source in sources]
    assert reports[0].layers == reports[1].layers == reports[2].layers


# -- LoftQ lowers the error --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["nf4-dq", "int8"])
def test_loftq_init_lowers_the_weight_error_and_moves_outputs_towards_the_full_precision_model(llama_dir, fmt):
    ids = token_ids()
    reference = logits(full_precision(llama_dir), ids)
    qlora = inject(load_quantized(llama_dir, fmt), CONFIG)
    ours = load_quantized(llama_dir, fmt)
    state = full_precision(llama_dir).state_dict()  # a state dict works as well as the safetensors folder
    report = loftq_init(ours, state, CONFIG)
    assert all(after < before for before, after in report.layers.values())
    assert report.after < 0.9 * report.before
    assert (logits(ours, ids) - reference).norm() < (logits(qlora, ids) - reference).norm()


def test_loftq_quantize_lowers_the_error_and_more_iterations_keep_it_low(llama_dir):
    one = loftq_quantize(full_precision(llama_dir), CONFIG)
    five = loftq_quantize(full_precision(llama_dir), CONFIG, LoftQOptions(loftq_iter=5))
    assert all(after < before for before, after in one.layers.values())
    assert one.before == pytest.approx(five.before)  # the same plain NF4 start
    assert five.after < one.before and one.after < one.before
    assert "LoftQ: relative weight error" in str(one)


def test_an_evaluation_pass_before_loftq_init_reads_the_same_weights(llama_dir):
    model = load_quantized(llama_dir, "nf4")  # no double quantization: bitsandbytes' CPU layout was undone wrongly
    layer = model.model.layers[0].mlp.down_proj  # 128 inputs: two blocks of 64 per row
    before = quantized.dequantize(layer).clone()
    model.eval()
    with torch.no_grad():
        model(token_ids())
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not switch this CPU to its AVX512-BF16 layout")
    after = quantized.dequantize(layer)  # the layout undone: its scales rounded to bfloat16, nothing more
    assert (after - before).abs().max() <= 2**-7 * before.abs().max()
    report = loftq_init(model, llama_dir, CONFIG)
    assert all(before < 0.15 for before, _ in report.layers.values())  # NF4's error, not scales on the wrong blocks


def test_a_scaling_other_than_one_is_warned_and_shows_in_the_report(llama_dir, caplog):
    with caplog.at_level(logging.WARNING):
        report = loftq_quantize(full_precision(llama_dir), LoRAConfig(rank=RANK, alpha=2 * RANK))
    assert "set alpha = rank" in caplog.text
    assert report.after == pytest.approx(report.before, rel=1e-3)  # s = 2: the SVD step cancels its gain


def test_accept_rolls_back_the_layers_it_refuses(llama_dir):
    model = inject(load_quantized(llama_dir), CONFIG)
    before = {p: a.lora_A.weight.clone() for p, a in adapters(model).items()}
    report = loftq_init(model, llama_dir, accept=lambda m, path: "mlp" in path)
    assert report.kept and all("mlp" in p for p in report.kept)
    for path, lora in adapters(model).items():
        assert torch.equal(lora.lora_A.weight, before[path]) != ("mlp" in path)
    assert all(after == pytest.approx(before) for p, (before, after) in report.layers.items() if "mlp" not in p)


# -- Lightning: fit, save, reload, merge -------------------------------------------------------------------------------
def test_callback_fits_on_the_quantized_base_and_the_adapter_reloads_exactly(llama_dir, tmp_path):
    module = CausalLM(full_precision(llama_dir))
    lora = LoRACallback(rank=RANK, alpha=RANK, init="loftq", target_modules=PROJECTIONS, loftq_iter=2)
    trainer(tmp_path, steps=4, callbacks=[lora]).fit(module, token_data())
    layers = quantized.quantized_layers(module.model)
    assert len(layers) == 2 * len(PROJECTIONS)
    assert all(quantized.quantization_label(m) == "nf4" for m in layers.values())
    assert lora.kept_adapter  # a quantized base: unmerged and saved, as every QLoRA fit
    ids = token_ids()
    trained = logits(module.model, ids)
    fresh = full_precision(llama_dir)
    loftq_quantize(fresh, CONFIG.replace(init="loftq"), LoftQOptions(loftq_iter=2), adapter=False)
    reloaded = load_adapter(fresh, tmp_path / "adapter")  # its fingerprint checks the re-quantized base
    torch.testing.assert_close(logits(reloaded, ids), trained, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Cannot merge into .*bitsandbytes nf4 layer"):
        merge(module.model)
    merged = merge(module.model, dtype="float32")  # as any QLoRA merge: a plain model from the dequantized weights
    assert not quantized.quantized_layers(merged)
    torch.testing.assert_close(logits(merged, ids), trained, rtol=0, atol=1e-5)


def test_slim_checkpoints_resume_onto_the_base_loftq_quantizes_again(llama_dir, tmp_path):
    def fit(epochs: int, **kwargs) -> tuple[L.Trainer, CausalLM]:
        module = CausalLM(full_precision(llama_dir))
        callbacks = [LoRACallback(rank=RANK, alpha=RANK, init="loftq", target_modules=PROJECTIONS), SlimCheckpoint()]
        fitter = trainer(tmp_path, steps=-1, max_epochs=epochs, callbacks=callbacks)
        fitter.fit(module, token_data(), **kwargs)
        return fitter, module

    _, straight = fit(2)
    first, _ = fit(1)
    path = tmp_path / "slim.ckpt"
    first.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert strip_loader_key(state)
    assert state and all(".lora_" in k for k in state)  # the factors only: the base is LoftQ's Q, made again
    _, resumed = fit(2, ckpt_path=str(path))
    assert len(resumed.losses) == 2
    factors = {k: v for k, v in straight.state_dict().items() if ".lora_" in k}
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in factors.items())  # as if never interrupted


class ValidatedLM(CausalLM):
    def validation_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.log("val_loss", loss)
        return loss


def test_a_full_checkpoint_validates_on_a_fresh_module_quantized_as_the_fit_was(llama_dir, tmp_path):
    def callbacks(*more):
        return [LoRACallback(rank=RANK, alpha=RANK, init="loftq", target_modules=PROJECTIONS), *more]

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = ValidatedLM(full_precision(llama_dir))
    fitter = L.Trainer(
        max_steps=3, callbacks=callbacks(checkpoint), logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    fitter.fit(module, token_data())
    fresh = ValidatedLM(full_precision(llama_dir))
    trainer(tmp_path, callbacks=callbacks()).validate(fresh, token_data(), ckpt_path=checkpoint.last_model_path)
    assert len(quantized.quantized_layers(fresh.model)) == 2 * len(PROJECTIONS)  # LoftQ's base, then the adapter
    ids = token_ids()
    torch.testing.assert_close(logits(fresh.model, ids), logits(module.model, ids), rtol=0, atol=0)


def test_callback_on_a_quantized_base_reads_loftq_weights(llama_dir, tmp_path):
    module = CausalLM(load_quantized(llama_dir, "nf4"))
    lora = LoRACallback(rank=RANK, alpha=RANK, init="loftq", target_modules=PROJECTIONS, loftq_weights=llama_dir)
    trainer(tmp_path, steps=2, callbacks=[lora]).fit(module, token_data())
    assert lora.kept_adapter and len(adapters(module.model)) == 2 * len(PROJECTIONS)
    module = CausalLM(load_quantized(llama_dir, "nf4"))
    missing = LoRACallback(rank=RANK, init="loftq", target_modules=PROJECTIONS)
    with pytest.raises(ValueError, match=r"quantized already \(bitsandbytes nf4\).*loftq_weights="):
        trainer(tmp_path, steps=1, callbacks=[missing]).fit(module, token_data())


# -- files: HF PEFT's directories --------------------------------------------------------------------------------------
def test_export_loads_in_peft_on_its_loftq_base_and_peft_loftq_adapters_import(llama_dir, tmp_path, caplog):
    ids = token_ids()
    ours = full_precision(llama_dir)
    loftq_quantize(ours, CONFIG)
    move_trained(ours)
    export_peft(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["init_lora_weights"] is True  # a plain LoRA on the quantized base: PEFT loads it as such
    peft_base = peft_loftq(llama_dir, 4).unload()  # PEFT's LoftQ base: the dequantized weights in nn.Linear
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(peft_base), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=0, atol=1e-5)
    # PEFT's own LoftQ adapter (init_lora_weights "loftq" in its file) imports onto either base
    peft_model = peft_loftq(llama_dir, 4)
    move_trained(peft_model)
    peft_model.save_pretrained(tmp_path / "theirs")
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["init_lora_weights"] == "loftq"
    quantized_base = full_precision(llama_dir)
    loftq_quantize(quantized_base, CONFIG, adapter=False)
    for base in (quantized_base, peft_base):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            imported = import_peft(base, tmp_path / "theirs")
        assert "trained on PEFT's LoftQ base" in caplog.text and "adapter=False" in caplog.text
        torch.testing.assert_close(logits(imported, ids), logits(peft_model, ids), rtol=0, atol=1e-5)


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_bad_input_is_refused_naming_the_argument(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"`loftq_bits` must be 4 or 8 .*got 3"):
        LoftQOptions(loftq_bits=3)
    with pytest.raises(ValueError, match="`loftq_iter`"):
        LoftQOptions(loftq_iter=0)
    with pytest.raises(ValueError, match="`loftq_bits` must be 4 or 8"):
        LoRACallback(init="loftq", loftq_bits=2)
    with pytest.raises(ValueError, match=r"`init`='loftq' quantizes the base .*loftq_quantize"):
        inject(full_precision(llama_dir), LoRAConfig(init="loftq"))
    with pytest.raises(ValueError, match=r"not bitsandbytes layers.*loftq_quantize"):
        loftq_init(full_precision(llama_dir), llama_dir, CONFIG)
    with pytest.raises(ValueError, match=r"bitsandbytes layers already.*loftq_init"):
        loftq_quantize(load_quantized(llama_dir), CONFIG)
    model = load_quantized(llama_dir)
    with pytest.raises(ValueError, match=r"`original` \(the state dict\) has no weight 'model.layers.0.self_attn"):
        loftq_init(model, {"other.weight": torch.zeros(1)}, CONFIG)
    assert not adapters(model)  # checked before anything changed
    wrong = {
        k: v[:, :8] if k.endswith("up_proj.weight") else v for k, v in full_precision(llama_dir).state_dict().items()
    }
    with pytest.raises(ValueError, match=r"up_proj.weight has shape \(128, 8\), the quantized layer \(128, 64\)"):
        loftq_init(model, wrong, CONFIG)
    assert not adapters(model)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"`original`=.*weights.bin.* safetensors only"):
        loftq_init(load_quantized(llama_dir), str(tmp_path / "weights.bin"), CONFIG)
    with pytest.raises(TypeError, match="`original` must be a state dict or the path"):
        loftq_init(load_quantized(llama_dir), None, CONFIG)
    with pytest.raises(ValueError, match="has no LoRA adapter 'default': pass the LoRAConfig"):
        loftq_init(load_quantized(llama_dir), llama_dir)
    with pytest.raises(ValueError, match="`use_dora=True`"):
        loftq_quantize(full_precision(llama_dir), LoRAConfig(use_dora=True))
    with pytest.raises(ValueError, match="`loftq_weights`=.*Leave it None"):
        loftq_quantize(full_precision(llama_dir), CONFIG, LoftQOptions(loftq_weights=llama_dir))
    # an adapter file of LoftQ replayed onto the full-precision model instead of the quantized one
    model = full_precision(llama_dir)
    loftq_quantize(model, CONFIG)
    save_adapter(model, tmp_path / "saved")
    with pytest.raises(ValueError, match=r"trained on another base .*\(dtype nf4 -> float32\)"):
        load_adapter(full_precision(llama_dir), tmp_path / "saved")  # the fingerprint sees it first
    with pytest.raises(ValueError, match=r"init='loftq' adapts quantized layers.*adapter=False"):
        load_adapter(full_precision(llama_dir), tmp_path / "saved", strict=False)
