"""``init="corda"`` and ``init="lora_ga"`` against HF PEFT: the same factors from the same data (CorDA, up to each
component's sign: compared as products) or the same data and random draws (LoRA-GA), equal outputs, the base weight
untouched; exports load in PEFT on the original base, PEFT's converted adapters import, unconverted ones are refused;
``LoRACallback`` starts both from the fit's data, trains, saves and reloads exactly."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

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
from peft_callbacks.methods.lora import LoRAConfig, lora_layers, merge_lora
from peft_callbacks.methods.lora.corda import CorDAOptions, corda_init
from peft_callbacks.methods.lora.loraga import LoRAGAOptions, lora_ga_init
from peft_callbacks.methods.lora.method import lora_adapters

peft = pytest.importorskip("peft")
from peft.tuners.lora.config import CordaConfig, LoraGAConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402
from peft.tuners.lora.loraga import preprocess_loraga  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),  # PEFT's gradient count
    pytest.mark.filterwarnings("ignore:CorDA changes the base weights"),
    pytest.mark.filterwarnings("ignore:`corda_config` specified but will be ignored"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False"),
]

LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
VOCAB = 99


def _samples(count: int = 6, seq: int = 12, seed: int = 3) -> list[dict]:
    """Batches of one unpadded sample each: PEFT's CorDA reads one sample per forward call."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (1, seq), generator=g)} for _ in range(count)]


def _lm_batches(count: int = 3, batch: int = 4, seq: int = 10, seed: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _peft_layer(peft_model, path: str):
    return peft_model.base_model.model.get_submodule(path)


def _assert_same_start(ours, theirs, original, atol):
    """Same ``s·B₀A₀`` per layer (up to sign, the product is unique) and our residual equals PEFT's base weight."""
    layers = lora_layers(ours)
    assert layers
    for path, layer in layers.items():
        mine, their_layer = layer.adapters["default"], _peft_layer(theirs, path)
        scale = mine.scaling
        product = scale * mine.lora_B_init @ mine.lora_A_init
        their_product = scale * their_layer.lora_B["default"].weight @ their_layer.lora_A["default"].weight
        tol = atol * max(1.0, product.abs().max().item())
        torch.testing.assert_close(product, their_product, rtol=0, atol=tol)
        base = layer.base_layer.weight
        assert torch.equal(base, original.get_submodule(path).weight), path  # ours: untouched
        conv1d = mine.kind == "hf_conv1d"  # transformers' Conv1D stores (in, out)
        residual = base - (product.T if conv1d else product).to(base)
        torch.testing.assert_close(residual, their_layer.base_layer.weight, rtol=0, atol=tol)


# -- CorDA ------------------------------------------------------------------------------------------------------------
FAMILIES = {"llama": LLAMA_TARGETS, "gpt2": ["c_attn", "c_fc"]}  # nn.Linear; transformers' Conv1D


def _model(family: str):
    """A tiny model without dropout (LoRA-GA's estimate runs in training mode, as PEFT's)."""
    model, inputs = HF_MODELS[family]()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, inputs


@pytest.mark.parametrize(("family", "corda_method"), [("llama", "ipm"), ("llama", "kpm"), ("gpt2", "ipm")])
def test_corda_equals_peft(family, corda_method):
    ours, inputs = _model(family)
    original, theirs = copy.deepcopy(ours), copy.deepcopy(ours)
    batches = _samples()
    before = outputs(ours, inputs)
    targets = FAMILIES[family]
    config = LoRAConfig(rank=4, alpha=8, target_modules=targets)
    corda_init(ours, batches, config, CorDAOptions(corda_method=corda_method, corda_batches=len(batches)))
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=corda_method),
    )

    @torch.no_grad()
    def run_model():
        for batch in batches:
            theirs(**batch)

    preprocess_corda(theirs, peft_config, run_model=run_model)
    theirs = peft.get_peft_model(theirs, peft_config)
    assert len(lora_layers(ours)) == 2 * len(targets)
    _assert_same_start(ours, theirs, original, atol=2e-4)
    torch.testing.assert_close(outputs(ours, inputs), outputs(theirs, inputs), rtol=0, atol=1e-4)
    torch.testing.assert_close(outputs(ours, inputs), before, rtol=0, atol=1e-4)  # starts as the base


def test_corda_reads_each_sample_of_a_padded_batch_as_peft_reads_it_alone():
    model = HF_MODELS["bert"]()[0]
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, -4:] = 0
    together = [{"input_ids": ids, "attention_mask": mask}]
    alone = [{"input_ids": ids[i : i + 1, : int(mask[i].sum())]} for i in range(3)]  # unpadded, one at a time
    from peft_callbacks.methods.lora.corda import corda_covariances

    paths = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.intermediate.dense"]
    a, b = corda_covariances(model, together, paths), corda_covariances(model, alone, paths)
    for path in paths:  # padding changes what the real tokens see in BERT only through the mask, so equal
        torch.testing.assert_close(a[path], b[path], rtol=1e-5, atol=1e-6)


# -- LoRA-GA ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def seeded_svd(monkeypatch):
    """``torch.svd_lowrank`` seeded before every call, for PEFT and us alike: the same draw per call."""
    svd = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(1234)
        return svd(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)


def _lm_loss(model, batch):
    return model(**batch).loss


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("llama", LoRAGAOptions()),
        ("gpt2", LoRAGAOptions()),
        ("llama", LoRAGAOptions(lora_ga_direction="ArBr", lora_ga_scale="weight_svd")),
        ("llama", LoRAGAOptions(lora_ga_direction="random", lora_ga_scale="gd_scale")),
        ("llama", LoRAGAOptions(lora_ga_direction="A2rBr", lora_ga_scale="unit")),
    ],
    ids=["defaults", "gpt2-conv1d", "ArBr-weight_svd", "random-gd_scale", "A2rBr-unit"],
)
def test_lora_ga_equals_peft_from_the_same_batches_and_draws(seeded_svd, family, options):
    ours, inputs = _model(family)
    original, theirs = copy.deepcopy(ours), copy.deepcopy(ours)
    batches = _lm_batches()
    targets = FAMILIES[family]
    config = LoRAConfig(rank=4, alpha=8, target_modules=targets)
    lora_ga_init(ours, _lm_loss, config, dataclasses.replace(options, lora_ga_batches=3), batches=batches)
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(direction=options.lora_ga_direction, scale=options.lora_ga_scale, stable_gamma=16),
    )

    def train_step():
        for batch in batches:
            theirs(**batch).loss.backward()

    preprocess_loraga(theirs, peft_config, train_step)
    theirs = peft.get_peft_model(theirs, peft_config)
    for path, layer in lora_layers(ours).items():  # the same seeded draws: the very factors, not only products
        mine, their_layer = layer.adapters["default"], _peft_layer(theirs, path)
        torch.testing.assert_close(mine.lora_A.weight, their_layer.lora_A["default"].weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(mine.lora_B.weight, their_layer.lora_B["default"].weight, rtol=0, atol=1e-5)
    _assert_same_start(ours, theirs, original, atol=1e-5)
    torch.testing.assert_close(outputs(ours, inputs), outputs(theirs, inputs), rtol=0, atol=1e-5)
    assert all(p.grad is None for p in ours.parameters())  # the estimate's gradients are gone


def test_the_gradient_is_the_average_over_backward_passes_and_the_model_is_left_as_it_was():
    from peft_callbacks.methods.lora.loraga import estimate_gradients

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).eval()
    model[0].bias.requires_grad_(False)
    model[2].weight.grad = torch.full_like(model[2].weight, 7.0)
    batches = [(torch.randn(4, 5), torch.randn(4, 2)) for _ in range(3)]

    def loss(batch):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    expected = {}
    for path in ("0", "2"):
        weight = model.get_submodule(path).weight
        expected[path] = sum(torch.autograd.grad(loss(b), weight)[0] for b in batches) / len(batches)
    gradients = estimate_gradients(model, ["0", "2"], lambda: [loss(b).backward() for b in batches])
    for path in ("0", "2"):
        torch.testing.assert_close(gradients[path], expected[path], rtol=1e-6, atol=1e-7)
    assert not model.training and not model[0].bias.requires_grad and model[0].weight.requires_grad
    assert torch.equal(model[2].weight.grad, torch.full_like(model[2].weight, 7.0)) and model[0].weight.grad is None
    with pytest.raises(ValueError, match="no gradient reached layer '0'"):
        estimate_gradients(model, ["0"], lambda: None)


def test_lora_ga_with_peft_train_step_contract_restores_the_model():
    model = HF_MODELS["llama"]()[0]
    batches = _lm_batches(count=2)
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)  # someone's gradient: left as it was
    model.eval()

    def train_step():
        assert model.training  # the estimate runs in training mode, as PEFT's
        for batch in batches:
            model(**batch).loss.backward()

    lora_ga_init(model, train_step, LoRAConfig(rank=2, target_modules=["q_proj"]))
    assert not model.training
    assert torch.equal(model.lm_head.weight.grad, torch.ones_like(model.lm_head.weight))
    assert all(a.lora_A_init.abs().sum() > 0 for a in lora_adapters(model).values())


# -- files: save / load / merge, PEFT export and import ---------------------------------------------------------------
def _started(init: str):
    model, inputs = HF_MODELS["llama"]()
    config = LoRAConfig(rank=4, alpha=8, target_modules=LLAMA_TARGETS, rank_pattern={"up_proj": 2})
    if init == "corda":
        corda_init(model, _samples(), config)
    else:
        lora_ga_init(model, _lm_loss, config, batches=_lm_batches())
    return model, inputs


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_a_data_started_adapter_saves_reloads_merges_and_exports(tmp_path, init):
    build = HF_MODELS["llama"]
    ours, inputs = _started(init)
    train_a_little(ours)
    expected = outputs(ours, inputs)
    assert not torch.allclose(expected, outputs(build()[0], inputs), atol=1e-3)
    save_adapter(ours, tmp_path / "saved")
    torch.manual_seed(9)  # another seed: the file's tensors are used, no data needed
    reloaded = load_adapter(build()[0], tmp_path / "saved")
    assert {a.config.init for a in lora_adapters(reloaded).values()} == {init}
    torch.testing.assert_close(outputs(reloaded, inputs), expected, rtol=0, atol=0)
    export_peft(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["init_lora_weights"]) == (8, 16, True)
    assert set(written["rank_pattern"].values()) == {4}  # up_proj's rank 2, doubled
    theirs = peft.PeftModel.from_pretrained(build()[0], str(tmp_path / "ours"))  # onto the ORIGINAL base
    torch.testing.assert_close(outputs(theirs, inputs), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs(import_peft(build()[0], tmp_path / "ours"), inputs), expected, rtol=0, atol=1e-5)
    merged = merge_lora(ours)
    torch.testing.assert_close(outputs(merged, inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_peft_files_import_converted_and_are_refused_unconverted(tmp_path, init):
    build = HF_MODELS["llama"]
    model, inputs = build()
    kwargs = dict(corda_config=CordaConfig()) if init == "corda" else dict(lora_ga_config=LoraGAConfig())
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init, **kwargs)
    if init == "corda":
        preprocess_corda(model, config, run_model=lambda: [model(**b) for b in _samples()])
    else:
        preprocess_loraga(model, config, lambda: [model(**b).loss.backward() for b in _lm_batches()])
    theirs = peft.get_peft_model(model, config)
    theirs.save_pretrained(str(tmp_path / "initial"))
    train_a_little(theirs)
    expected = outputs(theirs, inputs)
    theirs.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion"):
        import_peft(build()[0], tmp_path / "plain")
    theirs.save_pretrained(
        str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    imported = import_peft(build()[0], tmp_path / "converted")
    torch.testing.assert_close(outputs(imported, inputs), expected, rtol=0, atol=1e-5)


def test_bad_input_is_refused_with_a_clear_error():
    llama = HF_MODELS["llama"]()[0]
    with pytest.raises(ValueError, match="`init`='corda' needs data"):
        inject(llama, LoRAConfig(init="corda", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="`init`='lora_ga' needs data"):
        inject(llama, LoRAConfig(init="lora_ga", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"`rank`=40 is too large for `init`='corda' on layer .*q_proj.* at most 32"):
        corda_init(llama, _samples(), LoRAConfig(rank=40, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"`rank`=10 is too large for `init`='lora_ga' .*k_proj.*at most 8"):
        lora_ga_init(llama, _lm_loss, LoRAConfig(rank=10, target_modules=["k_proj"]), batches=_lm_batches())
    with pytest.raises(ValueError, match="`dataloader` gave no batch"):
        corda_init(llama, [], LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="`batches` gave no batch"):
        lora_ga_init(llama, _lm_loss, LoRAConfig(target_modules=["q_proj"]), batches=[])
    with pytest.raises(ValueError, match=r"`init`='corda' is defined for nn.Linear .*embedding.*embed_tokens"):
        corda_init(llama, _samples(), LoRAConfig(target_modules=["q_proj", "embed_tokens"]))
    convnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    with pytest.raises(ValueError, match=r"`init`='lora_ga' is defined for nn.Linear .*\(conv\).*'0'"):
        lora_ga_init(
            convnet, lambda m, b: m(b).sum(), LoRAConfig(target_modules=["0"]), batches=[torch.randn(1, 3, 4, 4)]
        )
    with pytest.raises(ValueError, match="`corda_method` must be one of"):
        CorDAOptions(corda_method="svd")
    with pytest.raises(ValueError, match="`lora_ga_scale` must be one of"):
        LoRAGAOptions(lora_ga_scale="big")
    with pytest.raises(ValueError, match="LoRA-GA takes the gradient of a loss; `train_step` returned str"):
        lora_ga_init(llama, lambda m, b: "loss", LoRAConfig(target_modules=["q_proj"]), batches=_lm_batches())
    with pytest.raises(ValueError, match="`init`='corda' cannot be combined with `use_dora=True`"):
        LoRAConfig(init="corda", use_dora=True)
    assert not lora_layers(llama) and all(p.requires_grad for p in llama.parameters())  # nothing left behind


# -- LoRACallback ---------------------------------------------------------------------------------------------------
class _LanguageModel(L.LightningModule):
    """A tiny Llama trained on dict batches (``input_ids``, ``labels``); logs from its training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.model = HF_MODELS["llama"]()[0].train()
        self.steps_seen: list[int] = []

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        self.steps_seen.append(batch_idx)
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _examples(count: int = 16, seq: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(3, VOCAB, (count, seq), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


class _StartingFactors(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.a = {p: a.lora_A_init.detach().clone() for p, a in lora_adapters(pl_module.model).items()}
        self.b = {p: a.lora_B_init.detach().clone() for p, a in lora_adapters(pl_module.model).items()}


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_the_callback_starts_from_the_fit_data_trains_saves_and_reloads_exactly(tmp_path, init, seeded_svd):
    targets = ["q_proj", "v_proj", "down_proj"]
    loader = DataLoader(_examples(), batch_size=4)
    config = LoRAConfig(rank=2, alpha=4, target_modules=targets)
    reference = HF_MODELS["llama"]()[0]
    if init == "corda":  # what corda_init makes of the first two training batches
        corda_init(reference, loader, config, CorDAOptions(corda_batches=2))
    else:
        lora_ga_init(reference, _lm_loss, config, LoRAGAOptions(lora_ga_batches=2), batches=loader)
    lora = LoRACallback(
        rank=2,
        alpha=4,
        init=init,
        target_modules=targets,
        corda_batches=2,
        lora_ga_batches=2,
        merge_on_train_end=False,
        save_adapter_to=str(tmp_path / "adapter"),
    )
    start, module = _StartingFactors(), _LanguageModel()
    base = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    quiet_trainer(max_steps=3, callbacks=[lora, start]).fit(module, loader)
    for path, adapter in lora_adapters(reference).items():
        torch.testing.assert_close(start.a[path], adapter.lora_A_init, rtol=0, atol=1e-5)
        torch.testing.assert_close(start.b[path], adapter.lora_B_init, rtol=0, atol=1e-5)
    if init == "lora_ga":
        assert module.steps_seen[:2] == [0, 1]  # the gradient came from the module's own training_step
    trained = lora_adapters(module.model)
    assert any(not torch.equal(a.lora_A.weight, a.lora_A_init) for a in trained.values())  # it trained
    for name, p in module.model.named_parameters():  # the base weights are the original ones, bit for bit
        if "adapters" not in name:
            assert torch.equal(p, base[name.replace("base_layer.", "")]), name
    inputs = {"input_ids": _examples(2)[0]["input_ids"][None]}
    loaded = load_adapter(HF_MODELS["llama"]()[0], tmp_path / "adapter")
    torch.testing.assert_close(outputs(loaded, inputs), outputs(module.model, inputs), rtol=0, atol=0)
    recorded = lora.state_dict()["config"]
    assert recorded["corda_method"] == "ipm" and recorded["lora_ga_direction"] == "ArB2r"
    assert pickle.loads(pickle.dumps(lora)).config == lora.config  # no trainer or module held after the fit


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_a_data_started_run_resumes_from_its_checkpoint(tmp_path, init):
    loader = DataLoader(_examples(), batch_size=4)
    options = dict(
        rank=2, init=init, target_modules=["q_proj"], corda_batches=2, lora_ga_batches=2, merge_on_train_end=False
    )
    lora, module = LoRACallback(**options), _LanguageModel()
    trainer = quiet_trainer(max_steps=2, callbacks=[lora])
    trainer.fit(module, loader)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    trained = {
        p: (a.lora_A.weight.detach().clone(), a.lora_A_init.clone()) for p, a in lora_adapters(module.model).items()
    }
    other = DataLoader(_examples()[::-1], batch_size=4)  # other data: the checkpoint's tensors win
    resumed = _LanguageModel()
    quiet_trainer(max_steps=2, callbacks=[LoRACallback(**options)]).fit(resumed, other, ckpt_path=tmp_path / "run.ckpt")
    for path, adapter in lora_adapters(resumed.model).items():
        assert torch.equal(adapter.lora_A.weight, trained[path][0]), path
        assert torch.equal(adapter.lora_A_init, trained[path][1]), path


def test_the_callback_refuses_data_inits_outside_fit_and_takes_kpm_data_of_its_own():
    for init in ("corda", "lora_ga"):
        lora = LoRACallback(rank=2, init=init, target_modules=["q_proj"])
        with pytest.raises(ValueError, match=rf"LoRACallback\(init='{init}'\) starts LoRA's factors from the training"):
            lora.apply(HF_MODELS["llama"]()[0], "")
    manual = _LanguageModel()
    manual.automatic_optimization = False
    lora = LoRACallback(rank=2, init="lora_ga", target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"init='lora_ga'\) takes the gradient .* with manual optimisation"):
        quiet_trainer(max_steps=1, callbacks=[lora]).fit(manual, DataLoader(_examples(), batch_size=4))
    with pytest.warns(UserWarning, match="Pass data of the knowledge to keep"):
        LoRACallback(rank=2, init="corda", corda_method="kpm", target_modules=["q_proj"])
    with pytest.raises(TypeError, match="`corda_dataloader` must be None or an iterable"):
        LoRACallback(rank=2, init="corda", corda_dataloader=3)
    knowledge = DataLoader(_examples()[8:], batch_size=4)
    lora = LoRACallback(
        rank=2,
        init="corda",
        corda_method="kpm",
        corda_dataloader=knowledge,
        target_modules=["q_proj"],
        corda_batches=1,
        merge_on_train_end=False,
    )
    module = _LanguageModel()
    quiet_trainer(max_steps=1, callbacks=[lora]).fit(module, DataLoader(_examples()[:8], batch_size=4))
    reference = corda_init(
        HF_MODELS["llama"]()[0],
        knowledge,
        LoRAConfig(rank=2, target_modules=["q_proj"]),
        CorDAOptions(corda_method="kpm", corda_batches=1),
    )
    for path, adapter in lora_adapters(reference).items():
        torch.testing.assert_close(
            lora_adapters(module.model)[path].lora_A_init, adapter.lora_A_init, rtol=0, atol=1e-5
        )
