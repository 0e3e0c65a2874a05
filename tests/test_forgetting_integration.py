"""Every forgetting-control callback with every kind of fine-tune on a real (tiny) timm ViT: LoRA, DoRA, freezing
(fixed and scheduled), bottleneck adapters and full fine-tuning. The term is added and logged, it covers what trains
(and only that), the wrapper is gone after ``fit``, and everything still pickles."""

from __future__ import annotations

import copy
import pickle

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from peft_callbacks.callbacks.finish import ForgettingAwareFinish
from peft_callbacks.callbacks.freezing import FreezeBackbone, LayerwiseUnfreezing
from peft_callbacks.callbacks.lora import LoRACallback
from peft_callbacks.callbacks.method_callbacks import AdapterCallback
from peft_callbacks.callbacks.mitigation import DistillationCallback, ReplayCallback
from peft_callbacks.callbacks.regularization import EWCCallback, L2SPCallback


def vit(num_classes: int):
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=False,
        num_classes=num_classes,
        img_size=32,
        depth=2,
        embed_dim=32,
        num_heads=2,
    )


ORIGINAL = vit(5)
torch.nn.init.normal_(ORIGINAL.head.weight, std=0.5)


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = copy.deepcopy(ORIGINAL)
        self.model.reset_classifier(3)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def images(n: int, classes: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = ORIGINAL.eval()(x).argmax(-1) if classes == 5 else torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


SETUPS = {
    "full": lambda: [],
    "lora": lambda: [LoRACallback(rank=2, alpha=4, merge_on_train_end=False)],
    "dora": lambda: [LoRACallback(rank=2, alpha=4, use_dora=True, merge_on_train_end=False)],
    "freeze": lambda: [FreezeBackbone(freeze=2)],
    "unfreeze": lambda: [LayerwiseUnfreezing(every_n_epochs=1)],
    "adapters": lambda: [AdapterCallback(bottleneck=4)],
}
TERMS = {
    "replay": lambda: ReplayCallback(images(8, 5, seed=1), fraction=0.5, base_head=ORIGINAL),
    "distillation": lambda: DistillationCallback(weight=1.0, base_head=ORIGINAL),
    "l2sp": lambda: L2SPCallback(weight=1.0, base_head=ORIGINAL),
    "ewc": lambda: EWCCallback(images(8, 5, seed=1), weight=1.0, base_head=ORIGINAL),
}


def fit(module, callbacks, epochs: int = 2):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, images(8, 3, seed=2), images(8, 3, seed=3))
    return trainer


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("term", list(TERMS))
@pytest.mark.filterwarnings("ignore:.*started training after fit start")
def test_every_term_with_every_fine_tune(term, setup):
    module = Classifier()
    callback = TERMS[term]()
    trainer = fit(module, [*SETUPS[setup](), callback])
    assert callback.last_term is not None and callback.last_term > 0, "the term was added at the last step"
    assert f"{callback.prefix}/loss_epoch" in trainer.callback_metrics
    assert "training_step" not in module.__dict__  # the wrapper is gone after fit
    pickle.loads(pickle.dumps(callback))
    pickle.loads(pickle.dumps(module))


@pytest.mark.parametrize("setup", list(SETUPS))
def test_the_update_space_is_what_trains_minus_the_new_head(setup):
    module = Classifier()
    l2sp = L2SPCallback(weight=1.0, base_head=ORIGINAL)
    captured = {}

    class Look(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            captured["layers"] = list(l2sp._anchor.layers)
            captured["tensors"] = set(l2sp._anchor.start)
            captured["trainable"] = {n for n, p in pl_module.named_parameters() if p.requires_grad}

    fit(module, [*SETUPS[setup](), l2sp, Look()])
    head = {"model.head.weight", "model.head.bias"}
    assert not captured["tensors"] & head
    if setup in ("lora", "dora"):
        assert captured["layers"] and not captured["tensors"]  # LoRA: weight space of the adapted layers only
    elif setup == "adapters":
        assert captured["tensors"] and all(".adapter" in n or "norm" in n for n in captured["tensors"])
    else:
        assert not captured["layers"]
        assert captured["tensors"] == captured["trainable"] - head  # full / unfrozen tensors, as they started


def test_finish_with_every_fine_tune():
    for setup in SETUPS:
        module = Classifier()
        finish = ForgettingAwareFinish(
            images(8, 5, seed=1), max_forgetting=0.5, grid=[0, 0.5, 1], base_head=ORIGINAL, plot=False
        )
        fit(module, [*SETUPS[setup](), finish])
        assert finish.scale in (0.0, 0.5, 1.0), setup
        assert [p["forgetting"] for p in finish.curve][0] == 0.0, setup
