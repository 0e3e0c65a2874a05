"""Quantized bases (bitsandbytes 4-bit and 8-bit, QLoRA) in the surgery engine and the files: plain PyTorch.

A tiny Llama is saved with random weights and loaded back quantized through transformers'
``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``, as users load large models. The Lightning side
(callbacks, checkpoints, the precision plugin) is in ``test_quantized_lightning.py``, which reuses these builders.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
hf = pytest.importorskip("transformers")

from peft_callbacks import (  # noqa: E402
    check_artifact,
    export_peft,
    import_peft,
    inject,
    load_adapter,
    merge,
    save_adapter,
)
from peft_callbacks.core import quantized  # noqa: E402
from peft_callbacks.core.kinds import base_weight, layer_kind, weight_shape, write_weight  # noqa: E402
from peft_callbacks.engine import LayerMethod, get_method, registered_methods  # noqa: E402
from peft_callbacks.engine.precision import requantization_error  # noqa: E402
from peft_callbacks.io.fingerprint import base_fingerprint, compare_fingerprints  # noqa: E402
from peft_callbacks.methods.adalora import AdaLoRAConfig  # noqa: E402
from peft_callbacks.methods.ia3 import IA3Config  # noqa: E402
from peft_callbacks.methods.lora import LoRAConfig  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2 * len(PROJECTIONS)  # every projection of the two decoder layers
FORMATS = {  # name: BitsAndBytesConfig arguments
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory)


def save_tiny_llama(tmp_path_factory) -> str:
    """A tiny Llama with random weights, saved (no model hub); 14 quantizable projections."""
    torch.manual_seed(0)
    config = hf.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=99,
        pad_token_id=0,
    )
    folder = tmp_path_factory.mktemp("tiny_llama")
    hf.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def load_quantized(folder: str, fmt: str = "nf4-dq", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The saved Llama, quantized while loading (as users load large models)."""
    extra = {"bnb_4bit_compute_dtype": dtype} if "load_in_4bit" in FORMATS[fmt] else {}
    config = hf.BitsAndBytesConfig(**FORMATS[fmt], **extra)
    hf.logging.set_verbosity_error()
    return hf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype)


def token_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Train-mode logits (no dropout in this Llama): bitsandbytes' 8-bit layers dequantize and multiply then, as the
    merged model does; in eval mode LLM.int8() also rounds the activations."""
    model.train()
    with torch.no_grad():
        return model(ids).logits.float()


def move_trained(model: nn.Module, seed: int = 5, scale: float = 0.1) -> None:
    """Stand-in for training: every trainable tensor leaves its initial value (LoRA's B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * scale)


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor bitsandbytes writes for its layers (packed weights and statistics), cloned."""
    paths = tuple(quantized.quantized_layers(model))
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(paths)}


def assert_bit_identical(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    now = quantized_state(model)
    renamed = {k.replace(".base_layer", ""): v for k, v in now.items()}
    assert set(renamed) == set(before)
    assert all(torch.equal(renamed[k], v) for k, v in before.items())


# -- kinds: recognised, read dequantized, never written ------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_layer_kinds_read_dequantized_and_refuse_writes(llama_dir, fmt):
    model = load_quantized(llama_dir, fmt)
    layer = model.model.layers[0].self_attn.q_proj
    kind = "linear_8bit" if fmt == "int8" else "linear_4bit"
    assert layer_kind(layer) == kind and weight_shape(layer) == (64, 64)
    plain = hf.AutoModelForCausalLM.from_pretrained(llama_dir).model.layers[0].self_attn.q_proj.weight
    weight = base_weight(layer)
    assert weight.shape == (64, 64) and weight.is_floating_point()
    # dequantization error bound: NF4/FP4 store 16 levels per block of 64 (absmax scaled), int8 255 levels per row
    bound = 0.5 if fmt.startswith("fp4") else (0.2 if fmt.startswith("nf4") else 0.01)
    assert (weight.float() - plain).abs().max() <= bound * plain.abs().max()
    with pytest.raises(ValueError, match=r"Refusing to write into a (nf4|fp4|int8) weight.*merge\(model, dtype="):
        write_weight(layer, weight.float())


def test_default_targets_all_linear_and_names_select_quantized_layers(llama_dir):
    for targets in (None, "all-linear", PROJECTIONS):
        model = load_quantized(llama_dir)
        inject(model, LoRAConfig(rank=8, target_modules=targets))
        adapted = [p for p, m in model.named_modules() if hasattr(m, "adapters")]
        assert len(adapted) == LAYERS, targets  # the lm_head (not quantized) is the vocabulary projection: left out
        assert {p.rpartition(".")[2] for p in adapted} == set(PROJECTIONS)


def _without_quantized_layers() -> list[str]:
    """The registry's layer methods with no Adapter class for bitsandbytes' 4-bit layers."""
    methods = [get_method(name) for name in registered_methods()]
    return [m.name for m in methods if isinstance(m, LayerMethod) and "linear_4bit" not in m.adapter_classes]


@pytest.mark.parametrize("method", _without_quantized_layers())
def test_methods_without_quantized_layers_say_so(llama_dir, method):
    model = load_quantized(llama_dir)
    config = next(iter(get_method(method).example_configs().values()))
    with pytest.raises(ValueError, match=r"layer\(s\) are bitsandbytes-quantized .* does not adapt .*AdaLoRA do"):
        inject(model, config)
    assert not any(hasattr(m, "adapters") for m in model.modules())


# -- QLoRA: frozen quantized base, float32 factors, the same outputs as HF PEFT ------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("variant", ["lora", "dora", "ia3", "adalora"])
def test_outputs_equal_peft_with_the_same_tensors(llama_dir, fmt, variant):
    if variant != "lora" and fmt in ("nf4", "fp4-dq"):
        pytest.skip("DoRA, IA3 and AdaLoRA run on two of the four 4-bit formats, to keep the suite short")
    ids = token_ids()
    ours = load_quantized(llama_dir, fmt)
    before = quantized_state(ours)
    if variant == "ia3":
        config = IA3Config(target_modules=PROJECTIONS, feedforward_modules=["down_proj"])
        theirs_config = peft.IA3Config(target_modules=PROJECTIONS, feedforward_modules=["down_proj"])
    elif variant == "adalora":
        config = AdaLoRAConfig(init_r=8, target_r=4, alpha=16, total_step=10, target_modules=PROJECTIONS)
        theirs_config = peft.AdaLoraConfig(
            init_r=8, target_r=4, lora_alpha=16, total_step=10, target_modules=PROJECTIONS
        )
    else:
        config = LoRAConfig(rank=8, alpha=16, target_modules=PROJECTIONS, use_dora=variant == "dora")
        theirs_config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS, use_dora=variant == "dora")
    inject(ours, config)
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # factors in float32 around 4/8 bits
    assert all(not p.requires_grad for m in quantized.quantized_layers(ours).values() for p in m.parameters())
    move_trained(ours)
    theirs = peft.get_peft_model(load_quantized(llama_dir, fmt), theirs_config)
    theirs_state = theirs.state_dict()
    for key, tensor in ours.state_dict().items():  # the same trained tensors in both
        if ".adapters.default." in key:
            path, _, name = key.partition(".adapters.default.")
            name = {"lora_magnitude_vector": "lora_magnitude_vector.default.weight"}.get(name, name)
            name = name.replace("lora_A.weight", "lora_A.default.weight").replace(
                "lora_B.weight", "lora_B.default.weight"
            )
            name = name.replace("ia3_l", "ia3_l.default")
            name = {"lora_A": "lora_A.default", "lora_B": "lora_B.default", "lora_E": "lora_E.default"}.get(name, name)
            theirs_state[f"base_model.model.{path}.{name}"].copy_(tensor)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-5)
    assert_bit_identical(before, ours)


def test_a_training_step_keeps_the_quantized_weights_bit_identical(llama_dir):
    for fmt in ("nf4-dq", "int8"):
        model = load_quantized(llama_dir, fmt)
        before = quantized_state(model)
        inject(model, LoRAConfig(rank=8))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = token_ids()
        losses = []
        for _ in range(5):
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():  # bitsandbytes' CPU inference layout would rewrite the 4-bit weights: kept off
            model(ids)
        assert losses[-1] < losses[0]
        assert_bit_identical(before, model)


def test_half_precision_tensors_go_to_float32_on_a_quantized_base(llama_dir):
    model = load_quantized(llama_dir, "nf4-dq", dtype=torch.bfloat16)
    before = quantized_state(model)
    assert model.model.norm.weight.dtype == torch.bfloat16
    inject(model, LoRAConfig(rank=8, adapter_dtype="bfloat16"))
    norms = [m for n, m in model.named_modules() if n.endswith("norm")]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)  # as PEFT's prepare_model_for_kbit_training
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.float32
    assert_bit_identical(before, model)
    lora = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert lora.lora_A.weight.dtype == torch.bfloat16  # adapters keep the dtype they were asked for
    model.train()
    ids = token_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert lora.lora_B.weight.grad is not None


def test_factors_are_float32_on_a_half_precision_quantized_base(llama_dir):
    model = inject(load_quantized(llama_dir, "nf4-dq", dtype=torch.bfloat16), LoRAConfig(rank=8))
    lora = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert lora.lora_A.weight.dtype == torch.float32
    model.train()
    ids = token_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert lora.lora_B.weight.grad is not None


def test_adapter_dtype_sets_the_factors_dtype(llama_dir):
    model = inject(load_quantized(llama_dir), LoRAConfig(rank=8, adapter_dtype="bfloat16"))
    lora = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert lora.lora_A.weight.dtype == lora.lora_B.weight.dtype == torch.bfloat16
    assert model(token_ids()).logits.dtype == torch.float32
    with pytest.raises(ValueError, match=r"`adapter_dtype` must be one of 'float32', 'bfloat16', 'float16'"):
        LoRAConfig(adapter_dtype="int8")


# -- files: adapter files, fingerprints, HF PEFT's directories ----------------------------------------------------
@pytest.mark.parametrize("fmt", ["nf4-dq", "fp4", "int8"])
def test_adapter_file_reloads_onto_a_freshly_quantized_base(llama_dir, fmt, tmp_path):
    ids = token_ids()
    tuned = inject(load_quantized(llama_dir, fmt), LoRAConfig(rank=8))
    move_trained(tuned)
    tuned.eval()
    with torch.no_grad():
        tuned(ids)  # an eval pass before saving changes nothing of the base (no CPU re-layout)
    save_adapter(tuned, tmp_path)
    loaded = load_adapter(load_quantized(llama_dir, fmt), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), logits(tuned, ids), rtol=0, atol=1e-6)


def test_fingerprints_hash_the_dequantized_weights(llama_dir):
    first = base_fingerprint(load_quantized(llama_dir))
    assert compare_fingerprints(first, base_fingerprint(load_quantized(llama_dir), hash_names=first["hashes"])) == []
    assert first["shapes"]["model.layers.0.self_attn.q_proj.weight"] == [64, 64]  # logical, not packed
    fp4 = base_fingerprint(load_quantized(llama_dir, "fp4-dq"), hash_names=first["hashes"])
    plain = base_fingerprint(hf.AutoModelForCausalLM.from_pretrained(llama_dir), hash_names=first["hashes"])
    hashed = [n for n in first["hashes"] if n.endswith("proj.weight")]
    assert hashed and first["hashes"][hashed[0]]["dtype"] == "nf4"
    assert "(dtype nf4 -> fp4)" in " ".join(compare_fingerprints(first, fp4))
    assert "(dtype nf4 -> float32)" in " ".join(compare_fingerprints(first, plain))


@pytest.mark.parametrize("fmt", ["nf4-dq", "int8"])
def test_peft_loads_our_export_and_we_import_peft_qlora(llama_dir, fmt, tmp_path):
    ids = token_ids()
    ours = inject(load_quantized(llama_dir, fmt), LoRAConfig(rank=8, target_modules=PROJECTIONS))
    move_trained(ours)
    export_peft(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load_quantized(llama_dir, fmt), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    imported = import_peft(load_quantized(llama_dir, fmt), tmp_path / "theirs")
    torch.testing.assert_close(logits(imported, ids), logits(theirs, ids), rtol=0, atol=1e-5)


# -- merging: refused silently re-rounding, exact into a higher precision, re-quantized on request ------------------
@pytest.mark.parametrize("fmt", ["nf4-dq", "int8"])
def test_merge_into_a_higher_precision_equals_the_adapted_model(llama_dir, fmt, tmp_path):
    ids = token_ids()
    model = inject(load_quantized(llama_dir, fmt), LoRAConfig(rank=8))
    move_trained(model)
    adapted = logits(model, ids)
    with pytest.raises(ValueError, match=r"Cannot merge into .*bitsandbytes (nf4|int8) layer.*dtype=torch.bfloat16"):
        merge(model)
    assert len([m for m in model.modules() if hasattr(m, "adapters")]) == LAYERS  # unchanged
    merged = merge(model, dtype="float32")
    assert not quantized.quantized_layers(merged) and not getattr(merged, "is_quantized", False)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    # The merged float32 model holds dequant(W) + s·B·A exactly: it differs from the adapted model only by float32
    # rounding of the different order of operations (measured < 1e-6 here), far below the quantization error.
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path)  # a plain model: transformers loads it without bitsandbytes settings
    reloaded = hf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "quantization_config" not in reloaded.config.to_dict()
    torch.testing.assert_close(logits(reloaded, ids), adapted, rtol=0, atol=1e-5)


def test_merge_into_bfloat16_is_within_its_rounding(llama_dir):
    ids = token_ids()
    model = inject(load_quantized(llama_dir), LoRAConfig(rank=8))
    move_trained(model)
    adapted = logits(model, ids)
    merged = merge(model, dtype=torch.bfloat16)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    error = (logits(merged, ids) - adapted).abs().max().item()
    assert error < 0.05 * adapted.abs().max().item()  # bfloat16 keeps 8 bits of mantissa


def test_requantized_merge_reports_the_error_it_adds(llama_dir, caplog):
    ids = token_ids()
    model = inject(load_quantized(llama_dir), LoRAConfig(rank=8))
    move_trained(model, scale=0.01)  # a small update, as after a short fine-tune
    adapted = logits(model, ids)
    base = logits(load_quantized(llama_dir), ids)
    errors = requantization_error(model)
    assert sorted(errors) == sorted(p for p, m in model.named_modules() if hasattr(m, "adapters"))
    assert min(errors.values()) > 0.3  # NF4's steps are coarse: re-rounding changes much of a small update
    with caplog.at_level(logging.WARNING, logger="peft_callbacks"):
        merged = merge(model, requantize=True)
    assert "Re-quantized 14 merged layer(s)" in caplog.text
    assert len(quantized.quantized_layers(merged)) == LAYERS  # still 4-bit, plain layers again
    requantized_error = (logits(merged, ids) - adapted).abs().max().item()
    assert requantized_error > 1e-4  # unlike merge(dtype=...), the outputs move
    assert requantized_error < (base - adapted).abs().max().item() * 10


def test_check_artifact_refuses_a_requantized_merge_and_accepts_a_float32_one(llama_dir):
    """Two equal adapted models (same weights, same stand-in training); one is merged each way."""
    data = [{"input_ids": token_ids(seed)} for seed in (1, 2)]

    def adapted_model() -> nn.Module:
        torch.manual_seed(3)  # the same LoRA initialisation each time
        model = inject(load_quantized(llama_dir), LoRAConfig(rank=8))
        move_trained(model, scale=0.05)
        return model

    reference = adapted_model()
    requantized = merge(adapted_model(), requantize=True)
    check = check_artifact(reference, requantized, {"new_task": data}, metric="loss", tolerance=1e-5)
    assert not check.accepted and abs(check.deltas["new_task"]) > 1e-5
    assert check.message().startswith("artifact refused: new_task loss")
    merged = merge(adapted_model(), dtype="float32")
    assert check_artifact(reference, merged, {"new_task": data}, metric="loss", tolerance=1e-5).accepted


def test_requantize_and_dtype_contradict_and_bad_dtypes_are_refused(llama_dir):
    model = inject(load_quantized(llama_dir), LoRAConfig(rank=8))
    with pytest.raises(ValueError, match=r"`dtype=torch.bfloat16` and `requantize=True` contradict"):
        merge(model, dtype="bfloat16", requantize=True)
    with pytest.raises(ValueError, match=r"`dtype` must be None or one of 'float32', 'bfloat16', 'float16'"):
        merge(model, dtype="int4")


# -- without bitsandbytes -----------------------------------------------------------------------------------------
def test_without_bitsandbytes_the_errors_name_the_extra(llama_dir, monkeypatch):
    model = inject(load_quantized(llama_dir), LoRAConfig(rank=8))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(ImportError, match=r"re-quantize merged weights.*pip install 'peft-callbacks\[quant\]'"):
        merge(model, requantize=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes.nn", None)  # as if it had never been imported
    claims = hf.LlamaForCausalLM(
        hf.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=20)
    )
    claims.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ImportError, match=r"loaded quantized by bitsandbytes.*\[quant\]"):
        inject(claims, LoRAConfig(rank=2))
    assert not any(hasattr(m, "adapters") for m in claims.modules())  # refused before any change


def test_plain_models_never_import_bitsandbytes():
    code = (
        "import sys, torch.nn as nn\n"
        "from peft_callbacks import inject_lora, merge, save_adapter\n"
        "import tempfile\n"
        "net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)\n"
        "save_adapter(net, tempfile.mkdtemp()); merge(net)\n"
        "assert 'bitsandbytes' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
