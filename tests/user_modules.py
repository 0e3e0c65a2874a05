"""LightningModules as users write them, knowing nothing of peft_callbacks (no import of it, nor of the test zoo).

The checkpoint tests train these with the PEFT callbacks, then load the checkpoints in a fresh process that has only
this file and cannot import peft_callbacks. Pretrained weights are stood in for by seeded tiny models built from
configs (no download), so that building a module twice gives the same weights, as ``from_pretrained`` does.
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from lightning import LightningModule
from torch.utils.data import DataLoader


class GLUETransformer(LightningModule):
    """Lightning's GLUE tutorial module (text classification over DistilBERT), offline."""

    def __init__(
        self,
        model_name_or_path: str = "distilbert-base-uncased",
        num_labels: int = 2,
        task_name: str = "mrpc",
        learning_rate: float = 2e-3,
        adam_epsilon: float = 1e-8,
        warmup_steps: int = 1,
        weight_decay: float = 0.0,
        train_batch_size: int = 4,
        eval_batch_size: int = 4,
        **kwargs,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.config = transformers.DistilBertConfig(
            vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64,
            num_labels=num_labels,
        )  # fmt: skip
        torch.manual_seed(0)  # from_pretrained: the same weights each time
        self.model = transformers.AutoModelForSequenceClassification.from_config(self.config)

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        return self(**batch)[0]

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(**batch)[0])

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self(**batch)[0])

    def predict_step(self, batch, batch_idx):
        return self(**batch).logits

    def configure_optimizers(self):
        no_decay = ["bias", "LayerNorm.weight"]
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
            {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, eps=self.hparams.adam_epsilon)
        scheduler = transformers.get_linear_schedule_with_warmup(
            optimizer, self.hparams.warmup_steps, self.trainer.estimated_stepping_batches
        )
        return [optimizer], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


class CausalLM(LightningModule):
    """A GPT-2 causal-LM module that takes the model object and saves it among its hyper-parameters."""

    def __init__(self, model: nn.Module | None = None, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()  # the model object too (Lightning warns and pickles it into each checkpoint)
        self.model = model if model is not None else gpt2()

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


class ImageClassifier(LightningModule):
    """A timm CNN classifier."""

    def __init__(self, name: str = "test_resnet", num_classes: int = 3, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = timm.create_model(name, pretrained=False, num_classes=num_classes)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.cross_entropy(self.model(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class TwoLayerNet(LightningModule):
    """Two Linear layers on plain features: the smallest module that trains with a PEFT callback."""

    def __init__(self, features: int = 8, num_classes: int = 2):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(features, features), nn.Linear(features, num_classes))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def feature_batches(features: int = 8, num_classes: int = 2, n: int = 8, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, features, generator=gen), torch.randint(0, num_classes, (n,), generator=gen)
    return DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def glue_batches(n: int = 8, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(3, 99, (10,), generator=gen),
            "attention_mask": torch.ones(10, dtype=torch.long),
            "labels": torch.randint(0, 2, (), generator=gen),
        }
        for _ in range(n)
    ]
    return DataLoader(rows, batch_size=batch_size)


def text_batches(n: int = 8, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    return DataLoader(
        torch.utils.data.TensorDataset(torch.randint(3, 99, (n, 12), generator=gen)), batch_size=batch_size
    )


def image_batches(n: int = 8, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
