"""``init="orthogonal"`` and ``init="eva"`` against HF PEFT: the same factors from the same seed (orthogonal) or the
same data (EVA, on one batch, up to each component's sign), PEFT's adapters import and ours export with equal outputs,
saved adapters reload exactly, ``LoRACallback(init="eva")`` reads the training data at ``setup``."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from test_io_adapter_file import outputs, train_a_little
from torch.utils.data import DataLoader
from zoo import HF_MODELS

from peft_callbacks import LoRACallback
from peft_callbacks.demo import quiet_trainer
from peft_callbacks.engine import inject
from peft_callbacks.io import export_peft, import_peft, load_adapter, save_adapter
from peft_callbacks.methods.lora import LoRAConfig, lora_layers
from peft_callbacks.methods.lora.eva import EVAOptions, eva_init, eva_ranks
from peft_callbacks.methods.lora.method import lora_adapters

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _peft_layer(peft_model, path: str):
    return peft_model.base_model.model.get_submodule(path)


# -- orthogonal ------------------------------------------------------------------------------------------------------
def test_orthogonal_draws_peft_factors_from_the_same_seed():
    ours, inputs = HF_MODELS["llama"]()
    theirs = copy.deepcopy(ours)
    before = outputs(ours, inputs)
    torch.manual_seed(11)
    inject(ours, LoRAConfig(rank=4, alpha=8, init="orthogonal", target_modules=LLAMA_TARGETS))
    torch.manual_seed(11)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="orthogonal", target_modules=LLAMA_TARGETS)
    theirs = peft.get_peft_model(theirs, config)
    layers = lora_layers(ours)
    assert len(layers) == 8
    for path, layer in layers.items():
        mine, peft_layer = layer.adapters["default"], _peft_layer(theirs, path)
        assert torch.equal(mine.lora_A.weight, peft_layer.lora_A["default"].weight), path
        assert torch.equal(mine.lora_B.weight, peft_layer.lora_B["default"].weight), path
    after = outputs(ours, inputs)
    torch.testing.assert_close(after, outputs(theirs, inputs), rtol=0, atol=1e-6)
    # A and B both non-zero (both get gradients from the first step), yet B·A = 0 up to rounding: A's rows and B's
    # columns come from orthogonal halves of Q, so the model starts as the base
    assert all(layer.adapters["default"].lora_B.weight.abs().min() > 0 for layer in layers.values())
    assert all(layer.adapters["default"].delta_weight().abs().max() < 1e-6 for layer in layers.values())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_orthogonal_factors_span_complementary_halves_of_the_rank_space():
    model = inject(HF_MODELS["bert"]()[0], LoRAConfig(rank=6, init="orthogonal", target_modules=["query"]))
    for adapter in lora_adapters(model).values():
        a, b = adapter.lora_A.weight, adapter.lora_B.weight  # (r, in), (out, r)
        rank = torch.linalg.matrix_rank
        assert rank(a) == 3 and rank(b) == 3  # each from r/2 rows of Q
        assert rank(torch.cat([a, b.T], dim=1)) == 6  # (r, in + out): together they span R^r
        torch.testing.assert_close(b @ a, torch.zeros(b.shape[0], a.shape[1]), rtol=0, atol=1e-6)


def test_an_orthogonal_adapter_round_trips_with_peft(tmp_path):
    build = HF_MODELS["bert"]
    ours, inputs = build()
    inject(ours, LoRAConfig(rank=4, alpha=8, init="orthogonal", target_modules=["query", "value"]))
    train_a_little(ours)
    expected = outputs(ours, inputs)
    export_peft(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == "orthogonal"
    theirs = peft.PeftModel.from_pretrained(build()[0], str(tmp_path / "ours"))
    torch.testing.assert_close(outputs(theirs, inputs), expected, rtol=0, atol=1e-5)
    # PEFT's own orthogonal adapter imports, and our saved one reloads (another seed: the file's tensors are used)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    torch.manual_seed(5)
    imported = import_peft(build()[0], tmp_path / "theirs")
    torch.testing.assert_close(outputs(imported, inputs), expected, rtol=0, atol=1e-5)
    save_adapter(ours, tmp_path / "saved")
    torch.manual_seed(6)
    torch.testing.assert_close(outputs(load_adapter(build()[0], tmp_path / "saved"), inputs), expected, rtol=0, atol=0)


def test_orthogonal_is_refused_where_peft_does_not_define_it():
    with pytest.raises(ValueError, match=r"`init`='orthogonal' needs an even `rank`.*got rank=3"):
        LoRAConfig(rank=3, init="orthogonal")
    with pytest.raises(ValueError, match="`init`='orthogonal' cannot be combined with `use_dora=True`"):
        LoRAConfig(init="orthogonal", use_dora=True)
    resnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="`init`='orthogonal' is defined for linear layers"):
        inject(resnet, LoRAConfig(rank=2, init="orthogonal", target_modules=["0"]))
    with pytest.raises(ValueError, match="`init`='orthogonal' is not supported on nn.Embedding"):
        inject(HF_MODELS["llama"]()[0], LoRAConfig(rank=2, init="orthogonal", target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="`init`='orthogonal' cannot be used with `target_parameters`"):
        LoRAConfig(rank=2, init="orthogonal", target_parameters=["experts.down_proj"])


# -- EVA -------------------------------------------------------------------------------------------------------------
def _text_batch(seed: int = 3, batch: int = 8, seq: int = 16) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-2:, -5:] = 0  # padding: left out of the covariance, as PEFT does
    return {"input_ids": ids, "attention_mask": mask}


def _peft_eva(model, batches, targets, rank, alpha, rho):
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=rho),
    )
    model = peft.get_peft_model(model, config)
    peft.initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
    return model


# (targets, rank, rho): every layer's input has 32 features and PEFT's randomised SVD keeps 2·rho·rank ≥ 32 of them,
# so its decomposition is exact too; with fewer it is an approximation of ours (its svd_lowrank)
EVA_CASES = {
    "redistributed": (["query", "attention.output.dense", "intermediate.dense"], 8, 2.0),
    "shared-input": (["query", "key", "value"], 16, 1.0),
}


@pytest.mark.parametrize("case", list(EVA_CASES))
def test_eva_equals_peft_on_one_batch_up_to_sign(case):
    targets, rank, rho = EVA_CASES[case]
    ours, inputs = HF_MODELS["bert"]()
    theirs = copy.deepcopy(ours)
    before = outputs(ours, inputs)
    batches = [_text_batch()]
    eva_init(ours, batches, LoRAConfig(rank=rank, alpha=4, target_modules=targets), EVAOptions(eva_rho=rho))
    theirs = _peft_eva(theirs, batches, targets, rank, 4, rho)
    ranks = eva_ranks(ours)
    assert len(ranks) == 2 * len(targets) and sum(ranks.values()) == rank * len(ranks)  # the budget is kept
    if rho > 1:
        assert len(set(ranks.values())) > 1  # redistributed
    for path, k in ranks.items():
        mine, peft_layer = lora_layers(ours)[path].adapters["default"], _peft_layer(theirs, path)
        their_a = peft_layer.lora_A["default"].weight  # (k, in)
        assert their_a.shape[0] == k, path
        a = mine.lora_A.weight[:k]
        signs = torch.sign((a * their_a).sum(1, keepdim=True))  # each component's sign is arbitrary
        torch.testing.assert_close(a * signs, their_a, rtol=0, atol=1e-4)
        assert not mine.lora_A.weight[k:].any() and not mine.lora_B.weight.any()
        assert mine.scaling == pytest.approx(peft_layer.scaling["default"])  # PEFT's alpha·k/r over k
    torch.testing.assert_close(outputs(ours, inputs), before, rtol=0, atol=0)  # B = 0


def test_an_eva_adapter_reloads_exports_and_imports(tmp_path):
    build = HF_MODELS["bert"]
    targets = ["query", "value", "attention.output.dense", "intermediate.dense"]
    ours, inputs = build()
    eva_init(ours, [_text_batch(), _text_batch(4)], LoRAConfig(rank=4, alpha=8, target_modules=targets))
    train_a_little(ours)
    for adapter in lora_adapters(ours).values():  # the unused rows stay zero in training (their gradients are zero)
        adapter.lora_A.weight.data[eva_ranks_of(adapter) :] = 0
    expected = outputs(ours, inputs)
    save_adapter(ours, tmp_path / "saved")
    torch.testing.assert_close(outputs(load_adapter(build()[0], tmp_path / "saved"), inputs), expected, rtol=0, atol=0)
    export_peft(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build()[0], str(tmp_path / "ours"))
    torch.testing.assert_close(outputs(theirs, inputs), expected, rtol=0, atol=1e-5)
    # PEFT's own EVA adapter: per-layer ranks in rank_pattern, alpha_pattern; layers of rank 0 left out
    peft_made = _peft_eva(build()[0], [_text_batch()], targets, 4, 8, 2.0)
    train_a_little(peft_made, seed=3)
    peft_made.save_pretrained(str(tmp_path / "theirs"))
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["rank_pattern"]
    imported = import_peft(build()[0], tmp_path / "theirs")
    torch.testing.assert_close(outputs(imported, inputs), outputs(peft_made, inputs), rtol=0, atol=1e-5)


def eva_ranks_of(adapter) -> int:
    return int((adapter.lora_A.weight.abs().sum(1) > 0).sum())


def test_eva_without_data_or_with_bad_options_is_refused():
    model = HF_MODELS["bert"]()[0]
    with pytest.raises(ValueError, match="`init`='eva' needs data"):
        inject(model, LoRAConfig(init="eva", target_modules=["query"]))
    with pytest.raises(ValueError, match="`dataloader` gave no batch"):
        eva_init(model, [], LoRAConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="`eva_rho` must be"):
        EVAOptions(eva_rho=0.5)
    with pytest.raises(ValueError, match="`eva_batches` must be"):
        EVAOptions(eva_batches=0)
    with pytest.raises(ValueError, match="cannot be combined with `rank_pattern`"):
        eva_init(model, [_text_batch()], LoRAConfig(target_modules=["query"], rank_pattern={"query": 2}))
    with pytest.raises(ValueError, match="`init`='eva' cannot be combined with `use_dora=True`"):
        LoRAConfig(init="eva", use_dora=True)


class _Classifier(L.LightningModule):
    """A transformers classifier trained on dict batches (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = HF_MODELS["bert"]()[0].train()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _examples(batches: int = 4) -> list[dict]:
    out = []
    for seed in range(batches):
        batch = _text_batch(seed)
        for i in range(8):
            out.append(
                {"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i], "labels": i % 3}
            )
    return out


class _StartingFactors(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.a = {p: a.lora_A.weight.detach().clone() for p, a in lora_adapters(pl_module.model).items()}
        self.ranks = eva_ranks(pl_module.model)


def test_the_callback_takes_eva_from_the_training_data_and_saves_an_exact_adapter(tmp_path):
    targets = ["query", "value", "intermediate.dense"]
    loader = DataLoader(_examples(), batch_size=8)
    expected = eva_init(
        HF_MODELS["bert"]()[0], loader, LoRAConfig(rank=4, alpha=8, target_modules=targets), EVAOptions(eva_batches=2)
    )
    lora = LoRACallback(
        rank=4,
        alpha=8,
        init="eva",
        target_modules=targets,
        eva_batches=2,
        merge_on_train_end=False,
        save_adapter_to=str(tmp_path / "adapter"),
    )
    start = _StartingFactors()
    module = _Classifier()
    quiet_trainer(max_steps=3, callbacks=[lora, start]).fit(module, loader)
    for path, adapter in lora_adapters(expected).items():  # the first two batches, as eva_init reads them
        torch.testing.assert_close(start.a[path], adapter.lora_A.weight, rtol=0, atol=1e-6)
    assert eva_ranks(module.model) == start.ranks  # unused rows stay zero
    assert any(not torch.equal(a.lora_A.weight, start.a[p]) for p, a in lora_adapters(module.model).items())
    inputs = _text_batch(9)
    loaded = load_adapter(HF_MODELS["bert"]()[0], tmp_path / "adapter")
    torch.testing.assert_close(outputs(loaded, inputs), outputs(module.model, inputs), rtol=0, atol=0)
    assert lora.state_dict()["config"]["eva_batches"] == 2


def test_the_callback_refuses_eva_outside_fit():
    lora = LoRACallback(rank=4, init="eva", target_modules=["query"])
    with pytest.raises(ValueError, match=r"LoRACallback\(init='eva'\) starts LoRA's factors from the training data"):
        lora.apply(HF_MODELS["bert"]()[0], "")


def test_an_eva_run_resumes_from_its_checkpoint_and_fits_again(tmp_path):
    targets, loader = ["query", "intermediate.dense"], DataLoader(_examples(), batch_size=8)
    options = dict(rank=4, init="eva", target_modules=targets, eva_batches=2, merge_on_train_end=False)
    lora, module = LoRACallback(**options), _Classifier()
    trainer = quiet_trainer(max_steps=2, callbacks=[lora])
    trainer.fit(module, loader)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    trained = {p: a.lora_A.weight.detach().clone() for p, a in lora_adapters(module.model).items()}
    resumed = _Classifier()  # a fresh run: EVA reads the data again, then the checkpoint's tensors load
    quiet_trainer(max_steps=2, callbacks=[LoRACallback(**options)]).fit(
        resumed, loader, ckpt_path=tmp_path / "run.ckpt"
    )
    for path, adapter in lora_adapters(resumed.model).items():
        assert torch.equal(adapter.lora_A.weight, trained[path]), path
    quiet_trainer(max_steps=1, callbacks=[lora]).fit(module, loader)  # the same callback again: continues training
    assert any(not torch.equal(a.lora_A.weight, trained[p]) for p, a in lora_adapters(module.model).items())


def test_eva_whiten_divides_each_component_by_the_root_of_its_singular_value():
    from peft_callbacks.methods.lora.eva import eva_components

    model, batches = HF_MODELS["bert"]()[0], [_text_batch()]
    decomposed, _ = eva_components(model, batches, ["bert.encoder.layer.0.intermediate.dense"])
    values, rows, _ = decomposed["bert.encoder.layer.0.intermediate.dense"]
    config = LoRAConfig(rank=4, target_modules=["intermediate.dense"], layers_to_transform=[0])
    eva_init(model, batches, config, EVAOptions(eva_rho=1, eva_whiten=True))
    a = lora_layers(model)["bert.encoder.layer.0.intermediate.dense"].adapters["default"].lora_A.weight
    expected = rows[:4] / values[:4].sqrt().sqrt().unsqueeze(1)  # singular value of the centred inputs = √λ
    torch.testing.assert_close(a.double(), expected, rtol=1e-5, atol=1e-7)
