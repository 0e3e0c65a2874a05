"""Slim checkpoints through Lightning, and the callbacks' ``save_adapter_to`` / ``save_merged_to``."""

from __future__ import annotations

import pickle

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks import LoRACallback, SlimCheckpoint
from peft_callbacks.callbacks.slim_checkpoint import CHECKPOINT_KEY
from peft_callbacks.io import load_adapter, trained_state
from peft_callbacks.io.checkpoint import loader_key
from peft_callbacks.io.slim import SlimCheckpointError

_g = torch.Generator().manual_seed(0)
DATA = TensorDataset(torch.randn(8, 3, 32, 32, generator=_g), torch.randint(0, 3, (8,), generator=_g))


class Classifier(L.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = timm.create_model("test_resnet", pretrained=False, num_classes=3)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])

    def test_step(self, batch, batch_idx):
        self.log("loss", torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def loader() -> DataLoader:
    return DataLoader(DATA, batch_size=4, shuffle=False)


def trainer(epochs: int, *callbacks, folder=None) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=folder is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )


def checkpoint_every_epoch(folder) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1)


@pytest.mark.parametrize("write_slim, read_slim", [(True, True), (False, False), (False, True)])
def test_fit_resumed_from_a_checkpoint_reaches_the_same_weights(tmp_path, write_slim, read_slim):
    def lora():
        return LoRACallback(rank=2, merge_on_train_end=False)

    straight = Classifier()
    trainer(2, lora()).fit(straight, loader())

    first = Classifier()
    writer = [SlimCheckpoint()] if write_slim else []
    trainer(1, lora(), *writer, checkpoint_every_epoch(tmp_path), folder=tmp_path).fit(first, loader())
    path = tmp_path / "epoch=0.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    kept = set(checkpoint["state_dict"])
    if write_slim:  # the trained tensors, and a key that names the loader for a plain load_from_checkpoint
        assert kept == {*trained_state(first), loader_key(first)} and CHECKPOINT_KEY in checkpoint
        assert len(kept) < len(first.state_dict()) / 3
    else:  # the plain model: base layers with LoRA folded in, under their own keys
        assert kept == set(Classifier().state_dict())

    resumed = Classifier()
    reader = [SlimCheckpoint()] if read_slim else []
    trainer(2, lora(), *reader).fit(resumed, loader(), ckpt_path=path)
    expected = straight.state_dict()
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)
    assert any(not torch.equal(v, first.state_dict()[k]) for k, v in expected.items())  # epoch 2 did train


@pytest.fixture
def slim_checkpoint(tmp_path):
    module = Classifier()
    callbacks = [LoRACallback(rank=2), SlimCheckpoint(), checkpoint_every_epoch(tmp_path)]
    fit = trainer(1, *callbacks, folder=tmp_path)
    fit.fit(module, loader())
    return fit, module, tmp_path / "epoch=0.ckpt"


def test_slim_checkpoint_onto_another_base_is_refused(slim_checkpoint):
    _, _, path = slim_checkpoint
    with pytest.raises(SlimCheckpointError, match=r"base differs .*base weights differ"):
        trainer(2, LoRACallback(rank=2), SlimCheckpoint()).fit(Classifier(seed=1), loader(), ckpt_path=path)


def test_slim_checkpoint_onto_a_merged_model_is_refused(slim_checkpoint):
    fit, module, path = slim_checkpoint  # LoRA was merged into `module` when fit ended
    fit.save_checkpoint(path.with_name("merged.ckpt"))  # the base changed since the run began: keep it all
    checkpoint = torch.load(path.with_name("merged.ckpt"), weights_only=False)
    assert CHECKPOINT_KEY not in checkpoint and set(checkpoint["state_dict"]) == set(module.state_dict())
    with pytest.raises(SlimCheckpointError, match="merge"):
        fit.test(module, loader(), ckpt_path=str(path))
    tested = trainer(1, LoRACallback(rank=2), SlimCheckpoint()).test(Classifier(), loader(), ckpt_path=str(path))
    assert tested[0]["loss"] == pytest.approx(_loss(module), rel=1e-5)  # a module built as for training loads it


def _loss(module: Classifier) -> float:
    """The test loss of ``module`` as it is: the mean of the batches' losses, as ``test_step`` logs it."""
    module.eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(module.model(x), y) for x, y in loader()]
    return torch.stack(losses).mean().item()


def test_callback_saves_the_adapter_before_the_merge_and_the_merged_weights(tmp_path):
    module = Classifier()
    lora = LoRACallback(rank=2, save_adapter_to=str(tmp_path / "adapter"), save_merged_to=str(tmp_path / "merged"))
    trainer(1, lora).fit(module, loader())
    x = DATA.tensors[0][:2]
    with torch.no_grad():
        expected = module.model.eval()(x)
        rebuilt = load_adapter(Classifier(), tmp_path / "adapter").model.eval()
        torch.testing.assert_close(rebuilt(x), expected, atol=1e-5, rtol=0)
        merged = Classifier().model.eval()
        merged.load_state_dict(load_file(str(tmp_path / "merged" / "model.safetensors")))
        assert torch.equal(merged(x), expected)


def test_a_slim_checkpoint_callback_that_ran_pickles_and_its_copy_writes_slim_checkpoints(slim_checkpoint, tmp_path):
    fit, _, _ = slim_checkpoint
    (used,) = [c for c in fit.callbacks if isinstance(c, SlimCheckpoint)]
    copy = pickle.loads(pickle.dumps(used))  # e.g. sent to the processes of a ddp_spawn run
    module, folder = Classifier(), tmp_path / "copy"
    lora = LoRACallback(rank=2, merge_on_train_end=False)
    trainer(1, lora, copy, checkpoint_every_epoch(folder), folder=folder).fit(module, loader())
    checkpoint = torch.load(folder / "epoch=0.ckpt", weights_only=True)
    assert CHECKPOINT_KEY in checkpoint
    assert set(checkpoint["state_dict"]) == {*trained_state(module), loader_key(module)}


def test_callbacks_pickle_and_check_their_arguments():
    lora = pickle.loads(pickle.dumps(LoRACallback(save_adapter_to="out/adapter")))
    assert lora.save_adapter_to == "out/adapter"
    with pytest.raises(TypeError, match="`save_merged_to` must be a string or None"):
        LoRACallback(save_merged_to=3)
