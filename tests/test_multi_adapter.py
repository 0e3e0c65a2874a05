"""Several named adapters on one model: switching, deleting, merging in place, combinations equal to HF PEFT's,
mixed batches, adapter files and PEFT directories per adapter, and sequential multi-task training with callbacks."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from zoo import HF_MODELS, TIMM_MODELS, run

from peft_callbacks import (
    ForgettingMonitor,
    IA3Config,
    LoRACallback,
    active_adapters,
    adapter_names,
    adapters_per_row,
    add_weighted_adapter,
    delete_adapter,
    disabled,
    export_peft,
    import_peft,
    inject,
    inject_lora,
    load_adapter,
    load_checkpoint,
    merge_adapter,
    save_adapter,
    set_adapter,
    unmerge_adapter,
    using_adapter,
)
from peft_callbacks.engine import AdaptedLayer
from peft_callbacks.methods.lora import lora_layers
from peft_callbacks.methods.lora.weighted import COMBINATIONS

peft = pytest.importorskip("peft")

TASKS = ("sst2", "mrpc")


def two_adapters(name: str = "bert", fan_in_fan_out: bool = False):
    """A zoo model with LoRA adapters ``sst2`` (alpha 8) and ``mrpc`` (alpha 6) on the same layers, non-zero B."""
    model, inputs = {**HF_MODELS, **TIMM_MODELS}[name]()
    model.eval()
    base = copy.deepcopy(model)
    for task, alpha in zip(TASKS, (8, 6)):
        inject_lora(model, rank=4, alpha=alpha, adapter_name=task, train_head=False)
    generator = torch.Generator().manual_seed(0)
    for layer in lora_layers(model).values():
        for adapter in layer.adapters.values():
            adapter.lora_B.weight.data.copy_(torch.randn(adapter.lora_B.weight.shape, generator=generator) * 0.1)
    return model, base, inputs


def peft_copy(model: nn.Module, base: nn.Module, fan_in_fan_out: bool = False):
    """The same two adapters in an HF PEFT model over ``base``."""
    targets = list(lora_layers(model))
    configs = {task: peft.LoraConfig(r=4, lora_alpha=a, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
               for task, a in zip(TASKS, (8, 6))}  # fmt: skip
    theirs = peft.get_peft_model(base, configs[TASKS[0]], adapter_name=TASKS[0])
    theirs.add_adapter(TASKS[1], configs[TASKS[1]])
    for path, layer in lora_layers(model).items():
        target = theirs.base_model.model.get_submodule(path)
        for task in TASKS:
            target.lora_A[task].weight.data.copy_(layer.adapters[task].lora_A.weight)
            target.lora_B[task].weight.data.copy_(layer.adapters[task].lora_B.weight)
    return theirs.eval()


def outputs(model, inputs):
    with torch.no_grad():
        return run(model, inputs)


def test_switching_gives_each_adapters_own_outputs():
    model, base, inputs = two_adapters()
    theirs = peft_copy(model, copy.deepcopy(base))
    assert adapter_names(model) == list(TASKS) and active_adapters(model) == list(TASKS)
    for task in TASKS:
        set_adapter(model, task)
        theirs.set_adapter(task)
        torch.testing.assert_close(outputs(model, inputs), outputs(theirs, inputs), rtol=0, atol=1e-5)
        assert active_adapters(model) == [task]
        trainable = {n for layer in lora_layers(model).values() for n, a in layer.adapters.items()
                     if a.lora_A.weight.requires_grad}  # fmt: skip
        assert trainable == {task}  # as in PEFT: the active adapter trains, the other is frozen
    with using_adapter(model, TASKS[0]):
        first = outputs(model, inputs)
    assert active_adapters(model) == [TASKS[1]]  # restored
    with disabled(model):
        torch.testing.assert_close(outputs(model, inputs), outputs(base, inputs), rtol=0, atol=0)
    assert not torch.allclose(first, outputs(model, inputs))
    with pytest.raises(ValueError, match=r"`adapter_name`='qnli': no adapter \['qnli'\].*\['sst2', 'mrpc'\]"):
        set_adapter(model, "qnli")


def test_delete_and_merge_in_place():
    model, base, inputs = two_adapters()
    set_adapter(model, TASKS[1])
    adapted = outputs(model, inputs)
    weights = {path: layer.base_layer.weight.clone() for path, layer in lora_layers(model).items()}
    merge_adapter(model)
    assert all(layer.merged_adapters == [TASKS[1]] for layer in lora_layers(model).values())
    torch.testing.assert_close(outputs(model, inputs), adapted, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        set_adapter(model, TASKS[0])
    unmerge_adapter(model)
    for path, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, weights[path], rtol=0, atol=1e-6)
    delete_adapter(model, TASKS[0])
    assert adapter_names(model) == [TASKS[1]]
    torch.testing.assert_close(outputs(model, inputs), adapted, rtol=0, atol=1e-6)
    delete_adapter(model, TASKS[1])
    assert not lora_layers(model) and adapter_names(model) == []
    torch.testing.assert_close(outputs(model, inputs), outputs(base, inputs), rtol=0, atol=1e-6)  # unmerged weights


COMBINATION_CASES = [("bert", kind) for kind in COMBINATIONS] + [
    (name, kind) for name in ("gpt2", "resnet") for kind in ("cat", "svd", "ties", "dare_ties", "dare_linear_svd")
]


@pytest.mark.parametrize("name, kind", COMBINATION_CASES)
def test_combinations_equal_peft(name, kind):
    fan_in_fan_out = name == "gpt2"
    model, base, _ = two_adapters(name)
    theirs = peft_copy(model, base, fan_in_fan_out)
    options = {} if kind in ("cat", "linear", "svd") else {"density": 0.5}
    torch.manual_seed(0)  # DARE draws its masks from the global generator, after initialising the new adapter
    add_weighted_adapter(model, list(TASKS), [0.7, -0.4], "mix", combination_type=kind, **options)
    torch.manual_seed(0)
    theirs.add_weighted_adapter(list(TASKS), [0.7, -0.4], "mix", combination_type=kind, **options)
    for path, layer in lora_layers(model).items():
        ours, target = layer.adapters["mix"], theirs.base_model.model.get_submodule(path)
        assert ours.scaling == pytest.approx(target.scaling["mix"])
        if kind.endswith("svd"):  # SVD factors are defined up to rotations of near-equal singular values
            torch.testing.assert_close(ours.delta_weight(), target.get_delta_weight("mix"), rtol=0, atol=1e-5)
            continue
        torch.testing.assert_close(ours.lora_A.weight, target.lora_A["mix"].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.lora_B.weight, target.lora_B["mix"].weight, rtol=0, atol=1e-6)
    assert active_adapters(model) == list(TASKS) and not layer.adapters["mix"].lora_A.weight.requires_grad


def test_combination_arguments_are_checked():
    model, _, _ = two_adapters()
    with pytest.raises(ValueError, match="`density` is needed by combination_type='ties'"):
        add_weighted_adapter(model, list(TASKS), [1.0, 1.0], "mix", combination_type="ties")
    with pytest.raises(ValueError, match="`adapter_name`='sst2' is taken"):
        add_weighted_adapter(model, list(TASKS), [1.0, 1.0], "sst2")
    with pytest.raises(TypeError, match="`weights` must be a list of 2 numbers"):
        add_weighted_adapter(model, list(TASKS), [1.0], "mix")


@pytest.mark.parametrize("name", ["bert", "resnet"])
def test_mixed_batch_equals_each_row_with_its_adapter(name):
    model, _, _ = two_adapters(name)
    inject(model, IA3Config(train_head=False), adapter_name="ia3")  # another method beside LoRA, on the same layers
    generator = torch.Generator().manual_seed(3)
    for layer in model.modules():
        if isinstance(layer, AdaptedLayer) and "ia3" in layer.adapters:
            layer.adapters["ia3"].ia3_l.data.uniform_(0.5, 1.5, generator=generator)
    if name == "bert":
        inputs = {"input_ids": torch.randint(3, 99, (4, 7), generator=generator), "attention_mask": torch.ones(4, 7)}
    else:
        inputs = {"x": torch.randn(4, 3, 32, 32, generator=generator)}
    rows = ["sst2", "ia3", "__base__", "mrpc"]
    with adapters_per_row(model, rows):
        mixed = outputs(model, inputs)
    for i, task in enumerate(rows):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if task == "__base__":
            with disabled(model):
                alone = outputs(model, row)
        else:
            with using_adapter(model, task):
                alone = outputs(model, row)
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="gives? one name per row|2 adapter names"):
        with adapters_per_row(model, ["sst2", "mrpc"]):
            outputs(model, inputs)
    with pytest.raises(ValueError, match=r"names \['qnli'\]"):
        with adapters_per_row(model, ["qnli"] * 4):
            pass


def test_peft_directories_per_adapter_both_ways(tmp_path):
    model, base, inputs = two_adapters()
    export_peft(model, tmp_path / "ours")  # sst2 and mrpc in sub-directories (no "default")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours" / "sst2", adapter_name="sst2")
    theirs.load_adapter(tmp_path / "ours" / "mrpc", adapter_name="mrpc")
    for task in TASKS:
        set_adapter(model, task)
        theirs.set_adapter(task)
        torch.testing.assert_close(outputs(theirs.eval(), inputs), outputs(model, inputs), rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")  # PEFT's layout: non-default adapters in sub-directories
    imported = import_peft(copy.deepcopy(base), tmp_path / "theirs")
    assert sorted(adapter_names(imported)) == sorted(TASKS)
    for task in TASKS:
        set_adapter(imported, task)
        set_adapter(model, task)
        torch.testing.assert_close(outputs(imported, inputs), outputs(model, inputs), rtol=0, atol=1e-6)


def test_adapter_files_per_adapter_name(tmp_path):
    model, base, inputs = two_adapters()
    save_adapter(model, tmp_path / "mrpc", adapter_name="mrpc")
    alone = load_adapter(copy.deepcopy(base), tmp_path / "mrpc")
    assert adapter_names(alone) == ["mrpc"]
    set_adapter(model, "mrpc")
    torch.testing.assert_close(outputs(alone, inputs), outputs(model, inputs), rtol=0, atol=1e-6)
    beside = load_adapter(alone, tmp_path / "mrpc", adapter_name="qnli")  # added beside the first, renamed
    assert adapter_names(beside) == ["mrpc", "qnli"]
    set_adapter(beside, "qnli")
    torch.testing.assert_close(outputs(beside, inputs), outputs(model, inputs), rtol=0, atol=1e-6)


class Classifier(L.LightningModule):
    """One frozen head shared by two tasks (LoRA with ``train_head=False``): task A must not move while B trains."""

    def __init__(self):
        super().__init__()
        self.model = TIMM_MODELS["resnet"]()[0]

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def task_data(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def fit(module, callbacks, data, folder=None, ckpt_path=None, steps=2):
    trainer = L.Trainer(
        max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=folder is not None,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)


def score_task_a(pl_module, batch):
    with using_adapter(pl_module, "task_a"):  # task A's adapter on task A's data, whatever trains now
        return pl_module.model(batch[0])


def test_sequential_tasks_with_callbacks_and_a_monitor_of_task_a(tmp_path):
    module = Classifier()
    lora = dict(rank=4, merge_on_train_end=False, train_head=False, exclude_modules=["conv1"])
    fit(module, [LoRACallback(**lora, adapter_name="task_a")], task_data(0))
    probe = next(iter(task_data(0)))[0]
    with torch.no_grad():
        task_a = module.model.eval()(probe)
    monitor = ForgettingMonitor(task_data(0), metric="loss", forward_fn=score_task_a, plot=False, every_n_steps=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="task_b", every_n_train_steps=2)
    fit(module.train(), [LoRACallback(**lora, adapter_name="task_b"), monitor, checkpoint], task_data(1), tmp_path)
    assert adapter_names(module) == ["task_a", "task_b"] and active_adapters(module) == ["task_b"]
    assert monitor.history and all(row["value"] == monitor.baseline for row in monitor.history)  # A untouched
    with torch.no_grad(), using_adapter(module, "task_a"):
        assert torch.equal(module.model.eval()(probe), task_a)
    with torch.no_grad():
        task_b = module.model.eval()(probe)
    assert not torch.allclose(task_b, task_a)

    # the checkpoint of task B holds the plain model with task B folded in, and both adapters beside it
    plain = Classifier.load_from_checkpoint(tmp_path / "task_b.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(plain.model.eval()(probe), task_b, rtol=0, atol=1e-5)
    both = load_checkpoint(Classifier, tmp_path / "task_b.ckpt", merged=False)
    with torch.no_grad(), using_adapter(both, "task_a"):
        torch.testing.assert_close(both.model.eval()(probe), task_a, rtol=0, atol=1e-5)

    # resuming task B in a new process: the module as built has no task A; the checkpoint re-creates it, frozen
    resumed = Classifier()
    fit(resumed, [LoRACallback(**lora, adapter_name="task_b")], task_data(1), ckpt_path=tmp_path / "task_b.ckpt")
    assert adapter_names(resumed) == ["task_b", "task_a"] and active_adapters(resumed) == ["task_b"]
    with torch.no_grad():
        torch.testing.assert_close(resumed.model.eval()(probe), task_b, rtol=0, atol=1e-5)
    assert not any(
        p.requires_grad for layer in lora_layers(resumed).values() for p in layer.adapters["task_a"].parameters()
    )
