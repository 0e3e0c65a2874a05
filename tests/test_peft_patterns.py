"""Per-layer LoRA settings as HF PEFT has them: ``rank_pattern``, ``alpha_pattern``, ``layers_to_transform`` (+
``layers_pattern``): the same layers and ranks as PEFT, PEFT's adapters import, ours export, merges are exact."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_io_adapter_file import outputs, train_a_little
from zoo import HF_MODELS

from peft_callbacks import LoRACallback
from peft_callbacks.io import export_peft, import_peft, load_adapter, save_adapter
from peft_callbacks.methods.lora import LoRAConfig, inject_lora, lora_layers, merge_lora

peft = pytest.importorskip("peft")

# (model, our keywords = PEFT's LoraConfig keywords under our names)
CASES = {
    "llama-patterns": (
        "llama",
        dict(
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
            alpha_pattern={"up_proj": 5},
        ),
    ),
    "llama-layers": ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "bert-both": (
        "bert",
        dict(
            target_modules=["query", "value"], rank_pattern={"value": 3}, layers_to_transform=0, layers_pattern="layer"
        ),
    ),
}
PEFT_NAMES = {"rank": "r", "alpha": "lora_alpha"}


def peft_config(**ours) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, **{PEFT_NAMES.get(k, k): v for k, v in ours.items()})


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def ranks(model) -> dict[str, tuple[int, float]]:
    """``{path: (r, scaling)}`` of our LoRA layers."""
    adapters = {path: layer.adapters["default"] for path, layer in lora_layers(model).items()}
    return {path: (a.r, a.scaling) for path, a in adapters.items()}


def same_ranks(ours: dict[str, tuple[int, float]], theirs: dict[str, tuple[int, float]]) -> None:
    """The same layers, each with the same rank and (to float precision) the same scaling."""
    assert ours.keys() == theirs.keys()
    for path, (rank, scaling) in ours.items():
        assert (rank, scaling) == (theirs[path][0], pytest.approx(theirs[path][1])), path


def peft_ranks(model) -> dict[str, tuple[int, float]]:
    found = {}
    for path, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            found[path] = (module.r["default"], module.scaling["default"])
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_layers_ranks_and_scalings_as_peft(case):
    name, options = CASES[case]
    ours = inject_lora(HF_MODELS[name]()[0], rank=4, alpha=8, train_head=False, **options)
    theirs = peft.get_peft_model(HF_MODELS[name]()[0], peft_config(**options))
    ours_ranks = ranks(ours)
    same_ranks(ours_ranks, peft_ranks(theirs))
    assert len(set(r for r, _ in ours_ranks.values())) > 1 or "layers" in case  # the patterns really differ


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_imports_with_equal_outputs_and_merges_exactly(tmp_path, case):
    name, options = CASES[case]
    build = HF_MODELS[name]
    base, inputs = build()
    theirs = train_a_little(peft.get_peft_model(base, peft_config(**options)))  # A and B away from their start
    theirs.save_pretrained(str(tmp_path))

    ours = import_peft(build()[0], tmp_path)
    expected = outputs(theirs, inputs)
    close(outputs(ours, inputs), expected)
    same_ranks(ranks(ours), peft_ranks(theirs))
    save_adapter(ours, tmp_path / "ours")  # the per-layer settings are recorded: replaying gives the same ranks
    again = load_adapter(build()[0], tmp_path / "ours")
    assert ranks(again) == ranks(ours)
    close(outputs(again, inputs), expected)
    close(outputs(merge_lora(ours), inputs), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_export_loads_in_peft_with_equal_outputs(tmp_path, case):
    name, options = CASES[case]
    build = HF_MODELS[name]
    tuned, inputs = build()
    train_a_little(inject_lora(tuned, rank=4, alpha=8, train_head=False, **options))
    export_peft(tuned, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    config = next(iter(lora_layers(tuned).values())).adapters["default"].config
    assert written["rank_pattern"] == (config.rank_pattern or {})

    theirs = peft.PeftModel.from_pretrained(build()[0], str(tmp_path))
    same_ranks(ranks(tuned), peft_ranks(theirs))
    close(outputs(theirs, inputs), outputs(tuned, inputs))


def test_patterns_reach_the_callback_and_its_config():
    callback = LoRACallback(rank=4, rank_pattern={"query": 2}, layers_to_transform=[1])
    assert callback.config.rank_pattern == {"query": 2} and callback.config.layers_to_transform == [1]
    assert LoRAConfig.from_dict(LoRAConfig(alpha_pattern={"q": 3}).to_dict()).alpha_pattern == {"q": 3.0}


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(rank_pattern={"key_proj": 2}), ValueError, r"`rank_pattern` key 'key_proj' matches none of the 4"),
        (dict(alpha_pattern={"nowhere": 2}), ValueError, r"`alpha_pattern` key 'nowhere' matches none"),
        (dict(rank_pattern={"q_proj": 0}), ValueError, r"`rank_pattern` must map keys to ints >= 1, got 0 for key"),
        (dict(rank_pattern={"q_proj": 2.5}), TypeError, r"`rank_pattern` must map keys to ints >= 1, got float 2.5"),
        (dict(alpha_pattern={"q_proj": -1}), ValueError, r"`alpha_pattern` must map keys to numbers > 0, got -1"),
        (dict(rank_pattern={"q_(": 2}), ValueError, r"`rank_pattern` key 'q_\(' is not a valid regex"),
        (dict(layers_to_transform=[5]), ValueError, r"`layers_to_transform`=\[5\] names .* layers 0\.\.1"),
        (dict(layers_to_transform=[-1]), ValueError, r"`layers_to_transform` must hold layer numbers .*, got -1"),
        (dict(layers_pattern="layers"), ValueError, r"`layers_pattern`='?\['layers'\]'? needs `layers_to_transform`"),
        (dict(layers_to_transform=[0], layers_pattern="blocks"), ValueError, r"no numbered layer.*layers_pattern"),
    ],
)
def test_bad_per_layer_settings_are_refused_clearly(options, error, message):
    model = HF_MODELS["llama"]()[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        inject_lora(model, rank=4, target_modules=["q_proj", "v_proj"], train_head=False, **options)
    assert not lora_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_peft_keys_that_match_no_layer_are_left_out_on_import(tmp_path):
    build = HF_MODELS["llama"]
    base, inputs = build()
    config = peft_config(target_modules=["q_proj"], rank_pattern={"q_proj": 2, "k_proj": 6})  # PEFT keeps k_proj
    theirs = train_a_little(peft.get_peft_model(base, config))
    theirs.save_pretrained(str(tmp_path))
    ours = import_peft(build()[0], tmp_path)
    close(outputs(ours, inputs), outputs(theirs, inputs))
    assert {r for r, _ in ranks(ours).values()} == {2}


def test_patterns_and_bias_options_come_from_yaml(tmp_path):
    from peft_callbacks.cli import PEFTCLI

    yaml = tmp_path / "lora.yaml"
    yaml.write_text(
        "trainer:\n  logger: false\n  callbacks:\n  - class_path: peft_callbacks.LoRACallback\n    init_args:\n"
        "      rank: 4\n      rank_pattern:\n        qkv: 2\n      alpha_pattern:\n        'blocks\\.0\\..*': 3\n"
        "      layers_to_transform: [0, 1]\n      layers_pattern: blocks\n"
        "      bias: lora_only\n      lora_bias: true\n"
    )
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs")
    args = ["--config", f"{configs}/digits_lora.yaml", "--config", str(yaml), "--model.init_args.init_from=null"]
    cli = PEFTCLI(args=args, run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LoRACallback)]
    config = callback.config
    assert config.rank_pattern == {"qkv": 2} and config.alpha_pattern == {r"blocks\.0\..*": 3.0}
    assert config.layers_to_transform == [0, 1] and config.layers_pattern == ["blocks"]
    assert config.bias == "lora_only" and config.lora_bias is True


def test_a_second_fit_with_the_same_patterns_continues_the_adapter():
    model = HF_MODELS["llama"]()[0]
    options = dict(rank=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, layers_to_transform=[1])
    callback = LoRACallback(**options)
    callback.apply(model, "")
    assert LoRACallback(**options).is_applied(model)  # the recorded (resolved) patterns are the same settings
    with pytest.raises(ValueError, match=r"with other settings \(rank_pattern: .*: 2\} there, .*: 3\} here\)"):
        LoRACallback(**{**options, "rank_pattern": {"v_proj": 3}}).is_applied(model)


LYCORIS = {"loha": ("LoHaConfig", "LoHaConfig"), "lokr": ("LoKrConfig", "LoKrConfig")}
LYCORIS_OPTIONS = dict(
    target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\..*q_proj": 3}
)


def lycoris_config(method: str, **options):
    from peft_callbacks import LoHaConfig, LoKrConfig

    return (LoHaConfig if method == "loha" else LoKrConfig)(rank=4, alpha=8, train_head=False, **options)


def lycoris_ranks(model) -> dict[str, tuple[int, float]]:
    from peft_callbacks.engine import peft_layers

    return {
        p: (layer.adapters["default"].r, layer.adapters["default"].alpha) for p, layer in peft_layers(model).items()
    }


@pytest.mark.parametrize("method", sorted(LYCORIS))
def test_loha_lokr_patterns_import_export_and_merge_like_peft(tmp_path, method):
    from peft_callbacks.engine import inject, merge

    build = HF_MODELS["llama"]
    base, inputs = build()
    peft_class = getattr(peft, "LoHaConfig" if method == "loha" else "LoKrConfig")
    theirs = train_a_little(peft.get_peft_model(base, peft_class(r=4, alpha=8, **LYCORIS_OPTIONS)))
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = import_peft(build()[0], tmp_path / "peft")
    expected = outputs(theirs, inputs)
    close(outputs(ours, inputs), expected)
    assert sorted(set(lycoris_ranks(ours).values())) == [(2, 8.0), (4, 3.0), (4, 8.0)]

    tuned = train_a_little(inject(build()[0], lycoris_config(method, **LYCORIS_OPTIONS)))
    assert lycoris_ranks(tuned) == lycoris_ranks(ours)  # the same layers get the same rank and alpha
    export_peft(tuned, tmp_path / "ours")
    close(outputs(peft.PeftModel.from_pretrained(build()[0], str(tmp_path / "ours")), inputs), outputs(tuned, inputs))
    close(outputs(merge(ours), inputs), expected)


# method: (our config, PEFT's config), both with layers_to_transform=[1] on Llama (PEFT's IA3 has no such option)
OTHER_METHODS = {
    "loha": (
        lambda: __import__("peft_callbacks").LoHaConfig(rank=2, target_modules=["v_proj", "down_proj"], **LAYER_1),
        lambda: peft.LoHaConfig(r=2, target_modules=["v_proj", "down_proj"], **LAYER_1),
    ),
    "oft": (
        lambda: __import__("peft_callbacks").OFTConfig(rank=0, oft_block_size=4, target_modules=["q_proj"], **LAYER_1),
        lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"], **LAYER_1),
    ),
    "vera": (
        lambda: __import__("peft_callbacks").VeRAConfig(rank=4, target_modules=["q_proj", "o_proj"], **LAYER_1),
        lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "o_proj"], **LAYER_1),
    ),
}
LAYER_1 = dict(layers_to_transform=[1], layers_pattern="layers")


@pytest.mark.parametrize("method", sorted(OTHER_METHODS))
def test_layers_to_transform_selects_as_peft_for_every_layer_method(tmp_path, method):
    from peft_callbacks.engine import inject, peft_layers

    ours_config, peft_config_ = OTHER_METHODS[method]
    build = HF_MODELS["llama"]
    base, inputs = build()
    theirs = train_a_little(peft.get_peft_model(base, peft_config_()))
    theirs.save_pretrained(str(tmp_path))
    ours = inject(build()[0], ours_config().replace(train_head=False))
    adapted = {
        p for p, m in theirs.base_model.model.named_modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)
    }
    assert set(peft_layers(ours)) == adapted and all(".layers.1." in p for p in adapted)
    imported = import_peft(build()[0], tmp_path)
    assert set(peft_layers(imported)) == adapted
    close(outputs(imported, inputs), outputs(theirs, inputs))
